"""A Ray cluster of separate ``ray start`` processes on loopback, for tests and benchmarks
that need a cluster outside the process under test (one that outlives a killed
coordinator, or that has more than one node)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .crash import free_port


def ray_start(*args: str, cpus: int = 1) -> subprocess.Popen:
    """``ray start --block`` with ``cpus`` CPUs and ``args``, as a child process."""
    exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    return subprocess.Popen(
        [exe, "start", "--block", f"--num-cpus={cpus}", "--disable-usage-stats", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Without this, `ray start --head` turns token authentication on whenever a token
        # file happens to exist (~/.ray/auth_token, which any local ray.init() writes), and
        # a client joining by address then needs RAY_AUTH_MODE=token: a loopback cluster
        # for tests is the same on every machine without it.
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )


@contextlib.contextmanager
def ray_cluster(nodes: int = 2, cpus: int = 1, timeout: float = 90) -> Iterator[str]:
    """A head and ``nodes - 1`` more nodes on 127.0.0.1, each with ``cpus`` CPUs; yields the
    head's ``HOST:PORT``. Only the head is waited for: callers that need every node joined
    wait for it through ``ray.nodes()``. Stops them all on exit, and removes the cluster
    file that ``ray start --head`` leaves for later ``ray.init()`` calls to read."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = [
        ray_start(
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
            cpus=cpus,
        )
    ]
    try:
        deadline = time.monotonic() + timeout
        while True:  # the head answers before a second node may join it
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start on {address}") from None
                time.sleep(0.5)
        for _ in range(nodes - 1):
            procs.append(
                ray_start(f"--address={address}", "--node-ip-address=127.0.0.1", cpus=cpus)
            )
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
