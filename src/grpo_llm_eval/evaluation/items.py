"""Per-item views of examples' own rubrics: records, step metrics, and pass rates for evaluate and the report.

An item's *verdict* is the teacher's (met: explicit score >= 0.5); its *check* is the program's, where the item has
one (``data/constraints.py``, through ``verifiers.checklist_results``). Items are keyed by their ids, which the
data keeps stable across rows (``bundled:instructions`` names them by constraint type), so pass rates pool an id
over every row that has it.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence

from grpo_llm_eval.teacher.grading.items import passed
from grpo_llm_eval.teacher.types import Judgement, RubricItem
from grpo_llm_eval.verifiers import checklist_results as _checklist_results
from grpo_llm_eval.verifiers import checklist_score as _checklist_score


def _as_dicts(items: Sequence[RubricItem]) -> list[dict]:
    return [{"id": i.id, "weight": i.weight, "check": None if i.check is None else json.loads(i.check)}
            for i in items]


def checklist_results(items: Sequence[RubricItem], text: str, think_close: str = "</think>") -> dict[str, bool]:
    """Each checkable item's programmatic verdict on TEXT's answer part (item id -> passed)."""
    if not any(i.check for i in items):
        return {}
    return _checklist_results(_as_dicts(items), text or "", think_close)


def checklist_score(items: Sequence[RubricItem], text: str, think_close: str = "</think>") -> float | None:
    """The checkable items' weighted share met (``verifiers.checklist_score``); None when none is checkable."""
    if not any(i.check for i in items):
        return None
    return _checklist_score(_as_dicts(items), text or "", think_close)


def item_records(rubric, judgement: Judgement | None, checks: dict[str, bool]) -> dict:
    """What ``rollouts.jsonl`` keeps per item: the teacher's score, verdict and explanation, and the check."""
    items = getattr(rubric, "items", ())
    scores = judgement.scores if judgement is not None and judgement.ok else {}
    verdicts = passed(scores, items) if rubric.aggregation == "explicit" else {}
    explanations = rubric.explanations(judgement.raw) if judgement is not None and judgement.ok else {}
    out = {i.id: {"weight": i.weight, "score": scores.get(i.id), "met": verdicts.get(i.id),
                  "explanation": explanations.get(i.id) or None, "check": checks.get(i.id),
                  "check_type": None if i.check is None else json.loads(i.check).get("type")} for i in items}
    score = rubric.score(scores) if scores else None
    return {"rubric_score": score, "items": out}


def item_metrics(rows: Iterable[dict]) -> dict[str, float]:
    """A batch's per-item rates: ``items/<id>/teacher_pass_rate`` and ``items/<id>/check_pass_rate``, and
    ``rubric/score_mean``; empty where no row has items."""
    teacher, check, scores = defaultdict(list), defaultdict(list), []
    for row in rows:
        for item_id, rec in (row.get("items") or {}).items():
            if rec.get("met") is not None:
                teacher[item_id].append(float(rec["met"]))
            if rec.get("check") is not None:
                check[item_id].append(float(rec["check"]))
        if row.get("rubric_score") is not None:
            scores.append(row["rubric_score"])
    out = {f"items/{k}/teacher_pass_rate": statistics.fmean(v) for k, v in sorted(teacher.items())}
    out.update({f"items/{k}/check_pass_rate": statistics.fmean(v) for k, v in sorted(check.items())})
    if scores:
        out["rubric/score_mean"] = statistics.fmean(scores)
    return out


def all_met(record: dict, source: str = "check") -> bool | None:
    """Whether every item of a record with verdicts passed (None: no item has one)."""
    values = [item.get(source) for item in (record.get("items") or {}).values() if item.get(source) is not None]
    return all(values) if values else None


def item_auc(rows: Iterable[dict], seed: int = 0, min_per_class: int = 5) -> dict[str, dict]:
    """Per constraint type (an item's ``check_type``): how well the teacher's item score tells the program's
    met from not met. ROC AUC with a 95 % interval (bootstrap over prompts, a prompt's items together), the counts,
    and both pass rates. No interval (and ``auc_ci`` None) with fewer than MIN_PER_CLASS of either class.

    ROWS are graded sample rows (``prompt_index``, ``judge_status``, ``items``), as calibrate writes them.
    """
    from grpo_llm_eval.evaluation import stats

    by_type: dict[str, dict[int, list[tuple[float, bool]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row.get("judge_status") != "ok":
            continue
        for item in (row.get("items") or {}).values():
            if item.get("check_type") is None or item.get("check") is None or item.get("score") is None:
                continue
            by_type[item["check_type"]][row.get("prompt_index", 0)].append((float(item["score"]), bool(item["check"])))
    out = {}
    for kind, clusters in sorted(by_type.items()):
        pairs = [p for c in clusters.values() for p in c]
        n_met = sum(1 for p in pairs if p[1])
        auc = stats.roc_auc([p[0] for p in pairs], [p[1] for p in pairs])
        enough = min(n_met, len(pairs) - n_met) >= min_per_class
        ci = stats.auc_bootstrap_ci(list(clusters.values()), seed=seed) if auc is not None and enough else None
        out[kind] = {"auc": auc, "auc_ci": None if ci is None else list(ci), "n": len(pairs), "n_met": n_met,
                     "n_unmet": len(pairs) - n_met, "check_pass_rate": n_met / len(pairs),
                     "teacher_pass_rate": sum(p[0] >= 0.5 for p in pairs) / len(pairs)}
    return out


def item_auc_lines(table: dict[str, dict]) -> list[str]:
    """``item_auc`` as table lines: one per constraint type."""
    lines = []
    for kind, e in table.items():
        auc = "null" if e["auc"] is None else f"{e['auc']:.3f}"
        ci = f" [{e['auc_ci'][0]:.3f}, {e['auc_ci'][1]:.3f}]" if e["auc_ci"] else ""
        lines.append(f"  {kind}: AUC {auc}{ci}  ({e['n_met']} met, {e['n_unmet']} not met by the check; teacher "
                     f"passes {e['teacher_pass_rate']:.0%}, the check {e['check_pass_rate']:.0%})")
    return lines
