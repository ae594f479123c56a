"""Candidates trained as Ray tasks give the rounds the local executor gives: the same
winners, points and (within rounding) scores, on the tiny LM."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
ray = pytest.importorskip("ray")

from crowdsft.coordinator.training.distributed import (  # noqa: E402
    RayExecutor,
    WorkerModel,
    make_executor,
)
from crowdsft.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def test_ray_and_local_executors_decide_rounds_alike(
    local_ray, data_coordinator, round_runner, tiny_folder, monkeypatch
):
    from crowdsft.coordinator.training import lora as llm

    generated = {"local": 0, "ray": 0}  # generations in this (the coordinator's) process
    side = "local"

    def counting(*args, **kwargs):
        generated[side] += 1
        return real(*args, **kwargs)

    real = llm.generate
    monkeypatch.setattr(llm, "generate", counting)
    local = round_runner(data_coordinator())
    executor = RayExecutor(WorkerModel(str(tiny_folder), "cpu"), num_cpus=1)
    remote = round_runner(data_coordinator(), executor)
    candidates = 0
    for _ in range(2):  # the second round starts from the first one's winner: lineage travels
        side = "local"
        a = local.run()
        side = "ray"
        b = remote.run()
        assert a.groups == b.groups and a.winner == b.winner and a.ranking == b.ranking
        assert a.consolidated == b.consolidated is not None  # the default: one every round
        # a worker runs with one thread, the coordinator with two: the last bits may differ
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4, atol=1e-5)
        assert b.points == pytest.approx(a.points)
        candidates += len(a.scores)
    assert len(executor.placements) == candidates == 8  # every candidate ran as a Ray task
    # ... and answered the evaluation prompts there, as did the base (here: none at all;
    # the second round's base is the first one's winner, whose score is known)
    assert generated == {"local": 1 + candidates, "ray": 0}
    assert all(p["answer_seconds"] > 0 for p in executor.placements)
    # what the training took travels back with the adapter (credit included)
    info = remote.space.training_info(b.adapters[0])
    assert len(info["member_credit"]) == len(b.groups[0]) and "node_id" in info["worker"]
    expected = local.space.training_info(a.adapters[0])["member_credit"]
    np.testing.assert_allclose(info["member_credit"], expected, rtol=1e-3, atol=1e-7)
    executor.close()  # it did not start this Ray, so it leaves it running
    assert ray.is_initialized()


def test_a_bad_ray_address_is_a_config_error_at_once():
    with pytest.raises(ConfigError, match="no Ray cluster answers"):
        RayExecutor(WorkerModel("unused"), address="127.0.0.1:1")
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        RayExecutor(WorkerModel("unused"), address="nowhere")
    with pytest.raises(ConfigError, match=r"needs training\.num_gpus > 0"):
        RayExecutor(WorkerModel("unused", device="cuda"), address="nowhere")


def test_the_executor_comes_from_the_config(make_coordinator):
    import dataclasses

    from crowdsft.coordinator.rounds.executor import LocalExecutor

    config = make_coordinator().config
    assert isinstance(make_executor(config), LocalExecutor)
    with pytest.raises(ConfigError, match="executor must be local or ray"):
        dataclasses.replace(config.training, executor="slurm")
    with pytest.raises(ConfigError, match="num_cpus"):
        dataclasses.replace(config.training, num_cpus=0)


def _kill_one_training_worker(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray worker seen running a candidate's training (Ray titles a
    worker process ``ray::train_remote`` while it runs that task): only this test's own
    (the local Ray's workers descend from this process), never another Ray's on the machine."""
    import psutil

    me = psutil.Process()
    while not stop.is_set() and not killed:
        for proc in me.children(recursive=True):
            try:
                cmd = " ".join(proc.cmdline())
            except psutil.Error:
                continue
            if cmd.startswith("ray::train_remote"):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
        time.sleep(0.05)


def test_a_worker_killed_while_training_is_retried_and_the_round_finishes_once(
    local_ray, data_coordinator, round_runner, tiny_folder
):
    from crowdsft.coordinator.store.chain import ledger_entries
    from crowdsft.ledger import verify_ledger

    local = round_runner(data_coordinator())
    executor = RayExecutor(WorkerModel(str(tiny_folder), "cpu"), num_cpus=1, max_retries=2)
    coord = data_coordinator()
    remote = round_runner(coord, executor)
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_training_worker, args=(stop, killed))
    killer.start()
    try:
        b = remote.run()
    finally:
        stop.set()
        killer.join()
    assert killed, "no training worker was seen to kill"
    a = local.run()
    assert b.round_id == 1 and b.winner == a.winner and b.points == pytest.approx(a.points)
    assert len(b.adapters) == 4 and remote.unfinished() is None  # 3 groups, the consolidated
    report = verify_ledger(ledger_entries(coord.coordinator.store), coord.public_key)
    assert report.ok and report.rounds == 1


def test_resources_no_node_has_are_refused_at_once(local_ray, tiny_folder):
    """Ray would keep such tasks pending for ever."""
    with pytest.raises(ConfigError, match="no node of the Ray cluster has a GPU"):
        RayExecutor(WorkerModel(str(tiny_folder), "cpu"), num_gpus=0.25)
    with pytest.raises(ConfigError, match="largest node of the Ray cluster has 2 CPUs"):
        RayExecutor(WorkerModel(str(tiny_folder), "cpu"), num_cpus=64)
