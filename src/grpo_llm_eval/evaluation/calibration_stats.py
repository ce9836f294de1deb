"""Calibration's own statistics: the AUC interval that says what it dropped, and length bias within each prompt.

- `auc_interval`: a percentile bootstrap of the ROC AUC over prompts (a prompt's responses resampled together).
  A resample that draws one class only has no AUC; it is dropped, and the share dropped is reported. Below
  MIN_PER_CLASS responses of either class no interval is given at all (with one right answer in 40 prompts a
  third of the resamples hold no right answer, and the rest say little).
- `length_bias`: the teacher's reward against response length within each (prompt, correctness class) cell, so
  that a prompt's difficulty (long answers to hard prompts, which are more often wrong and graded lower) does not
  pass for length bias: the ranks of length and reward are taken within each cell and centred on the cell's
  mean, then correlated over all cells of a class (a stratified Spearman correlation).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from grpo_llm_eval.evaluation import stats

MIN_PER_CLASS = 5  # fewer right (or wrong) responses than this: no AUC interval
RESAMPLES = 2000
CONFIDENCE = 0.95


def auc_interval(clusters: list[list[tuple[float, bool]]], seed: int = 0, resamples: int = RESAMPLES,
                 confidence: float = CONFIDENCE) -> tuple[list[float] | None, float | None, str | None]:
    """(interval, share of resamples dropped for holding one class only, reason when there is no interval)."""
    kept = [c for c in clusters if c]
    right = sum(1 for c in kept for _, label in c if label)
    wrong = sum(1 for c in kept for _, label in c if not label)
    if min(right, wrong) < MIN_PER_CLASS:
        return None, None, (f"{right} right and {wrong} wrong graded responses: an interval needs at least "
                            f"{MIN_PER_CLASS} of each")
    if len(kept) < 2:
        return None, None, "the responses come from one prompt: the bootstrap resamples prompts"
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pairs = [p for i in rng.integers(0, len(kept), size=len(kept)) for p in kept[i]]
        auc = stats.roc_auc([p[0] for p in pairs], [p[1] for p in pairs])
        if auc is not None:
            values.append(auc)
    dropped = 1 - len(values) / resamples
    if not values:
        return None, dropped, "no resample of the prompts held both classes"
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(np.asarray(values), [tail, 100 - tail])
    return [float(low), float(high)], dropped, None


def _centred_ranks(values: list[float]) -> np.ndarray:
    ranks = rankdata(np.asarray(values, dtype=float))
    return ranks - ranks.mean()


def length_bias(rows: list[dict]) -> tuple[float | None, dict]:
    """Size-weighted mean over the correctness classes of the within-prompt rank correlation of teacher reward
    with response length; per class: rho, n (responses in cells of 2 or more), prompts (such cells)."""
    by_class = {}
    for name, label in (("right", True), ("wrong", False)):
        cells: dict = {}
        for r in rows:
            if r.get("answer_correct") is label and r.get("teacher_reward") is not None:
                cells.setdefault(r.get("prompt_index"), []).append((len(r["response"]), r["teacher_reward"]))
        cells = {k: c for k, c in cells.items() if len(c) >= 2}
        x = np.concatenate([_centred_ranks([p[0] for p in c]) for c in cells.values()]) if cells else np.empty(0)
        y = np.concatenate([_centred_ranks([p[1] for p in c]) for c in cells.values()]) if cells else np.empty(0)
        rho = None
        if x.size >= 3 and np.any(x != 0):
            # The reward does not vary within any cell while lengths do: it does not follow length at all.
            rho = 0.0 if not np.any(y != 0) else stats.pearson(x.tolist(), y.tolist())
        by_class[name] = {"rho": rho, "n": int(x.size), "prompts": len(cells)}
    used = [c for c in by_class.values() if c["rho"] is not None]
    if not used:
        return None, by_class
    return sum(c["rho"] * c["n"] for c in used) / sum(c["n"] for c in used), by_class
