"""A real two-node Ray cluster on loopback: a head and a second node, each a separate
``ray start`` process with one CPU; a round of 4 candidates runs on it, and Ray's own
records (the node each task ran on) show that both nodes trained candidates."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
ray = pytest.importorskip("ray")

from crowdsft.coordinator.training.distributed import RayExecutor, WorkerModel  # noqa: E402
from crowdsft.testing.crash import free_port  # noqa: E402

pytestmark = pytest.mark.slow


def ray_start(*args: str) -> subprocess.Popen:
    exe = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    return subprocess.Popen(
        [exe, "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    procs = [
        ray_start(
            "--head",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=false",
        )
    ]
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:  # the head answers before a second node may join it
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        procs.append(ray_start(f"--address={address}", "--node-ip-address=127.0.0.1"))
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        # `ray start --head` names its cluster in a file that later ray.init() calls read;
        # leave none naming this one, which is gone
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_a_round_of_four_candidates_runs_on_both_nodes(
    two_nodes, data_coordinator, round_runner, tiny_folder
):
    executor = RayExecutor(WorkerModel(str(tiny_folder), "cpu"), address=two_nodes, num_cpus=1)
    deadline = time.monotonic() + 90
    while sum(n["Alive"] for n in ray.nodes()) < 2:
        assert time.monotonic() < deadline, "the second Ray node never joined"
        time.sleep(0.5)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    summary = round_runner(data_coordinator(groups=4), executor).run()
    assert len(summary.adapters) == 4
    used = {p["node_id"] for p in executor.placements}
    assert used == alive and len(used) == 2, executor.placements
    executor.close()
