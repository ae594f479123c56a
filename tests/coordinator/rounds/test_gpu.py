"""Rounds on CUDA (skipped where no GPU is present): the model, its training and its
generations on the card, in bf16 where the card supports it; and, with Ray, four candidates
packed on one card by a fractional ``num_gpus``."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.gpu


def _expected_dtype() -> str:
    return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float32"


def test_a_round_runs_on_the_gpu(data_coordinator, round_runner):
    runner = round_runner(data_coordinator(groups=3), device="cuda")
    summary = runner.run()
    # three groups and the consolidated candidate (on by default)
    assert len(summary.adapters) == 4 and all(math.isfinite(s) for s in summary.scores)
    for adapter in summary.adapters:
        info = runner.space.training_info(adapter)
        assert info["device"].startswith("cuda") and info["dtype"] == _expected_dtype()


def test_ray_packs_four_candidates_on_one_gpu(data_coordinator, round_runner, tiny_folder):
    ray = pytest.importorskip("ray")
    from crowdsft.coordinator.training.distributed import RayExecutor, WorkerModel

    if ray.is_initialized():
        ray.shutdown()
    # a Ray of its own, shown one GPU (the first), whatever the machine has
    ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False)
    try:
        executor = RayExecutor(WorkerModel(str(tiny_folder), "cuda"), num_cpus=1, num_gpus=0.25)
        runner = round_runner(data_coordinator(groups=4), executor, device="cuda")
        summary = runner.run()
        assert len(summary.adapters) == 5  # four groups and the consolidated candidate
        for adapter in summary.adapters:
            info = runner.space.training_info(adapter)
            assert info["device"].startswith("cuda") and info["dtype"] == _expected_dtype()
        # a quarter of the card each: they ran at the same time on it
        spans = [(p["started_at"], p["finished_at"]) for p in executor.placements]
        overlapping = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
        assert overlapping >= 2, executor.placements
        assert {p["gpu_ids"][0] for p in executor.placements} == {"0"}  # all on the one card
        executor.close()
    finally:
        ray.shutdown()
