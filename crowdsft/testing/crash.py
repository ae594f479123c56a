"""Crash-safety harness: a coordinator in its own process, killed with SIGKILL at random
moments while nodes submit and rounds run, restarted each time; then everything is checked.

``python -m crowdsft.testing.crash serve CONFIG`` is the process under test: the real
coordinator (gRPC server, store, admission, ledger) plus a loop that runs a round whenever
enough contributors have unconsumed data, over ``StandInSpace`` (model-free, with a delay per
step so that kills land inside rounds as well as between them).

``run_harness`` drives it: node threads submit signed contributions and keep every receipt;
a killer SIGKILLs the process at random moments and restarts it; at the end the process is
started once more to finish any interrupted round, and ``check`` verifies that

* every acknowledged (receipted) contribution is stored, exactly once, and its bytes (in its
  row, or in its file beside the database for a large one) hash to its id; no payload file is
  left that no row names;
* every round finished exactly once: consecutive ids, one ledger record each, no round left
  unfinished, each contribution consumed at most once;
* the points in the store equal what the ledger records imply (recomputed with the reward rule);
* the ledger verifies, and every node's ``node verify`` checks pass.

Used by ``tests/coordinator/test_crash.py`` (20 kills) and ``bench/crash.py`` (longer runs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crowdsft.config import CoordinatorConfig, load_coordinator_config
from crowdsft.envelope import contribution_id, sign_contribution
from crowdsft.keys import Identity
from crowdsft.ledger import verify_ledger
from crowdsft.node.client import Backoff, CoordinatorClient
from crowdsft.v1 import coordinator_pb2, envelope_pb2

logger = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the process under test ------------------------------------------------------------------


def tiny_llm_space(config: CoordinatorConfig, model: Path) -> Any:
    """The LLM space over the tiny LM saved in ``model`` (``crowdsft.testing.tiny``), with a
    character embedder: real LoRA training and generation, in a second or two a round."""
    from crowdsft.coordinator.training import lora as llm
    from crowdsft.coordinator.training.space import GenerationConfig, LLMSpace
    from crowdsft.plugins.evaluation import L2
    from crowdsft.testing.tiny import CharEmbedder

    base, tokenizer = llm.load_base_model(str(model), llm.torch.device("cpu"), llm.torch.float32)
    return LLMSpace(
        base,
        tokenizer,
        CharEmbedder(),
        [],
        eval_prompts=[{"prompt": "say it"}, {"prompt": "again?"}],
        target_responses=["yes yes yes", "no no no"],
        evaluation=L2(),
        training=llm.TrainingConfig(
            rank=4,
            alpha=8,
            epochs=1,
            batch_size=4,
            max_length=32,
            seed=1,
            target_modules=("q_proj", "v_proj"),
        ),
        adapter_dir=config.adapter_dir,
        generation=GenerationConfig(max_new_tokens=4, batch_size=2),
    )


def serve(
    config_path: Path,
    step_delay_s: float,
    min_new: int = 5,
    model: Path | None = None,
    ray_address: str | None = None,
) -> None:
    """``model``: a tiny LM's folder, trained for real (else the model-free stand-in);
    ``ray_address``: train candidates as Ray tasks on the cluster there."""
    from crowdsft.coordinator.rounds.auto import new_contributions
    from crowdsft.coordinator.rounds.runner import NotEnoughContributors, RoundRunner
    from crowdsft.coordinator.server.app import Coordinator
    from crowdsft.testing.standin import StandInSpace

    config = load_coordinator_config(config_path)
    coord = Coordinator(config).start()
    stop = threading.Event()
    space: Any
    executor = None
    if model is not None:
        space = tiny_llm_space(config, model)
        if ray_address is not None:
            from crowdsft.coordinator.training.distributed import RayExecutor, WorkerModel

            executor = RayExecutor(WorkerModel(str(model), "cpu"), address=ray_address)
    else:
        space = StandInSpace(config.adapter_dir, delay_s=step_delay_s)
    # after ray.init, which installs a SIGTERM handler of its own
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"READY {coord.address}", flush=True)

    def event(kind: str, info: dict) -> None:
        # The driver aims kills at rounds by these lines: a round is in progress from its
        # planning (or resumption) to its finish.
        print(f"EVENT {kind}", flush=True)

    runner = RoundRunner(config, coord.store, space, on_event=event, executor=executor)
    try:
        said = -1
        while not stop.is_set():
            # A round to finish, or enough new data for one (as automatic rounds would).
            if runner.unfinished() is None and new_contributions(coord.store) < min_new:
                # Idle, with every contribution stored so far: the driver waits for an idle
                # line that covers all it was acknowledged before its final checks.
                stored = coord.store.query("SELECT COUNT(*) FROM contributions")[0][0]
                if stored != said:
                    print(f"IDLE {stored}", flush=True)
                    said = stored
                stop.wait(0.05)
                continue
            said = -1
            try:
                summary = runner.run()
                print(f"ROUND {summary.round_id}", flush=True)
            except NotEnoughContributors:
                stop.wait(0.1)
    finally:
        if executor is not None:
            executor.close()
        coord.stop(1)


# -- the driver ------------------------------------------------------------------------------


@dataclasses.dataclass
class HarnessReport:
    kills: int
    acknowledged: int
    rounds: int
    seconds: float
    problems: list[str]
    payload_files: int = 0  # acknowledged contributions stored in files beside the database
    kills_in_upload: int = 0  # kills that struck while some node had an upload in flight
    kills_in_round: int = 0  # kills that struck while a round was between planned and finished

    @property
    def ok(self) -> bool:
        return not self.problems


class Process:
    def __init__(
        self, config_path: Path, step_delay_s: float, log: Path, extra: list[str] | None = None
    ) -> None:
        self.config_path = config_path
        self.step_delay_s = step_delay_s
        self.log = log
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        log = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "crowdsft.testing.crash",
                "serve",
                str(self.config_path),
                "--step-delay",
                str(self.step_delay_s),
                *self.extra,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        log.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if line.startswith("READY"):
                self.in_round = False
                self.idle_with = -1
                self._drainer = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
                self._drainer.start()
                return
            if not line and self.proc.poll() is not None:
                raise RuntimeError(
                    f"coordinator exited with {self.proc.returncode}; see {self.log}"
                )
        raise RuntimeError(f"coordinator did not start in {timeout}s; see {self.log}")

    in_round = False  # a round has been planned (or resumed) and not yet finished
    # idle (no round to finish, too little new data to plan one) with this many
    # contributions stored; -1: busy, or not known to be idle
    idle_with = -1

    def _drain(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line in ("EVENT round_planned", "EVENT round_resumed"):
                self.in_round = True
                self.idle_with = -1
            elif line == "EVENT round_finished":
                self.in_round = False
            elif line.startswith("IDLE "):
                self.idle_with = int(line.split()[1])

    def _reap(self, sig: int, timeout: float | None) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        self._drainer.join(10)
        self.proc.stdout.close()

    def kill(self) -> None:
        self._reap(signal.SIGKILL, None)

    def terminate(self, timeout: float = 30) -> None:
        self._reap(signal.SIGTERM, timeout)


LARGE_EVERY = 7  # every 7th contribution about 72 KB (the store keeps 64 KiB and up in files)


class Node(threading.Thread):
    """Submits ``count`` contributions with the node client, which resends the same bytes
    until a receipt (or a duplicate's original receipt) comes back. Most have one short
    example; every ``LARGE_EVERY``-th is large enough to be stored in a file beside the
    database, so that crashes also land between a payload's file and its row."""

    def __init__(
        self,
        address: str,
        identity: Identity,
        count: int,
        stop: threading.Event,
        pace_s: float = 0.0,
    ):
        super().__init__(daemon=True)
        self.pace_s = pace_s
        self.address = address
        self.identity = identity
        self.count = count
        self.stop_event = stop
        self.receipts: dict[bytes, envelope_pb2.SignedReceipt] = {}
        self.sent = 0
        self.in_flight = False  # an upload sent and not yet acknowledged

    def run(self) -> None:
        client = CoordinatorClient(
            self.address, timeout=5, backoff=Backoff(base=0.05, cap=0.2, attempts=100_000)
        )
        rng = random.Random(self.identity.node_id)
        try:
            for i in range(self.count):
                if self.pace_s:
                    time.sleep(rng.uniform(0, 2 * self.pace_s))
                words = [
                    "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
                    for _ in range(rng.randint(2, 25))
                ]
                examples = [
                    {"prompt": f"{self.identity.node_id} question {i}", "response": " ".join(words)}
                ]
                if i % LARGE_EVERY == LARGE_EVERY - 1:
                    examples += [
                        {
                            "prompt": f"{self.identity.node_id} long {i}.{j}",
                            "response": "".join(rng.choice("abcdefgh ") for _ in range(24_000)),
                        }
                        for j in range(3)
                    ]
                env = sign_contribution(self.identity, examples, coordinator=client.coordinator_key)
                # Retried through crashes until a receipt (or a duplicate's original) comes.
                self.in_flight = True
                receipt, _ = client.submit_one(env)
                self.in_flight = False
                self.receipts[contribution_id(env.payload)] = receipt
                self.sent = i + 1
                if self.stop_event.is_set():
                    return
        finally:
            client.close()


def run_harness(
    root: Path,
    *,
    kills: int = 20,
    nodes: int = 6,
    contributions: int = 60,
    interval_s: tuple[float, float] = (0.2, 1.2),
    pace_s: float = 0.1,
    step_delay_s: float = 0.05,
    seed: int = 0,
    say: Callable[[str], None] = lambda s: None,
    model: Path | None = None,
    ray_address: str | None = None,
    final_wait_s: float = 300.0,
) -> HarnessReport:
    """Kill and restart a coordinator ``kills`` times while ``nodes`` node threads submit
    ``contributions`` each and rounds run; then check everything (see the module doc).
    ``model``: rounds train the tiny LM saved there (``tiny_llm_space``) instead of the
    stand-in; ``ray_address``: as Ray tasks on that cluster, which outlives the kills."""
    from crowdsft.config import update_config_file
    from crowdsft.coordinator.server.scaffold import init_coordinator

    started = time.monotonic()
    rng = random.Random(seed)
    address = f"127.0.0.1:{free_port()}"
    config_path = init_coordinator(root, listen=address, force=True)
    update_config_file(
        config_path,
        {
            "rounds": {"groups": 2, "judging_error": 0.0},
            "rate_limit": {"contributions_per_s": 100000.0},
        },
    )
    extra = ["--model", str(model)] if model is not None else []
    if ray_address is not None:
        extra += ["--ray-address", ray_address]
    process = Process(config_path, step_delay_s, root / "coordinator.log", extra)
    # a real model (torch, transformers, Ray) takes a while to import on a busy machine
    start_timeout = 180.0 if model is not None else 60.0
    process.start(start_timeout)
    stop = threading.Event()
    identities = [Identity.generate() for _ in range(nodes)]
    threads = [Node(address, ident, contributions, stop, pace_s) for ident in identities]
    for t in threads:
        t.start()
    done = in_upload = in_round = 0
    try:
        for k in range(kills):
            # Aim at work: every other kill waits for a round in progress, the others for
            # an upload in flight (each at most a few seconds, then it strikes anyway),
            # after a random pause so that kills land at different points of that work.
            time.sleep(rng.uniform(*interval_s))
            if k % 2 == 0:
                _wait_for(lambda: process.in_round, 5.0)
                time.sleep(rng.uniform(0, 3 * step_delay_s))
            else:
                _wait_for(lambda: any(t.in_flight for t in threads), 5.0)
            round_hit = process.in_round
            upload_hit = any(t.in_flight for t in threads)
            process.kill()
            done += 1
            in_round += round_hit
            in_upload += upload_hit
            acked = sum(len(t.receipts) for t in threads)
            say(
                f"kill {k + 1}/{kills}: {acked} contributions acknowledged so far"
                f"{'; during a round' if round_hit else ''}"
                f"{'; during an upload' if upload_hit else ''}"
            )
            process.start(start_timeout)
        for t in threads:
            t.join(timeout=120)
    finally:
        stop.set()
    # Let the last process finish the round it may be in (and any that the data left calls
    # for), then stop it cleanly.
    acknowledged = sum(len(t.receipts) for t in threads)
    if not _wait_for(lambda: process.idle_with >= acknowledged, final_wait_s):
        say(f"the coordinator was still busy {final_wait_s:.0f} s after the last kill")
    process.terminate()
    receipts = {cid: r for t in threads for cid, r in t.receipts.items()}
    problems = check(load_coordinator_config(config_path), receipts, identities)
    rounds, files = _counts(load_coordinator_config(config_path))
    return HarnessReport(
        done,
        len(receipts),
        rounds,
        time.monotonic() - started,
        problems,
        payload_files=files,
        kills_in_upload=in_upload,
        kills_in_round=in_round,
    )


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _counts(config: CoordinatorConfig) -> tuple[int, int]:
    """Rounds, and contributions whose payload is in a file."""
    from crowdsft.coordinator.store.db import connect

    conn = connect(config.db_path, readonly=True)
    try:
        rounds = conn.execute("SELECT COUNT(*) FROM rounds").fetchone()[0]
        files = conn.execute(
            "SELECT COUNT(*) FROM contributions WHERE payload_file NOT NULL"
        ).fetchone()[0]
        return rounds, files
    finally:
        conn.close()


def check(
    config: CoordinatorConfig,
    receipts: dict[bytes, envelope_pb2.SignedReceipt],
    identities: list[Identity],
) -> list[str]:
    """Everything that must hold after any sequence of crashes (see the module doc)."""
    from crowdsft.coordinator.server.app import load_identity
    from crowdsft.coordinator.store import queries
    from crowdsft.coordinator.store.chain import inclusion_proofs, ledger_entries
    from crowdsft.coordinator.store.db import Store, StoreError, connect
    from crowdsft.node.verify import check_inclusion

    problems: list[str] = []
    # Before a Store opens the database (opening sweeps): the last start swept what its
    # crash left, and a clean stop leaves no file that no row names.
    payload_dir = config.db_path.with_name(config.db_path.name + ".payloads")
    if payload_dir.is_dir():
        conn = connect(config.db_path, readonly=True)
        try:
            named = {
                r[0]
                for r in conn.execute(
                    "SELECT payload_file FROM contributions WHERE payload_file NOT NULL"
                )
            }
        finally:
            conn.close()
        stray = [p.name for p in payload_dir.iterdir() if p.name not in named]
        if stray:
            problems.append(f"{len(stray)} payload files that no row names: {stray[:3]}")
    with Store(config.db_path) as store:
        q = store.query
        for cid in receipts:
            found = q("SELECT payload, payload_file FROM contributions WHERE id=?", (cid,))
            if len(found) != 1:
                problems.append(
                    f"acknowledged contribution {cid.hex()[:16]} stored {len(found)} times"
                )
                continue
            try:  # its bytes, from the row or its file, must hash to its id
                store.load_payload(found[0][0], found[0][1], cid)
            except StoreError as exc:
                problems.append(f"acknowledged contribution {cid.hex()[:16]}: {exc}")
        all_rounds = queries.rounds(store)
        statuses = [(r.round_id, r.status) for r in all_rounds]
        ids = [r[0] for r in statuses]
        if ids != list(range(1, len(ids) + 1)):
            problems.append(f"round ids are not consecutive: {ids}")
        unfinished = [r for r, s in statuses if s != "finished"]
        if unfinished:
            problems.append(f"rounds left unfinished: {unfinished}")
        entries = ledger_entries(store, 0, 1 << 62)
        finished = [r for r, s in statuses if s == "finished"]
        if [e.round_id for e in entries] != finished:
            problems.append(
                f"ledger has records for rounds {[e.round_id for e in entries]}, "
                f"finished rounds are {finished}"
            )
        for r in all_rounds:
            scored = sum(c.score is not None for c in r.candidates)
            planned = len(r.groups) + (r.consolidated is not None)  # groups', consolidated
            if r.finished and scored != planned:
                problems.append(
                    f"round {r.round_id}: {scored} scored candidates for {planned} planned"
                )
        report = verify_ledger(entries, load_identity(config).public_key)
        problems += [f"ledger: {p}" for p in report.problems]
        stored = dict(q("SELECT node_id, points FROM nodes"))
        for node, points in stored.items():
            implied = report.points.get(node, 0.0)
            if abs(points - implied) > 1e-9:
                problems.append(f"node {node}: {points} points stored, {implied} by the ledger")
        rows = {
            (rid, node): after
            for rid, node, after in q("SELECT round_id, node_id, points_after FROM points_ledger")
        }
        listed = {
            (rid, node): entry[1]
            for rid, rec in report.records.items()
            for node, entry in rec.get("points", {}).items()
        }
        if rows.keys() != listed.keys():
            problems.append(
                f"points_ledger rows and record entries differ: "
                f"{sorted(rows.keys() ^ listed.keys())[:5]}"
            )
        for key in rows.keys() & listed.keys():
            if abs(rows[key] - listed[key]) > 1e-9:
                problems.append(f"points_ledger row {key} differs from the record")
        for ident in identities:
            mine = {
                cid
                for cid, r in receipts.items()
                if envelope_pb2.Receipt.FromString(r.receipt).node_id == ident.node_id
            }
            proofs = [
                coordinator_pb2.InclusionProof(**p) for p in inclusion_proofs(store, sorted(mine))
            ]
            _, _, failed = check_inclusion(proofs, mine, ident.node_id, report.records)
            problems += [f"node {ident.node_id}: {p}" for p in failed]
    return problems


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m crowdsft.testing.crash")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="the coordinator process under test")
    s.add_argument("config", type=Path)
    s.add_argument("--step-delay", type=float, default=0.05)
    s.add_argument("--model", type=Path, help="a tiny LM's folder: train it for real")
    s.add_argument("--ray-address", help="train candidates as Ray tasks on this cluster")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    serve(args.config, args.step_delay, model=args.model, ray_address=args.ray_address)


if __name__ == "__main__":
    main()
