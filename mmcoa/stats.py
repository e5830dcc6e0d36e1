"""The statistics behind every claim of the report: intervals, paired tests, spread across seeds.

- :func:`wilson_interval` / :func:`accuracy_interval`: 95% interval of one accuracy (Wilson score; it stays inside [0, 1] and
  behaves at 0% and 100%, where the normal interval collapses).
- :func:`paired_test`: exact McNemar test of two models on the same samples (a two-sided binomial
  test on the discordant pairs), the right test when both accuracies come from the same images.
- :func:`cluster_paired_test`: the same question when samples come in clusters (an image's captions):
  an exact sign-flip permutation test of the per-cluster differences.
- :func:`cluster_interval`: 95% interval of a proportion over clustered samples (Wilson at the
  design-effect sample size).
- :func:`mean_interval`: 95% interval of an average of accuracies from independent datasets.
- :func:`holm`: Holm's step-down correction, for a list of findings made from many tests.
- :func:`spread`: mean, sample standard deviation, minimum and maximum across seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple, Sequence

import numpy as np

Z95 = NormalDist().inv_cdf(0.975)  # stdlib: every stage imports this module, scipy takes a second to load


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``k / n`` (95% by default); (0, 1) when ``n == 0``."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in [0, n={n}]")
    return wilson_score(k / n, n, z)


def wilson_score(p: float, n: float, z: float) -> tuple[float, float]:
    """Wilson interval of a proportion ``p`` at a (possibly fractional, effective) sample size ``n > 0``."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # The interval always holds p; the min/max keep float noise (k = 0 or k = n) from saying otherwise.
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def accuracy_interval(acc: float, n: int) -> tuple[float, float]:
    """Wilson interval of an accuracy given as a fraction of ``n`` samples (rounded to whole samples)."""
    return wilson_interval(round(acc * n), n)


class PairedTest(NamedTuple):
    """``a`` minus ``b`` on the same samples: accuracy difference, exact McNemar p-value, discordant counts.

    ``n01``: samples ``b`` gets right and ``a`` wrong; ``n10``: ``a`` right and ``b`` wrong.
    """

    diff: float
    p: float
    n01: int
    n10: int


def paired_test(a_correct: Sequence[int], b_correct: Sequence[int]) -> PairedTest:
    """Exact McNemar test: under H0 each discordant pair favours ``a`` or ``b`` with probability 1/2."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two vectors of one length, got {a.shape} and {b.shape}")
    n10 = int(np.sum(a & ~b))
    n01 = int(np.sum(~a & b))
    from scipy.stats import binomtest  # loaded where a test runs (the report), not by every stage

    p = 1.0 if n10 + n01 == 0 else float(binomtest(n10, n10 + n01, 0.5).pvalue)
    diff = (n10 - n01) / len(a) if len(a) else 0.0
    return PairedTest(diff, min(p, 1.0), n01, n10)


def _clusters(values: np.ndarray, clusters: Sequence[int]) -> np.ndarray:
    """Per-cluster sums of ``values`` (clusters are any integer labels, one per sample)."""
    c = np.asarray(clusters)
    if c.shape != values.shape:
        raise ValueError(f"one cluster label per sample: {c.shape} labels for {values.shape} samples")
    _, inverse = np.unique(c, return_inverse=True)
    return np.bincount(inverse, weights=values.astype(float))


def cluster_paired_test(a_correct: Sequence[int], b_correct: Sequence[int], clusters: Sequence[int]) -> PairedTest:
    """Paired test of ``a`` vs ``b`` when samples are clustered (the captions of one image share it).

    The statistic is the sum over clusters of d_c = (a right) - (b right) within cluster c. Under H0
    (a and b exchangeable within each cluster) each d_c is as likely as -d_c, so the exact null is the
    distribution of sum_c s_c |d_c| over independent fair signs s_c; it is computed exactly (the d_c
    are integers), so the p-value is deterministic, two-sided: P(|T*| >= |T|). With one sample per
    cluster it is the exact McNemar test; with clusters of identical outcomes, McNemar on clusters.
    """
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired outcomes must be two vectors of one length, got {a.shape} and {b.shape}")
    d = np.rint(_clusters(a.astype(int) - b.astype(int), clusters)).astype(int)
    t = int(d.sum())
    weights = np.abs(d[d != 0])
    # Null distribution of sum s_c w_c on offsets -W..W, one cluster at a time (exact convolution).
    total = int(weights.sum())
    dist = np.zeros(2 * total + 1)
    dist[total] = 1.0
    for w in weights:
        dist = 0.5 * (np.roll(dist, w) + np.roll(dist, -w))  # no wrap-around: |partial sums| <= total
    support = np.arange(-total, total + 1)
    p = float(dist[np.abs(support) >= abs(t)].sum()) if total else 1.0
    n10, n01 = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return PairedTest((n10 - n01) / len(a) if len(a) else 0.0, min(p, 1.0), n01, n10)


def cluster_interval(correct: Sequence[int], clusters: Sequence[int], z: float = Z95) -> tuple[float, float]:
    """95% interval of a proportion whose samples come in clusters: Wilson at the effective sample size.

    The effective size is n / deff, with the design effect deff = (cluster-robust variance of the
    mean) / (binomial variance p(1-p)/n), never below 1 (clustering is not allowed to add
    information). With one sample per cluster it is the Wilson interval; with clusters of identical
    outcomes it is the Wilson interval of the clusters. At p = 0 or 1 (no variance to estimate the
    design effect from) the effective size is the number of clusters, the most clustered case.
    """
    y = np.asarray(correct, dtype=float)
    if y.ndim != 1 or len(y) == 0:
        return 0.0, 1.0
    n, p = len(y), float(y.mean())
    resid = _clusters(y - p, clusters)
    if 0 < p < 1:
        deff = float(np.sum(resid**2)) / (n * p * (1 - p))
        n_eff = n / max(deff, 1.0)
    else:
        n_eff = float(len(resid))
    return wilson_score(p, n_eff, z)


def mean_interval(accs: Sequence[float], ns: Sequence[int], z: float = Z95) -> tuple[float, float]:
    """95% normal interval of the mean of accuracies measured on independent datasets.

    Var(mean) = sum_i p_i (1 - p_i) / n_i / k^2; clipped to [0, 1].
    """
    if not accs or len(accs) != len(ns):
        raise ValueError("mean_interval needs one sample size per accuracy")
    k = len(accs)
    mean = sum(accs) / k
    half = z * math.sqrt(sum(p * (1 - p) / n for p, n in zip(accs, ns))) / k
    return max(0.0, mean - half), min(1.0, mean + half)


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Which hypotheses Holm's step-down procedure rejects at family-wise level ``alpha``."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    reject = [False] * len(pvalues)
    m = len(pvalues)
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (m - rank):
            break
        reject[i] = True
    return reject


@dataclass(frozen=True)
class Spread:
    """Summary of one metric across seeds (``std`` is the sample standard deviation, 0 for one seed)."""

    mean: float
    std: float
    min: float
    max: float
    n: int


def spread(values: Sequence[float]) -> Spread:
    """Mean, sample standard deviation (ddof 1), minimum and maximum of ``values``."""
    if not values:
        raise ValueError("spread of no values")
    v = np.asarray(values, dtype=float)
    std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
    return Spread(float(v.mean()), std, float(v.min()), float(v.max()), len(v))
