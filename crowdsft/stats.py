"""Correlation helpers shared by the simulation, the report and benchmarks (NumPy only)."""

from __future__ import annotations

import math

import numpy as np


def nanmean(a: np.ndarray) -> float:
    """The mean of the values that are not NaN (NaN when there are none)."""
    a = np.asarray(a, dtype=float)
    return float(np.nanmean(a)) if np.any(~np.isnan(a)) else math.nan


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, float) - np.mean(a)
    b = np.asarray(b, float) - np.mean(b)
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else math.nan


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank."""
    a = np.asarray(a)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(len(a))
    boundaries = np.flatnonzero(np.diff(sorted_a)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(a)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(rankdata(a), rankdata(b))
