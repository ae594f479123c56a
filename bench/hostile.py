"""A hostile client against a live coordinator, on loopback only: each attack found by probing
the server, bounded in count and time, while an honest node keeps submitting; prints the
honest node's latency and success under each attack beside a baseline measured in the same
run, and the server's memory.

    python bench/hostile.py [--seconds 8] [--repeat 3] [--attacks idle-streams,sybil,...] [--json]

Each attack runs ``--repeat`` times, each time right after a baseline window of the same
length (the honest node alone): an attack's p99 is over all the honest calls made while it
ran (from the moment the attacker reports it has started), against the p99 of its own
baseline windows. (One 8 s window holds about 160 honest calls, so its p99 is about the
second-slowest call: one scheduler or disk hiccup decides it; pooling repeats steadies both
sides alike. Each repeat's own ratio is printed too.)

The coordinator runs as its own process serving ``[::]:PORT``. The honest node connects over
IPv6 loopback (``[::1]``) and the attacker, a separate process, over IPv4 loopback
(``127.0.0.1``): two peer addresses, as two machines would be, so that per-address limits
apply to the attacker alone. As another machine would, the attacker runs on a core of its
own where the machine has two or more (``--shared-cores`` turns that off): the coordinator
and the honest node share the rest, so what is measured is what the attack costs the server,
not the attacker's own CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ATTACKS = (
    "idle-streams",
    "combining-marks",
    "huge-envelopes",
    "many-examples",
    "unknown-fields",
    "sybil",
    "bad-signatures",
    "register-flood",
    "control-characters",
    "call-flood",
    "nfkc-expansion",
    "malformed-envelopes",
    "reflection-flood",
    "page-flood",
    "slowloris",
)


# -- the attacker (runs in its own process: `hostile.py --attack NAME --target ADDR`) -------


def _stub(target: str):
    import grpc

    from crowdsft.v1 import coordinator_pb2_grpc

    channel = grpc.insecure_channel(
        target,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.enable_retries", 0)],
    )
    return channel, coordinator_pb2_grpc.CoordinatorStub(channel)


def _code(call, *args) -> str:
    import grpc

    try:
        call(*args, timeout=30)
        return "OK"
    except grpc.RpcError as err:
        return err.code().name


def attack(
    name: str, target: str, seconds: float, count: int, seed: int = 0, http_target: str = ""
) -> dict:
    """Run one attack; returns what the server answered, by status. ``seed`` varies the
    generated texts between repeats (else a repeat would only resend copies)."""
    import grpc

    from crowdsft.envelope import new_nonce, now_ms, sign_contribution, sign_envelope
    from crowdsft.keys import Identity
    from crowdsft.v1 import contribution_pb2, coordinator_pb2, envelope_pb2

    rng = random.Random(seed)
    channel, stub = _stub(target)
    codes: Counter[str] = Counter()
    me = Identity.generate()
    key = stub.GetCoordinatorInfo(coordinator_pb2.GetCoordinatorInfoRequest()).public_key
    # Imports done: tell the bench the attack starts now (it measures from here on).
    print("ready", flush=True)
    deadline = time.monotonic() + seconds

    def text(n: int) -> str:
        return "".join(rng.choice("abcdefghij ") for _ in range(n))

    def until(n: int):
        for i in range(n):
            if time.monotonic() > deadline:
                return
            yield i

    if name == "idle-streams":
        release = threading.Event()

        def silent():
            release.wait(seconds + 5)
            return
            yield

        calls = [stub.WatchRounds(coordinator_pb2.WatchRoundsRequest()) for _ in range(200)]
        calls += [stub.SubmitContributions(silent()) for _ in range(100)]
        time.sleep(seconds)
        release.set()
        for c in calls:
            c.cancel()
        codes["streams opened"] = len(calls)
    elif name == "combining-marks":
        for i in until(count):
            size = 100_000 if i % 2 else 15_000  # over the size limit, and under it
            env = sign_contribution(
                me,
                [{"prompt": f"p{i}", "response": "e" + "\u0301\u0316" * size}],
                coordinator=key,
            )
            codes[_code(stub.SubmitContribution, env)] += 1
    elif name == "huge-envelopes":
        for _i in until(count):
            examples = [{"prompt": text(30_000), "response": text(30_000)} for _ in range(64)]
            codes[
                _code(stub.SubmitContribution, sign_contribution(me, examples, coordinator=key))
            ] += 1
    elif name == "many-examples":
        payload = contribution_pb2.ContributionPayload(
            examples=[contribution_pb2.Example(prompt="a", response="b")] * 200_000,
            nonce=new_nonce(),
            timestamp_ms=now_ms(),
        )
        for _i in until(count):
            payload.nonce = new_nonce()
            codes[_code(stub.SubmitContribution, sign_envelope(me, payload, key))] += 1
    elif name == "unknown-fields":
        for i in until(count):
            payload = contribution_pb2.ContributionPayload(
                examples=[contribution_pb2.Example(prompt=f"q{i} {text(20)}", response="r")],
                nonce=new_nonce(),
                timestamp_ms=now_ms(),
                coordinator_key=key,
            ).SerializeToString()
            junk = os.urandom(1 << 20)
            payload += b"\xa2\x06" + _varint(len(junk)) + junk  # field 100, bytes
            env = envelope_pb2.SignedEnvelope(
                payload=payload,
                signature=me.sign(b"crowdsft.v1.ContributionPayload\n" + payload),
                public_key=me.public_key,
            )
            codes[_code(stub.SubmitContribution, env)] += 1
    elif name == "sybil":
        keys = [Identity.generate() for _ in range(50)]
        lock = threading.Lock()

        def flood(ident: Identity) -> None:
            for i in until(count // len(keys)):
                env = sign_contribution(
                    ident,
                    [{"prompt": f"{ident.node_id} {i} {text(8)}", "response": text(40)}],
                    coordinator=key,
                )
                code = _code(stub.SubmitContribution, env)
                with lock:
                    codes[code] += 1

        threads = [threading.Thread(target=flood, args=(k,)) for k in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elif name == "bad-signatures":
        env = sign_contribution(me, [{"prompt": "forged", "response": "forged"}], coordinator=key)
        env.signature = bytes(64)
        for _i in until(count):
            codes[_code(stub.SubmitContribution, env)] += 1
    elif name == "register-flood":
        for i in until(count):
            ident = me if i % 2 else Identity.generate()
            reg = sign_envelope(
                ident,
                contribution_pb2.RegisterPayload(nonce=new_nonce(), timestamp_ms=now_ms()),
                key,
            )
            codes["register " + _code(stub.RegisterNode, reg)] += 1
            status = sign_envelope(
                me,
                contribution_pb2.StatusRequestPayload(nonce=new_nonce(), timestamp_ms=now_ms()),
                key,
            )
            codes["status " + _code(stub.GetNodeStatus, status)] += 1
    elif name == "control-characters":
        for i in until(count):
            reg = sign_envelope(
                Identity.generate(),
                contribution_pb2.RegisterPayload(
                    nonce=new_nonce(),
                    timestamp_ms=now_ms(),
                    display_name=f"eve{i}\n12:00:00 INFO forged line\x1b[2J",
                ),
                key,
            )
            codes[_code(stub.RegisterNode, reg)] += 1
    elif name == "call-flood":
        # 300 connections x 8 calls from one address: unary calls that never send their
        # message, and health watches, held open for the whole window
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        release = threading.Event()

        def never():
            release.wait(seconds + 5)
            return
            yield

        channels = [
            grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(300)
        ]
        calls = []
        for k, ch in enumerate(channels):
            for j in range(8):
                if (k + j) % 2:
                    unary = ch.stream_unary(
                        "/crowdsft.v1.Coordinator/SubmitContribution",
                        request_serializer=lambda m: m,
                        response_deserializer=lambda b: b,
                    )
                    calls.append(unary.future(never(), timeout=seconds + 10))
                else:
                    calls.append(
                        health_pb2_grpc.HealthStub(ch).Watch(
                            health_pb2.HealthCheckRequest(), timeout=seconds + 10
                        )
                    )
        time.sleep(seconds)
        for c in calls:
            codes[c.code().name if c.done() else "held open"] += 1
        release.set()
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
    elif name == "nfkc-expansion":
        for i in until(count):  # ~224 KB of U+FDFA: 18 times longer under NFKC
            examples = [{"prompt": f"p{i}.{k}", "response": "\ufdfa" * 10_000} for k in range(7)]
            codes[
                _code(stub.SubmitContribution, sign_contribution(me, examples, coordinator=key))
            ] += 1
    elif name == "malformed-envelopes":
        raw = channel.unary_unary("/crowdsft.v1.Coordinator/SubmitContribution")
        for _i in until(count):
            try:
                raw(b"\xff", timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
    elif name == "reflection-flood":
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        while time.monotonic() < deadline:
            try:
                for _ in reflect.ServerReflectionInfo(
                    (ask for _ in until(count)), timeout=seconds + 5
                ):
                    codes["answered"] += 1
            except grpc.RpcError as err:
                codes[err.code().name] += 1
    elif name == "page-flood":
        import http.client

        host, port = http_target.rsplit(":", 1)
        lock = threading.Lock()

        def pages() -> None:
            for i in until(count):
                conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=30)
                try:
                    conn.request("GET", "/" if i % 2 else "/api/leaderboard")
                    status = str(conn.getresponse().status)
                except OSError as exc:
                    status = type(exc).__name__
                finally:
                    conn.close()
                with lock:
                    codes[f"HTTP {status}"] += 1

        threads = [threading.Thread(target=pages) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elif name == "slowloris":
        import socket as sock_mod

        host, port = http_target.rsplit(":", 1)
        conns = []
        for _ in until(3000):
            try:
                s = sock_mod.create_connection((host.strip("[]"), int(port)), timeout=2)
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
                s.setblocking(False)
                conns.append(s)
            except OSError as exc:
                codes[f"connect {type(exc).__name__}"] += 1
        codes["opened"] = len(conns)
        while time.monotonic() < deadline:  # a header line every 2 s on each
            time.sleep(2)
            for s in conns:
                with contextlib.suppress(OSError):
                    s.send(b"X-a: b\r\n")
        closed = 0
        for s in conns:
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
            s.close()
        codes["closed by the server"] = closed
    else:
        raise SystemExit(f"unknown attack {name!r}")
    channel.close()
    del grpc
    return dict(codes)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# -- the honest node and the coordinator ------------------------------------------------------


class Honest(threading.Thread):
    """Submits one contribution of 5 examples every ``pace_s`` until stopped; records each
    call's latency and whether it came back with a receipt."""

    def __init__(self, target: str, pace_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        from crowdsft.keys import Identity
        from crowdsft.node.client import Backoff, CoordinatorClient

        self.client = CoordinatorClient(
            target, timeout=30, backoff=Backoff(base=0.05, cap=1.0, attempts=10)
        )
        self.identity = Identity.generate()
        self.pace_s = pace_s
        self.stop = threading.Event()
        self.samples: list[tuple[float, bool]] = []
        self.n = 0

    def run(self) -> None:
        from crowdsft.envelope import sign_contribution

        while not self.stop.is_set():
            self.n += 1
            examples = [
                {"prompt": f"honest {self.identity.node_id} {self.n}.{k}", "response": "fine"}
                for k in range(5)
            ]
            t = time.perf_counter()
            try:
                receipt, _ = self.client.submit_one(
                    sign_contribution(
                        self.identity, examples, coordinator=self.client.coordinator_key
                    )
                )
                ok = bool(receipt.receipt)
            except Exception:
                ok = False
            self.samples.append((time.perf_counter() - t, ok))
            self.stop.wait(self.pace_s)

    def window(self) -> list[tuple[float, bool]]:
        out, self.samples = self.samples, []
        return out


def _register(config: Path, n: int) -> None:
    """``n`` registered nodes written straight into the store (as after a registration
    flood), so that the HTTP pages have many nodes to list."""
    import sqlite3

    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.store.db import Store

    db = load_coordinator_config(config).db_path
    Store(db).close()  # the schema
    conn = sqlite3.connect(db)
    with conn:
        conn.executemany(
            "INSERT INTO nodes (node_id, public_key, registered_at_ms, points) VALUES (?,?,?,?)",
            [(f"{i:032x}", i.to_bytes(32, "big"), 1, float(i % 97)) for i in range(n)],
        )
    conn.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system) the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(samples: list[tuple[float, bool]]) -> dict:
    lat = sorted(s for s, _ in samples)
    if not lat:
        return {"calls": 0, "ok": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    return {
        "calls": len(samples),
        "ok": sum(ok for _, ok in samples),
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * p99, 1),
        "max_ms": round(1000 * lat[-1], 1),
    }


def connlimit_rules(port: int, limit: int) -> list[tuple[str, list[str]]]:
    """The kernel rules that refuse a source address's connections to ``port`` beyond
    ``limit`` open ones (IPv4 and IPv6), as (tool, arguments after -I or -D)."""
    rule = ["INPUT", "-p", "tcp", "--syn", "--dport", str(port), "-m", "connlimit"]
    rule += ["--connlimit-above", str(limit)]
    return [
        (
            "iptables",
            [*rule, "--connlimit-mask", "32", "-j", "REJECT", "--reject-with", "tcp-reset"],
        ),
        (
            "ip6tables",
            [*rule, "--connlimit-mask", "128", "-j", "REJECT", "--reject-with", "tcp-reset"],
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per attack and baseline")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--count", type=int, default=20_000, help="most requests per attack")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each attack, each after a baseline"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--shared-cores",
        action="store_true",
        help="run the attacker on the same cores as the coordinator and the honest node",
    )
    parser.add_argument("--attack", help=argparse.SUPPRESS)  # the attacker process
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--http", default="", help=argparse.SUPPRESS)
    parser.add_argument(
        "--registrations",
        type=int,
        default=20_000,
        help="nodes registered before the run (written into the store), for the HTTP attacks",
    )
    parser.add_argument(
        "--connlimit",
        type=int,
        default=0,
        help="with N > 0, limit each source address to N open TCP connections to the gRPC "
        "port in the kernel (iptables and ip6tables connlimit, as docs/operators.md shows; "
        "needs root), for the run",
    )
    args = parser.parse_args()

    if args.attack:
        print(
            json.dumps(
                attack(args.attack, args.target, args.seconds, args.count, args.seed, args.http)
            )
        )
        return 0

    from crowdsft.coordinator.server.app import wait_ready
    from crowdsft.coordinator.server.scaffold import init_coordinator

    cores = sorted(os.sched_getaffinity(0))
    split = len(cores) >= 2 and not args.shared_cores
    attacker_cores = set(cores[-1:]) if split else set(cores)
    home_cores = set(cores[:-1]) if split else set(cores)
    os.sched_setaffinity(0, home_cores)  # this process (the honest node) and the coordinator

    ports = []
    for _ in range(2):
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::", 0))
            ports.append(s.getsockname()[1])
    port, http_port = ports
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = init_coordinator(Path(tmp) / "coordinator", listen=f"[::]:{port}")
        # the live page and /api, with the leaderboard published (the costlier pages), for
        # the HTTP attacks
        text = config.read_text()
        text = text.replace('listen = ""', f'listen = "0.0.0.0:{http_port}"', 1)
        text = text.replace('publish = "aggregates"', 'publish = "nodes"', 1)
        config.write_text(text)
        _register(config, args.registrations)
        log = open(Path(tmp) / "coordinator.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "crowdsft.cli", "coordinator", "serve", "--config", str(config)],
            stdout=log,
            stderr=log,
        )
        rules = connlimit_rules(port, args.connlimit) if args.connlimit > 0 else []
        try:
            for tool, rule in rules:
                subprocess.run([tool, "-I", *rule], check=True)
            wait_ready(f"[::1]:{port}", timeout=60)
            honest = Honest(f"[::1]:{port}")
            honest.start()
            time.sleep(1.0)
            honest.window()  # warm-up
            base_rss = rss_mb(server.pid)
            all_base: list[tuple[float, bool]] = []
            for name in [a for a in args.attacks.split(",") if a]:
                base_samples: list[tuple[float, bool]] = []
                during_samples: list[tuple[float, bool]] = []
                ratios, busy_all, peaks, afters = [], [], [], []
                answered: Counter[str] = Counter()
                failed: list[str] = []
                for rep in range(args.repeat):
                    honest.window()
                    time.sleep(args.seconds)
                    b = honest.window()
                    base_samples += b
                    attacker = subprocess.Popen(
                        [
                            "taskset",
                            "-c",
                            ",".join(map(str, sorted(attacker_cores))),
                            sys.executable,
                            __file__,
                            "--attack",
                            name,
                            "--target",
                            f"127.0.0.1:{port}",
                            "--seconds",
                            str(args.seconds),
                            "--count",
                            str(args.count),
                            "--seed",
                            str(rep),
                            "--http",
                            f"127.0.0.1:{http_port}",
                        ],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    assert attacker.stdout is not None
                    attacker.stdout.readline()  # "ready": its imports are done
                    honest.window()  # calls made before the attack began are not counted
                    cpu_before, t_before = cpu_s(server.pid), time.monotonic()
                    out, err = attacker.communicate(timeout=args.seconds * 10 + 120)
                    d = honest.window()
                    during_samples += d
                    busy_all.append(
                        (cpu_s(server.pid) - cpu_before) / (time.monotonic() - t_before)
                    )
                    peaks.append(rss_mb(server.pid))
                    if attacker.returncode == 0:
                        answered.update(json.loads(out.strip().splitlines()[-1]))
                    else:
                        failed += err.strip().splitlines()[-1:]
                    one = summary(d)["p99_ms"], summary(b)["p99_ms"]
                    ratios.append(round(one[0] / one[1], 2) if all(one) else None)
                    time.sleep(3.0)
                    honest.window()
                    afters.append(rss_mb(server.pid))
                all_base += base_samples
                base, during = summary(base_samples), summary(during_samples)
                ratio = (
                    round(during["p99_ms"] / base["p99_ms"], 2)
                    if during["p99_ms"] and base["p99_ms"]
                    else None
                )
                row = {
                    "attack": name,
                    **during,
                    "baseline_p99_ms": base["p99_ms"],
                    "baseline_calls": base["calls"],
                    "p99_vs_baseline": ratio,
                    "each_repeat_vs_baseline": ratios,
                    "server_cpu": round(statistics.fmean(busy_all), 2),
                    "rss_mb": round(max(peaks), 1),
                    "rss_after_mb": round(afters[-1], 1),
                    "server_answered": dict(answered)
                    if not failed
                    else {"attacker failed": failed},
                }
                rows.append(row)
                if not args.json:
                    print(
                        f"{name}: honest {during['ok']}/{during['calls']} ok, p50 "
                        f"{during['p50_ms']} ms, p99 {during['p99_ms']} ms vs "
                        f"{base['p99_ms']} ms alone ({ratio}x; each repeat {ratios}); "
                        f"server CPU {row['server_cpu']:.0%}; server RSS {max(peaks):.0f} MB, "
                        f"{afters[-1]:.0f} MB 3 s later; attacker got {row['server_answered']}",
                        flush=True,
                    )
            overall = summary(all_base)
            rows.insert(0, {"attack": "baseline (none)", **overall, "rss_mb": round(base_rss, 1)})
            if not args.json:
                print(f"all baseline windows: {overall}; server RSS idle {base_rss:.0f} MB")
            honest.stop.set()
            honest.join(10)
        finally:
            for tool, rule in rules:
                subprocess.run([tool, "-D", *rule], check=False)
            server.terminate()
            server.wait(30)
            log.close()
    met = all(r["ok"] == r["calls"] and (r.get("p99_vs_baseline") or 0) <= 2.0 for r in rows[1:])
    if args.json:
        print(
            json.dumps(
                {
                    "rows": rows,
                    "target_met": met,
                    "split_cores": split,
                    "connlimit": args.connlimit,
                },
                indent=2,
            )
        )
    else:
        print(
            "target (every honest call succeeds, p99 within 2x of baseline under each attack): "
            + ("met" if met else "NOT met")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
