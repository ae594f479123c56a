"""Fit the ``goemotions`` embedder on the paper's records and measure its fidelity held out.

    crowdsft experiment fit-goemotions --data shared/data/paper-llm --out goemotions.safetensors

The fit set is every pool comment and about two thirds of the authors' models' answers; the
other third (split by a hash of the text, ``data.held_out``) is never seen by the fit and gives
every fidelity figure: per text (mean L2 error, per-label Pearson) and per target emotion (the
single-100 and the generation-2 winner's distance to the target, recomputed in the fitted
space from held-out answers, against the same answers' classifier vectors).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crowdsft.stats import pearson

from .data import PaperData, mean_distance, split_texts

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitSettings:
    epochs: int = 2
    batch_size: int = 32
    learning_rate: float = 1e-3  # the encoder's adapter
    head_learning_rate: float = 3e-2  # the head starts from nothing: at 1e-3 it barely moves
    rank: int = 16
    alpha: int = 32
    max_length: int = 64
    seed: int = 0
    limit: int | None = None  # fit on the first N texts only (tests)


def fit_goemotions(
    data: PaperData,
    out: Path,
    settings: FitSettings = FitSettings(),
    say: Callable[[str], None] = print,
    encoder: str | None = None,
) -> dict[str, Any]:
    """Fit, save the adapter and head to ``out``, and return the fidelity report."""
    import torch
    from transformers import AutoTokenizer

    from crowdsft.plugins.embedding import minilm_path
    from crowdsft.plugins.goemotions import GoEmotionsEmbedder, build_network, save_weights

    started = time.monotonic()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    texts, vectors, kept_out = split_texts(data)
    if settings.limit:
        pick = rng.permutation(len(texts))[: settings.limit]
        texts, vectors = [texts[i] for i in pick], vectors[pick]
    say(f"fit set: {len(texts)} texts; held out: {len(kept_out)} answers")
    network = build_network(encoder, rank=settings.rank, alpha=settings.alpha)
    tokenizer = AutoTokenizer.from_pretrained(encoder or str(minilm_path()))
    adapter = [p for p in network.encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": adapter, "lr": settings.learning_rate},
            {"params": list(network.head.parameters()), "lr": settings.head_learning_rate},
        ],
        weight_decay=0.0,
    )
    steps = settings.epochs * -(-len(texts) // settings.batch_size)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to zero
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup)))
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    network.train()
    step = 0
    for epoch in range(settings.epochs):
        order = rng.permutation(len(texts))
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            idx = order[start : start + settings.batch_size]
            enc = tokenizer(
                [texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=settings.max_length,
                return_tensors="pt",
            )
            logits = network(enc["input_ids"], enc["attention_mask"])
            loss = loss_fn(logits, torch.from_numpy(vectors[idx]))
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            total += float(loss.detach()) * len(idx)
            step += 1
            if step % 50 == 0:
                value = float(loss.detach())
                say(f"epoch {epoch + 1}/{settings.epochs}, step {step}/{steps}: loss {value:.4f}")
        say(f"epoch {epoch + 1}: mean loss {total / len(texts):.4f}")
    meta = {
        "labels": data.labels,
        "max_length": settings.max_length,
        "rank": settings.rank,
        "alpha": settings.alpha,
        "settings": asdict(settings),
        "data_sha256": data.digest(),
        "fit_texts": len(texts),
    }
    network.eval()
    save_weights(network, out, meta)
    embedder = GoEmotionsEmbedder(out, encoder=encoder)
    report = fidelity(embedder, data, kept_out)
    report.update(seconds=round(time.monotonic() - started, 1), weights=str(out), **meta)
    return report


def fidelity(embedder: Any, data: PaperData, kept_out: list[Any]) -> dict[str, Any]:
    """How well ``embedder`` reproduces the classifier on held-out answers: per text, and in
    the per-target distances the paper reports."""
    predicted = embedder.embed([o.text for o in kept_out])
    truth = np.asarray([o.vector for o in kept_out])
    errors = np.linalg.norm(predicted - truth, axis=1)
    per_label = [pearson(predicted[:, j], truth[:, j]) for j in range(truth.shape[1])]
    by_model: dict[tuple[str, str], list[int]] = {}
    for i, o in enumerate(kept_out):
        by_model.setdefault((o.target, o.model), []).append(i)
    rows: list[dict[str, Any]] = []
    for target in data.targets:
        ours_target = embedder.embed([p.text for p in data.pool(target)]).mean(axis=0)
        their_target = data.centroid(target)
        for arm, model in (("single_100", "single-100"), ("multi_g2", data.winner(target, 2))):
            idx = by_model.get((target, model), [])
            if not idx:
                continue
            rows.append(
                {
                    "target": target,
                    "arm": arm,
                    "answers": len(idx),
                    "classifier": mean_distance(truth[idx], their_target),
                    "embedder": mean_distance(predicted[idx], ours_target),
                }
            )
    summary = {}
    for arm in ("single_100", "multi_g2"):
        a = np.array([r["classifier"] for r in rows if r["arm"] == arm], dtype=float)
        b = np.array([r["embedder"] for r in rows if r["arm"] == arm], dtype=float)
        summary[arm] = {
            "targets": len(a),
            "pearson": pearson(a, b),
            "mae": float(np.mean(np.abs(np.subtract(a, b)))),
        }
    return {
        "held_out_answers": len(kept_out),
        "mean_l2_error": float(errors.mean()),
        "per_label_pearson_mean": float(np.nanmean(per_label)),
        "per_label_pearson_min": float(np.nanmin(per_label)),
        "per_label_pearson": dict(zip(data.labels, per_label, strict=True)),
        "distances": summary,
        "per_target": rows,
    }
