"""A real two-node Ray cluster on loopback: a head and a second node, each a separate
``ray start`` process with one CPU; a round of 4 candidates runs on it, and Ray's own
records (the node each task ran on) show that both nodes trained candidates."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
ray = pytest.importorskip("ray")

from crowdsft.coordinator.training.distributed import RayExecutor, WorkerModel  # noqa: E402
from crowdsft.testing.raycluster import ray_cluster  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    with ray_cluster(nodes=2, cpus=1) as address:
        try:
            yield address
        finally:
            # before the cluster stops: a driver whose raylet dies exits on the spot
            if ray.is_initialized():
                ray.shutdown()


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
    # four group candidates and the consolidated one (on by default), spread over both nodes
    assert len(summary.adapters) == 5 and summary.consolidated is not None
    used = {p["node_id"] for p in executor.placements}
    assert used == alive and len(used) == 2, executor.placements
    executor.close()
