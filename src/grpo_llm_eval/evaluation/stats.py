"""Statistics for evaluation summaries: confidence intervals and paired comparisons.

The choices, and why:

- The sampling unit is the PROMPT. With K > 1 responses per prompt the K responses share a prompt and are
  correlated, so intervals resample whole prompts (a cluster bootstrap) rather than single responses; with
  K = 1 this is the ordinary bootstrap.
- Means of scores (criteria, teacher reward, reward): percentile bootstrap over prompts of the pooled mean
  (sum of values / number of values), `BOOTSTRAP_RESAMPLES` resamples, a fixed seed so reruns match.
- Proportions (answer accuracy, format rate, judge failure rate) with K = 1: the Wilson score interval. It
  needs no resampling, stays inside [0, 1] and does not collapse to a point at 0 % or 100 % as the percentile
  bootstrap does. With K > 1 Wilson would treat correlated responses as independent (too narrow), so
  proportions use the cluster bootstrap too.
- Paired comparison of a model B against a baseline A on the same prompts: per prompt, the difference of the
  per-prompt means (B - A); the estimate is the mean difference over prompts where both have a value, with a
  paired percentile bootstrap interval over prompts. Its p-value (two-sided) is, for proportions, the exact
  sign test on the per-prompt differences, which with K = 1 is the exact McNemar test (only discordant pairs
  count); for scores, the paired bootstrap test: the share of resampled mean differences, re-centred on zero,
  at least as far from zero as the observed one, (1 + hits) / (1 + resamples).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
_CHUNK = 256  # resamples drawn at once: bounds memory to _CHUNK x prompts indices


@dataclass(frozen=True)
class PairedResult:
    """Mean of paired differences (B - A) with its interval and two-sided p-value."""

    diff: float
    low: float
    high: float
    p_value: float
    n: int


def _clusters(values: Sequence[Sequence[float | None]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and counts of the non-missing values; clusters without a value are left out."""
    sums, counts = [], []
    for cluster in values:
        vals = [float(v) for v in cluster if v is not None and math.isfinite(float(v))]
        if vals:
            sums.append(math.fsum(vals))
            counts.append(len(vals))
    return np.asarray(sums, dtype=float), np.asarray(counts, dtype=float)


def pooled_mean(values: Sequence[Sequence[float | None]]) -> float | None:
    """Mean over every non-missing value of every cluster; None when there is none.

    >>> pooled_mean([[1.0, None], [0.0, 0.0]])
    0.3333333333333333
    """
    sums, counts = _clusters(values)
    return float(sums.sum() / counts.sum()) if counts.size else None


def _bootstrap_stats(n: int, statistic, resamples: int, seed: int) -> np.ndarray:
    """STATISTIC(indices) for `resamples` draws of N indices with replacement (rows of an index matrix)."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, resamples, _CHUNK):
        idx = rng.integers(0, n, size=(min(_CHUNK, resamples - start), n))
        out.append(statistic(idx))
    return np.concatenate(out)


def _percentile(stats: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def cluster_bootstrap_ci(values: Sequence[Sequence[float | None]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the pooled mean, resampling whole clusters (prompts).

    VALUES holds one list per prompt (its K responses' values; None for missing). None when nothing is there.

    >>> cluster_bootstrap_ci([[1.0], [1.0]], resamples=50)
    (1.0, 1.0)
    """
    sums, counts = _clusters(values)
    if not counts.size:
        return None
    return _percentile(_bootstrap_stats(len(sums), lambda idx: sums[idx].sum(1) / counts[idx].sum(1), resamples, seed),
                       confidence)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion; None when n is 0.

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} must lie in [0, n={n}]")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of K successes in N fair coin flips (doubling the smaller tail, capped at 1).

    >>> binomial_two_sided_p(0, 5)  # 2 * (1/2)^5
    0.0625
    """
    if n == 0:
        return 1.0
    tail = min(k, n - k)
    # Exact in integers, then one division: no float error from summing small terms.
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(tail + 1)) / 2**n)


def sign_test_p(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test of paired differences (zeros dropped): is B above A as often as below?"""
    positive = sum(1 for d in diffs if d > 0)
    negative = sum(1 for d in diffs if d < 0)
    return binomial_two_sided_p(positive, positive + negative)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Exact McNemar test from the discordant pair counts (A right and B wrong, and the reverse)."""
    return binomial_two_sided_p(only_a, only_a + only_b)


def paired_bootstrap(diffs: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> PairedResult | None:
    """Mean of per-prompt differences with a paired percentile bootstrap interval and bootstrap p-value."""
    d = np.asarray([float(x) for x in diffs], dtype=float)
    if not d.size:
        return None
    mean = float(d.mean())
    boot = _bootstrap_stats(d.size, lambda idx: d[idx].mean(1), resamples, seed)
    low, high = _percentile(boot, confidence)
    # Re-centred on the null (mean difference 0); a small tolerance keeps an exact tie (all zeros) at p = 1.
    hits = int(np.sum(np.abs(boot - mean) >= abs(mean) - 1e-12))
    return PairedResult(diff=mean, low=low, high=high, p_value=(1 + hits) / (1 + resamples), n=int(d.size))


def paired_sign(diffs: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                confidence: float = CONFIDENCE) -> PairedResult | None:
    """Like `paired_bootstrap` (same estimate and interval) but with the exact sign test's p-value."""
    result = paired_bootstrap(diffs, resamples=resamples, seed=seed, confidence=confidence)
    if result is None:
        return None
    return PairedResult(diff=result.diff, low=result.low, high=result.high, p_value=sign_test_p(diffs), n=result.n)


# ---- judge calibration: ROC AUC and rank correlation ----------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(x.size, dtype=float)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC of SCORES for telling LABELS true from false: P(score of a true > score of a false), ties half.

    None when either class is missing (the AUC is undefined then).

    >>> roc_auc([0.9, 0.8, 0.1], [True, False, False])
    1.0
    >>> roc_auc([1, 1], [True, False])
    0.5
    """
    s = np.asarray([float(v) for v in scores], dtype=float)
    y = np.asarray([bool(v) for v in labels], dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U from average ranks.
    return float((_ranks(s)[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) points from (0, 0) to (1, 1), one per distinct threshold."""
    s = np.asarray([float(v) for v in scores], dtype=float)
    y = np.asarray([bool(v) for v in labels], dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return []
    points = [(0.0, 0.0)]
    for threshold in np.unique(s)[::-1]:
        above = s >= threshold
        points.append((float((above & ~y).sum() / n_neg), float((above & y).sum() / n_pos)))
    return points


def auc_bootstrap_ci(clusters: Sequence[Sequence[tuple[float, bool]]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile interval of the ROC AUC, resampling whole clusters (a prompt's (score, label) pairs together).

    Resamples that draw a single class have no AUC and are skipped. None when fewer than 2 clusters hold
    data, or when no resample has both classes.
    """
    kept = [list(c) for c in clusters if c]
    if len(kept) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pairs = [p for i in rng.integers(0, len(kept), size=len(kept)) for p in kept[i]]
        auc = roc_auc([p[0] for p in pairs], [p[1] for p in pairs])
        if auc is not None:
            values.append(auc)
    if not values:
        return None
    return _percentile(np.asarray(values), confidence)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson on average ranks); None with fewer than 3 pairs or a constant side.

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 40])
    1.0
    """
    a = np.asarray([float(v) for v in x], dtype=float)
    b = np.asarray([float(v) for v in y], dtype=float)
    if a.size < 3 or a.size != b.size:
        return None
    return pearson(_ranks(a), _ranks(b))


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 pairs or when either side is constant."""
    a = np.asarray(x, dtype=float)
    b = np.asarray(y, dtype=float)
    if a.size < 3 or a.size != b.size:
        return None
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return None if denom == 0 else max(-1.0, min(1.0, float((a * b).sum()) / denom))
