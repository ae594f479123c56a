"""Candidates trained as Ray tasks: ``[training] executor = "ray"``.

Each candidate of a round is one Ray task with declared resources (``num_cpus``,
``num_gpus``; a fraction of a GPU packs several small candidates on one card): it trains
the candidate and generates its answers to the evaluation prompts (the coordinator embeds
and scores them, and a resumed round whose answers were lost generates them itself). A task gets
the base model's spec, the adapters of the current lineage (their bytes, put once per round
in Ray's object store, checked against their hashes on arrival) and its job (examples,
weights, seed, credit targets); it loads the base model once per worker process, merges the
lineage, trains, and returns the adapter's bytes, which the coordinator checks against
their hash before storing them by it. Nothing but Ray's object store travels, so the
workers need no shared folder: only this package (``pip install crowd-sft[scale]``) and the
base model.

``ray_address``: empty starts a local Ray inside the coordinator (its workers use this
machine's cores); ``auto`` joins the cluster started on this machine with ``ray start``;
``HOST:PORT`` joins the cluster whose head listens there (checked to be reachable first,
since Ray itself waits a long time on an address where nobody listens).

Same results as the local executor: a candidate's seed is drawn from the same stream, and
its data, order and training are the same; the adapter can differ in the last bits where
the worker's math library splits work across a different number of threads (a worker
runs with ``num_cpus`` threads), so scores agree to within such rounding, not bit for bit.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from crowdsft import atomic
from crowdsft.config import check_ray_address
from crowdsft.coordinator.rounds.executor import CandidateJob, LocalExecutor, Started
from crowdsft.coordinator.rounds.space import Candidate
from crowdsft.errors import ConfigError

from .space import AnswerJob, TrainingJob, answer, train_job


@dataclass(frozen=True)
class WorkerModel:
    """The base model a worker loads: ``model.base`` and ``model.device`` of the config."""

    base: str
    device: str = "auto"


# One worker process keeps one model: the base with a lineage merged in.
_CACHE: dict[str, Any] = {}


def _verified(digest: str, data: bytes) -> bytes:
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"adapter {digest} arrived corrupt: its bytes do not match its hash")
    return data


def _worker_model(
    spec: WorkerModel, lineage: list[tuple[str, bytes]], num_gpus: float, training: Any
) -> Any:
    """The model of ``lineage`` in this worker process, from its cache where it can."""
    from safetensors.torch import load

    from . import lora as llm

    digests = tuple(d for d, _ in lineage)
    cached = _CACHE.get("key")
    if cached is None or cached[0] != spec or digests[: len(cached[1])] != cached[1]:
        # A task given a GPU sees only its card(s) (Ray sets CUDA_VISIBLE_DEVICES), one given
        # none sees no card: "cuda" is then the assigned card, and CPU otherwise.
        prefer = "cuda" if num_gpus > 0 else "cpu" if spec.device == "auto" else spec.device
        device, dtype = llm.device_and_dtype(prefer)
        model, tokenizer = llm.load_base_model(spec.base, device, dtype)
        _CACHE.update(key=(spec, ()), model=model, tokenizer=tokenizer)
        cached = _CACHE["key"]
    done = len(cached[1])
    model = _CACHE["model"]
    try:
        for digest, data in lineage[done:]:
            adapter = load(_verified(digest, data))
            model = llm.merge_adapter(model, adapter, training)  # merges in place
    except BaseException:
        _CACHE.clear()  # the cached model may be half merged: load afresh next time
        raise
    _CACHE.update(key=(spec, digests), model=model)
    return model, _CACHE["tokenizer"]


def train_remote(
    spec: WorkerModel,
    lineage: list[tuple[str, bytes]],
    job: TrainingJob,
    num_gpus: float,
    answers: AnswerJob | None = None,
) -> tuple[str, bytes, dict[str, Any], dict[str, Any], list[str] | None]:
    """The Ray task: train one candidate and (given ``answers``) generate its answers to the
    evaluation prompts; return its adapter's hash and bytes, what the training took, where
    it ran (with the seconds each part took), and the answers."""
    import time

    from . import lora as llm

    started_at = time.time()
    try:
        t0 = time.perf_counter()
        model, tokenizer = _worker_model(spec, lineage, num_gpus, job.training)
        t1 = time.perf_counter()
        adapter, info = train_job(model, tokenizer, job)
        t2 = time.perf_counter()
        texts = answer(model, tokenizer, adapter, job.training, answers) if answers else None
        t3 = time.perf_counter()
    except BaseException:
        _CACHE.clear()  # whatever failed may have left the cached model changed
        raise
    data = llm.adapter_bytes(adapter)
    where = _where() | {
        "load_seconds": round(t1 - t0, 3),
        "train_seconds": round(t2 - t1, 3),
        "answer_seconds": round(t3 - t2, 3),
        "started_at": started_at,  # wall clock, to see which tasks overlapped
        "finished_at": time.time(),
    }
    return hashlib.sha256(data).hexdigest(), data, info, where, texts


def _where() -> dict[str, Any]:
    import ray

    context = ray.get_runtime_context()
    return {
        "node_id": context.get_node_id(),
        "pid": os.getpid(),
        "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
    }


def answer_remote(
    spec: WorkerModel,
    lineage: list[tuple[str, bytes]],
    adapter: tuple[str, bytes] | None,
    training: Any,
    answers: AnswerJob,
    num_gpus: float,
) -> tuple[list[str], dict[str, Any]]:
    """The Ray task that answers the evaluation prompts with the model of ``lineage`` (plus
    ``adapter``, where given), on a worker like the ones that train: so that every score of
    a round comes from the same kind of worker (the base's, and a resumed round's
    candidates whose answers were lost with the coordinator)."""
    from safetensors.torch import load

    try:
        model, tokenizer = _worker_model(spec, lineage, num_gpus, training)
        tensors = load(_verified(*adapter)) if adapter is not None else None
        texts = answer(model, tokenizer, tensors, training, answers)
    except BaseException:
        _CACHE.clear()
        raise
    return texts, _where()


class RayExecutor:
    """Each candidate a Ray task; see the module's docstring. ``max_retries``: how often Ray
    reruns a task whose worker died (a killed process, a lost node) before the round fails;
    the round then resumes as any interrupted round does."""

    def __init__(
        self,
        model: WorkerModel,
        address: str = "",
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        max_retries: int = 3,
        local_cpus: int | None = None,
    ) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError(
                'training.executor = "ray" needs Ray: pip install "crowd-sft[scale]"'
            ) from None
        if num_cpus <= 0 or num_gpus < 0:
            raise ConfigError("training.num_cpus must be > 0 and training.num_gpus >= 0")
        if model.device == "cuda" and num_gpus <= 0:
            raise ConfigError(
                'model.device = "cuda" with the Ray executor needs training.num_gpus > 0: Ray '
                "shows a task only the GPUs it declares (0.25 packs four candidates on a card)"
            )
        if address not in ("", "auto"):
            check_ray_address(address, "training.ray_address")
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            options: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "configure_logging": False,
            }
            # "local": a new local Ray even where `ray start` left a cluster file behind
            options["address"] = address or "local"
            if not address and local_cpus is not None:
                options["num_cpus"] = local_cpus
            try:
                ray.init(**options)
            except ConnectionError as exc:
                hint = ""
                if "auth" in f"{exc} {exc.__cause__}".lower():
                    hint = (
                        "; the cluster asks for a token: set RAY_AUTH_MODE=token on the "
                        "coordinator, with the cluster's token in RAY_AUTH_TOKEN or "
                        "~/.ray/auth_token"
                    )
                raise ConfigError(
                    f"cannot join the Ray cluster at {address!r}: {exc}{hint}"
                ) from None
        self._check_resources(num_cpus, num_gpus)
        self.model = model
        self.num_gpus = num_gpus
        self.placements: list[dict[str, Any]] = []  # where each candidate ran, in arrival order
        # A worker that held a GPU is not reused: Ray may give its next task another card,
        # which a process whose CUDA is set up cannot switch to. (Each GPU task loads the
        # base model afresh; CPU workers keep theirs.)
        remote = ray.remote(max_calls=1 if num_gpus > 0 else 0)
        options = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)
        self._task = remote(train_remote).options(**options)
        self._answer_task = remote(answer_remote).options(**options)

    @staticmethod
    def _check_resources(num_cpus: float, num_gpus: float) -> None:
        """Refuse tasks that no node of the cluster could run: Ray would wait for ever."""
        import ray

        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        if num_gpus > 0 and not any(r.get("GPU", 0) >= min(num_gpus, 1) for r in nodes):
            raise ConfigError(
                f"training.num_gpus = {num_gpus}, but no node of the Ray cluster has a GPU "
                "(set num_gpus = 0, or add a node with one)"
            )
        if not any(r.get("CPU", 0) >= num_cpus for r in nodes):
            most = max((r.get("CPU", 0) for r in nodes), default=0)
            raise ConfigError(
                f"training.num_cpus = {num_cpus}, but the largest node of the Ray cluster "
                f"has {most:g} CPUs"
            )

    def prepare_scores(self, space: Any, models: Sequence[Candidate]) -> None:
        """Answer the evaluation prompts for ``models`` whose score ``space`` does not know
        yet, as Ray tasks (so a round's scores all come from workers); ``space.score`` then
        takes them from the space."""
        import ray

        if not hasattr(space, "answer_job"):
            return
        todo = [m for m in models if not space.has_score(m)]
        if not todo:
            return
        folder = space.adapter_dir
        answers = space.answer_job()

        def read(digest: str) -> tuple[str, bytes]:
            return digest, _verified(digest, (folder / f"{digest}.safetensors").read_bytes())

        refs = {}
        for model in todo:
            lineage = [read(d) for d in model.chain]
            adapter = read(model.adapter) if model.adapter else None
            ref = self._answer_task.remote(
                self.model, lineage, adapter, space.training, answers, self.num_gpus
            )
            refs[ref] = model
        fetched: set[Any] = set()
        try:
            for ref, model in refs.items():
                texts, _ = ray.get(ref)
                fetched.add(ref)
                space.record_answers(model, texts)
        except BaseException:
            # only tasks not yet answered: cancelling a finished one races with its reply,
            # which Ray (2.60) treats as a fatal error in the driver
            for ref in refs:
                if ref not in fetched:
                    ray.cancel(ref, force=True)
            raise

    def train(
        self,
        space: Any,
        base: Candidate,
        jobs: Sequence[CandidateJob],
        started: Started = lambda job: None,
    ) -> Iterator[tuple[int, str]]:
        import ray

        if not (hasattr(space, "job") and hasattr(space, "record_trained")):
            raise TypeError("the Ray executor trains LLM candidates: the space must be an LLMSpace")
        folder = space.adapter_dir
        lineage = [(d, (folder / f"{d}.safetensors").read_bytes()) for d in base.lineage]
        lineage = [(d, _verified(d, data)) for d, data in lineage]
        lineage_ref = ray.put(lineage)
        # The scoring generations run on the worker too, with the model it trained on.
        answers = space.answer_job() if hasattr(space, "answer_job") else None
        pending = {}
        for job in jobs:
            work = space.job(job.members, job.weights, job.rng)
            ref = self._task.remote(self.model, lineage_ref, work, self.num_gpus, answers)
            pending[ref] = job
            started(job)
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                digest, data, info, where, texts = ray.get(ready[0])
                atomic.write_bytes(folder / f"{digest}.safetensors", _verified(digest, data))
                space.record_trained(digest, info | {"worker": where})
                if texts is not None:
                    space.record_answers(Candidate(base.lineage, digest), texts)
                self.placements.append({"group": job.group} | where)
                yield job.group, digest
        finally:
            if pending:  # stopped early: cancel what still runs (not what has finished)
                _, running = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                for ref in running:
                    ray.cancel(ref, force=True)

    def close(self) -> None:
        import ray

        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    def describe(self) -> dict[str, Any]:
        return {"executor": "ray", "placements": list(self.placements)}


def make_executor(config: Any) -> Any:
    """The executor that ``[training] executor`` names (``local`` by default)."""
    t = config.training
    if t.executor == "local":
        return LocalExecutor()
    return RayExecutor(
        WorkerModel(config.model.base, config.model.device),
        address=t.ray_address,
        num_cpus=t.num_cpus,
        num_gpus=t.num_gpus,
    )
