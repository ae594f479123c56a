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


# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom; 1.96 beyond 30.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table; 1.96 past 30)."""
    if df < 1:
        raise ValueError("degrees of freedom must be at least 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t); NaNs are left out,
    and the half-width is NaN for fewer than two values."""
    v = [float(x) for x in values if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    mean = sum(v) / len(v)
    if len(v) < 2:
        return mean, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
    return mean, t975(len(v) - 1) * sd / math.sqrt(len(v))
