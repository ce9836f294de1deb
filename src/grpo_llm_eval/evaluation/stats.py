"""Statistics for evaluation summaries: confidence intervals and paired comparisons, from the libraries made for
them: scipy.stats (`binomtest` for the exact binomial, sign and McNemar tests and the Wilson interval;
`bootstrap`; `spearmanr`, `pearsonr`) and scikit-learn (`roc_auc_score`, `roc_curve`). What is left here is
the thin layer no library has: the cluster bootstrap over a prompt's samples (for means, through scipy's paired
bootstrap of per-prompt sums and counts; for the ROC AUC, a loop over resampled prompts), the bootstrap
p-value, and None where a statistic is undefined.

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

import numpy as np
from scipy import stats as sps
from sklearn import metrics as skm

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
_CHUNK = 256  # resamples scipy draws at once: bounds memory to _CHUNK x prompts indices


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


def _bootstrap(samples: tuple[np.ndarray, ...], statistic, resamples: int, seed: int, confidence: float):
    """scipy.stats.bootstrap's percentile interval, resampling the rows of SAMPLES together (paired), and the
    bootstrap distribution; one row (scipy needs two) gives its own value as a point."""
    if samples[0].size < 2:
        value = float(statistic(*samples, axis=-1))
        return (value, value), np.full(resamples, value)
    res = sps.bootstrap(samples, statistic, n_resamples=resamples, paired=True, vectorized=True,
                        confidence_level=confidence, method="percentile", batch=_CHUNK,
                        rng=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high)), res.bootstrap_distribution


def _ratio_of_sums(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.sum(sums, axis=axis) / np.sum(counts, axis=axis)


def cluster_bootstrap_ci(values: Sequence[Sequence[float | None]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the pooled mean, resampling whole clusters (prompts).

    VALUES holds one list per prompt (its K responses' values; None for missing). None when nothing is there.
    A prompt's sum and count are resampled as a pair (scipy's paired bootstrap), so its K values move together.

    >>> cluster_bootstrap_ci([[1.0], [1.0]], resamples=50)
    (1.0, 1.0)
    """
    sums, counts = _clusters(values)
    if not counts.size:
        return None
    return _bootstrap((sums, counts), _ratio_of_sums, resamples, seed, confidence)[0]


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (scipy's `binomtest(...).proportion_ci`); None when n is 0.

    >>> [round(x, 4) for x in wilson_interval(5, 10)]
    [0.2366, 0.7634]
    """
    if n <= 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} must lie in [0, n={n}]")
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return max(0.0, float(ci.low)), min(1.0, float(ci.high))


def binomial_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p-value of K successes in N fair coin flips (scipy's `binomtest`; 1 when N is 0).

    >>> binomial_two_sided_p(0, 5)  # 2 * (1/2)^5
    0.0625
    """
    if n == 0:
        return 1.0
    return min(1.0, float(sps.binomtest(int(k), int(n), 0.5).pvalue))


def sign_test_p(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test of paired differences (zeros dropped): is B above A as often as below?"""
    positive = sum(1 for d in diffs if d > 0)
    negative = sum(1 for d in diffs if d < 0)
    return binomial_two_sided_p(positive, positive + negative)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Exact McNemar test from the discordant pair counts (A right and B wrong, and the reverse): the exact
    binomial test on the discordant pairs, as statsmodels' `mcnemar(exact=True)` computes it."""
    return binomial_two_sided_p(only_a, only_a + only_b)


def paired_bootstrap(diffs: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                     confidence: float = CONFIDENCE) -> PairedResult | None:
    """Mean of per-prompt differences with a paired percentile bootstrap interval and bootstrap p-value."""
    d = np.asarray([float(x) for x in diffs], dtype=float)
    if not d.size:
        return None
    mean = float(d.mean())
    (low, high), boot = _bootstrap((d,), np.mean, resamples, seed, confidence)
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


def _scores_labels(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray] | None:
    """Arrays of scores and labels; None when either class is missing (the ROC is undefined then)."""
    s = np.asarray([float(v) for v in scores], dtype=float)
    y = np.asarray([bool(v) for v in labels], dtype=bool)
    return (s, y) if y.any() and not y.all() else None


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """ROC AUC of SCORES for telling LABELS true from false (scikit-learn's `roc_auc_score`): P(score of a true >
    score of a false), ties half. None when either class is missing (the AUC is undefined then).

    >>> roc_auc([0.9, 0.8, 0.1], [True, False, False])
    1.0
    >>> roc_auc([1, 1], [True, False])
    0.5
    """
    data = _scores_labels(scores, labels)
    return None if data is None else float(skm.roc_auc_score(data[1], data[0]))


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> list[tuple[float, float]]:
    """(false positive rate, true positive rate) points from (0, 0) to (1, 1), one per distinct threshold
    (scikit-learn's `roc_curve`, keeping every threshold)."""
    data = _scores_labels(scores, labels)
    if data is None:
        return []
    fpr, tpr, _ = skm.roc_curve(data[1], data[0], drop_intermediate=False)
    return [(float(x), float(y)) for x, y in zip(fpr, tpr, strict=True)]


def auc_bootstrap_ci(clusters: Sequence[Sequence[tuple[float, bool]]], *, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Percentile interval of the ROC AUC, resampling whole clusters (a prompt's (score, label) pairs together).

    Resamples that draw a single class have no AUC and are skipped (scipy's bootstrap has no way to skip one,
    hence this loop). Each resample's AUC is scipy's Mann-Whitney U over (right count x wrong count), the same
    number as `roc_auc` (to the last bit or two) at a third of scikit-learn's per-call cost. None when fewer than
    2 clusters hold data, or when no resample has both classes.
    """
    kept = [(np.asarray([float(p[0]) for p in c]), np.asarray([bool(p[1]) for p in c])) for c in clusters if c]
    if len(kept) < 2:
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(kept), size=len(kept))
        s = np.concatenate([kept[i][0] for i in drawn])
        y = np.concatenate([kept[i][1] for i in drawn])
        n_pos = int(y.sum())
        if 0 < n_pos < y.size:
            u = sps.mannwhitneyu(s[y], s[~y], method="asymptotic").statistic
            values.append(float(u) / (n_pos * (y.size - n_pos)))
    if not values:
        return None
    alpha = 1.0 - confidence
    low, high = np.quantile(np.asarray(values), [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _pairs(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray] | None:
    """Float arrays of X and Y; None with fewer than 3 pairs, unequal lengths, or a constant side (no correlation)."""
    a = np.asarray([float(v) for v in x], dtype=float)
    b = np.asarray([float(v) for v in y], dtype=float)
    if a.size < 3 or a.size != b.size or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return a, b


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (scipy's `spearmanr`: ties share their average rank); None with fewer than 3
    pairs or a constant side.

    >>> spearman([1, 2, 3, 4], [10, 20, 30, 40])
    1.0
    """
    data = _pairs(x, y)
    return None if data is None else _finite(sps.spearmanr(*data).statistic)


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation (scipy's `pearsonr`); None with fewer than 3 pairs or when either side is constant."""
    data = _pairs(x, y)
    return None if data is None else _finite(sps.pearsonr(*data).statistic)


def _finite(r) -> float | None:
    r = float(r)
    return max(-1.0, min(1.0, r)) if math.isfinite(r) else None
