"""`grpo_llm_eval calibrate`: measure the teacher against checks that do not depend on it, before training on it.

K sampled responses per held-out prompt (evaluate.py's generation; or the rows of a given responses file),
plus a dozen "master key" responses, are graded by the configured teacher (evaluate.py's grading) and by the
verifier. Measured (keys of DIR/calibration.json; every row is in DIR/calibration_rollouts.jsonl):

- `answer_auc`: ROC AUC of the teacher's answer score (the `answer` criterion; the teacher's reward when the
  rubric has none) against the verifier's answer check, with `answer_auc_ci` (95 %, bootstrap over prompts;
  `answer_auc_ci_dropped` the share of resamples dropped for holding one class; no interval, with a reason,
  below 5 responses of either class), `n_right`, `n_wrong`; `reward_auc`, `reward_auc_ci`: the same for the teacher's total reward. 1 is a
  perfect judge, 0.5 chance, 0 a judge that prefers wrong answers.
- `length_bias`: Spearman correlation of the teacher's reward with response length (characters) within each
  prompt and correctness class (ranks centred per prompt, so prompt difficulty does not count), averaged over
  the classes weighted by size: a judge that only tracks correctness scores
  0, one that rewards length within a class scores towards 1.
- `self_disagreement` (teacher_temperature > 0): the mean absolute difference between two grades of the same
  response's answer score, as a share of the scale. With `teacher_samples` > 1 it is read from the samples each
  grade already holds (the mean over every pair of them: for k = 2 the same number), with no extra calls;
  otherwise each response is graded once more without the cache and with another seed (`repeat_config`: the
  same seed would draw the same grade again). Null at temperature 0, with a reason.
- `position_flip_rate`: group judging with `group_judge_passes: 2` only: the share of groups whose ranking by
  teacher reward flipped when the order was reversed; null with a reason otherwise.
- `master_key_pass_rate`: the share of master-key responses (no answer at all, from "One Token to Fool
  LLM-as-a-Judge", arXiv 2507.08794) whose answer score is above the middle of the answer scale (on an example's
  own rubric: graded met on an item whose programmatic check fails, or scored above 0.5 where no item has one).
  Each master key is graded in group mode as a group of one, apart from the sampled responses, so neither its
  grade nor theirs depends on how many samples or keys the calibration holds.
- `item_auc` (examples with their own rubrics): per constraint type, the ROC AUC of the teacher's item score
  against the item's programmatic check, with its interval, counts and both pass rates (`items.item_auc`).
- `verdict`: one line naming the worst finding.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

from grpo_llm_eval import data as data_mod
from grpo_llm_eval.data.rubrics import from_json, rows_items, to_json
from grpo_llm_eval.evaluation import calibration_stats, stats
from grpo_llm_eval.evaluation import evaluate as ev
from grpo_llm_eval.evaluation.calibration_verdict import (  # noqa: F401 (re-exported: the CLI and tests use them)
    CHANCE_AUC,
    ROLLOUTS_FILE,
    format_table,
    verdict,
)
from grpo_llm_eval.evaluation.items import item_auc
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.training.records import JsonlWriter, dumps, read_jsonl

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
# Responses with no answer that strong judges were shown to accept: the "master keys" of arXiv 2507.08794
# (non-word symbols, reasoning openers, the same in other languages), plus two openers of our own.
MASTER_KEYS = (" ", ".", ",", ":", "Thought process:", "Let's solve this problem step by step.", "Solution",
               "解", "かいせつ", "Respuesta", "Let's solve this step by step.", "The answer is")
GRADE_CHUNK = 64  # responses per teacher batch: a progress line each (a local teacher grades about 3 a second)


class CalibrationError(ValueError):
    """The calibration cannot run as asked (an empty or unreadable responses file, a bad --samples)."""


def answer_scale(rubric) -> tuple[str | None, float, float]:
    """(criterion used as the answer score, its min, its max); (None, ...) when the rubric has no `answer`."""
    for c in rubric.criteria:
        if c.name == "answer":
            return c.name, float(c.min), float(c.max)
    return None, float("nan"), float("nan")


def answer_score(row: dict, criterion: str | None) -> float | None:
    """The teacher's answer score of a graded row (its reward when the rubric has no answer criterion)."""
    if row.get("judge_status") != "ok":
        return None
    if row.get("items"):  # graded on the example's own rubric: no answer criterion; its score in [0, 1]
        return row.get("rubric_score")
    value = (row.get("scores") or {}).get(criterion) if criterion else row.get("teacher_reward")
    return None if value is None else float(value)


# ---- measuring ------------------------------------------------------------------------------------


def _auc(rows: list[dict], value, seed: int) -> tuple[float | None, list | None, list[tuple[float, bool]], float | None,
                                                 str | None]:
    """(AUC, its interval, the pairs, share of resamples dropped, why there is no interval)."""
    pairs_by_prompt: dict[int, list[tuple[float, bool]]] = {}
    for r in rows:
        v = value(r)
        if v is not None and r.get("answer_correct") is not None:
            pairs_by_prompt.setdefault(r["prompt_index"], []).append((v, bool(r["answer_correct"])))
    pairs = [p for ps in pairs_by_prompt.values() for p in ps]
    auc = stats.roc_auc([p[0] for p in pairs], [p[1] for p in pairs])
    if auc is None:
        return None, None, pairs, None, None
    ci, dropped, why = calibration_stats.auc_interval(list(pairs_by_prompt.values()), seed=seed)
    return auc, ci, pairs, dropped, why


length_bias = calibration_stats.length_bias  # within each prompt (see calibration_stats.py)


def measure(rows: list[dict], rubric, seed: int = 0, judge_mode: str = "pointwise") -> dict:
    """calibration.json's content from the graded rows (pure: tests recompute it from the rollouts file)."""
    criterion, low, high = answer_scale(rubric)
    samples = [r for r in rows if r["kind"] == "sample"]
    keys = [r for r in rows if r["kind"] == "master_key"]
    auc, auc_ci, pairs, dropped, no_ci = _auc(samples, lambda r: answer_score(r, criterion), seed)
    reward_auc, reward_ci, _, reward_dropped, _ = _auc(
        samples, lambda r: r.get("teacher_reward") if r.get("judge_status") == "ok" else None, seed)
    bias, bias_by_class = length_bias(samples)
    result = {
        "answer_auc": auc, "answer_auc_ci": auc_ci,
        "n_right": sum(1 for p in pairs if p[1]), "n_wrong": sum(1 for p in pairs if not p[1]),
        "answer_auc_ci_dropped": dropped, "reward_auc_ci_dropped": reward_dropped,
        "reward_auc": reward_auc, "reward_auc_ci": reward_ci,
        "length_bias": bias, "length_bias_by_class": bias_by_class,
        "self_disagreement": None, "position_flip_rate": None,
        "master_key_pass_rate": None, "master_keys_passed": [],
        "n_responses": len(samples), "n_prompts": len({r["prompt_index"] for r in samples}),
        "judge_failure_rate": (sum(1 for r in rows if r.get("judge_status") != "ok") / len(rows)) if rows else None,
        "answer_score": criterion or "teacher_reward", "answer_scale": [low, high] if criterion else None,
        "judge_mode": judge_mode, "null_reasons": {},
        "item_auc": item_auc(samples, seed=seed),
    }
    reasons = result["null_reasons"]
    if auc is None and result["item_auc"]:
        reasons["answer_auc"] = "no ground truths: the rows are graded on their own rubrics (see item_auc)"
    elif auc is None:
        reasons["answer_auc"] = (f"the verifier found {result['n_right']} right and {result['n_wrong']} wrong "
                                 "graded responses; both are needed (raise --samples or --limit, or use a model "
                                 "that gets some answers right)")
    if auc is not None and no_ci is not None:
        reasons["answer_auc_ci"] = no_ci
    flips = {r["judge_group_id"]: r["position_flip"] for r in samples
             if r.get("position_flip") is not None and r.get("judge_group_id")}
    if flips:
        result["position_flip_rate"] = sum(flips.values()) / len(flips)
    elif judge_mode != "group":
        reasons["position_flip_rate"] = "pointwise judging grades one response at a time: there is no position"
    else:
        reasons["position_flip_rate"] = ("no group was graded in two orders with two comparable grades; set "
                                         "group_judge_passes: 2")
    repeats = [grades for grades in (repeated_scores(r, criterion) for r in samples) if len(grades) >= 2]
    if repeats:
        scale = (high - low) if criterion else max(1e-9, max(abs(v) for p in repeats for v in p))
        result["self_disagreement"] = sum(mean_pair_difference(p) for p in repeats) / len(repeats) / scale
    else:
        reasons["self_disagreement"] = "teacher_temperature is 0: a repeated grade is the same grade"
    graded_keys = [(r, answer_score(r, criterion)) for r in keys]
    graded_keys = [(r, s) for r, s in graded_keys if s is not None]
    if graded_keys:
        # Midpoint of the answer scale; without an answer criterion, the middle of the graded samples' rewards.
        mid = (low + high) / 2 if criterion else _midrange([r.get("teacher_reward") for r in samples])
        passed = [r["response"] for r, s in graded_keys if _key_passed(r, s, mid)]
        result["master_key_pass_rate"] = len(passed) / len(graded_keys)
        result["master_keys_passed"] = passed
    else:
        reasons["master_key_pass_rate"] = "no master-key response was graded (every grade failed)"
    result["verdict"] = verdict(result)
    return result


def _key_passed(row: dict, score: float, mid: float | None) -> bool:
    """Whether an answerless response fooled the teacher. On an example's own rubric: the teacher says met where
    a programmatic check says not met (an answerless text may truly meet "no commas"), or, with no checks, its
    score in [0, 1] is above 0.5; otherwise its answer score is above MID."""
    if row.get("items"):
        checked = [i for i in row["items"].values() if i.get("check") is not None and i.get("met") is not None]
        if checked:
            return any(i["met"] and not i["check"] for i in checked)
        return score > 0.5
    return mid is not None and score > mid


def repeated_scores(row: dict, criterion: str | None) -> list[float]:
    """The answer scores of a row's repeated grades: its ok teacher_samples, else its grade and its repeat."""
    if row.get("sample_answer_scores") is not None:
        return [v for v in row["sample_answer_scores"] if v is not None]
    pair = [answer_score(row, criterion), row.get("repeat_answer_score")] if "repeat_answer_score" in row else []
    return pair if None not in pair else []


def mean_pair_difference(values: list[float]) -> float:
    """Mean absolute difference over every pair of VALUES.

    >>> mean_pair_difference([0.0, 2.0, 4.0])
    2.6666666666666665
    """
    diffs = [abs(a - b) for i, a in enumerate(values) for b in values[i + 1:]]
    return sum(diffs) / len(diffs)


def _midrange(values) -> float | None:
    vals = [v for v in values if v is not None]
    return (min(vals) + max(vals)) / 2 if vals else None


# ---- the command ----------------------------------------------------------------------------------


def read_responses(path: str | Path, rubric_column: str = "rubric") -> list[dict]:
    """Rows of a responses file (JSONL: question, response or completion, answer or ground_truth) as samples.

    A calibration_rollouts.jsonl is one too (its master-key rows are left out: they are added again), so the
    same responses can be graded by another teacher.
    """
    rows = [r for r in read_jsonl(path) if r.get("kind") != "master_key"]
    if not rows:
        raise CalibrationError(f"--responses {path}: no rows; expected JSONL with question, response, answer.")
    prompts: dict[str, int] = {}
    out = []
    try:
        own = rows_items(rows, rubric_column, f"--responses {path}")
    except ValueError as exc:
        raise CalibrationError(str(exc)) from None
    for i, row in enumerate(rows):
        response = next((row[k] for k in ("response", "completion") if row.get(k) is not None), None)
        truth = next((row[k] for k in ("answer", "ground_truth") if row.get(k) not in (None, "")), None)
        if response is None or (truth is None and not own[i]):
            raise CalibrationError(f"--responses {path}: row {i + 1} lacks a response, or both an answer and a "
                                   f"rubric ({rubric_column!r}); every row needs question, response and one of them.")
        question = str(row.get("question", ""))
        out.append({"question": question, "response": str(response), "ground_truth": None if truth is None else str(truth),
                    "prompt_index": prompts.setdefault(question, len(prompts)), "rubric": to_json(own[i])})
    return out


def sample_responses(cfg, model: str, split: str, limit: int, samples: int, batch_size: int) -> list[dict]:
    """SAMPLES responses of MODEL per prompt of SPLIT (the first LIMIT), by evaluate.py's generation."""
    loaded = data_mod.load_rows(cfg, split)
    dataset = loaded.dataset.select(range(min(limit, len(loaded.dataset)))) if limit > 0 else loaded.dataset
    dataset = data_mod.build_prompts(dataset, cfg)
    resolved = ev.resolve_eval_model(model, cfg.cache_dir)
    lm, tokenizer = ev.load_eval_model(resolved)
    start = time.perf_counter()
    logger.info("Sampling %d response(s) to each of %d prompts of split %s with %s", samples, len(dataset), split,
                model)
    texts = ev.generate_responses(lm, tokenizer, list(dataset["prompt"]), max_new_tokens=cfg.max_new_tokens,
                                  max_prompt_tokens=cfg.max_seq_length, samples=samples,
                                  temperature=cfg.temperature if samples > 1 else 0.0, top_p=cfg.top_p,
                                  top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty, batch_size=batch_size,
                                  seed=cfg.seed)
    del lm
    ev._free_memory()
    logger.info("sampled %d responses in %.0f s", sum(len(t) for t in texts), time.perf_counter() - start)
    own = list(dataset["rubric"]) if "rubric" in dataset.column_names else [""] * len(dataset)
    return [{"question": q, "response": t, "ground_truth": a or None, "prompt_index": p, "rubric": r}
            for p, (q, a, r, ts) in enumerate(zip(dataset["question"], dataset["answer"], own, texts, strict=True))
            for t in ts]


async def _judge_apart(teacher, requests: list[JudgeRequest]):
    """Each request in a judge call of its own, concurrently: in group mode each is then a group of one."""
    return [js[0] for js in await asyncio.gather(*(teacher.judge([r]) for r in requests))]


REPEAT_SEED_OFFSET = 1_000_003  # far from the seeds teacher_samples uses (seed + sample index)


def repeat_config(cfg):
    """CFG for the repeated grading of self_disagreement: another sampling seed, so that a seeded sampler (the
    local backend) draws a second grade instead of the same one again. (In group mode the seed also shuffles the
    order, so the repeat is shown in another order too.)"""
    import dataclasses

    return dataclasses.replace(cfg, seed=cfg.seed + REPEAT_SEED_OFFSET)


def _batches(items: list[dict], indices: list[int]) -> list[list[int]]:
    """INDICES in batches of about GRADE_CHUNK that never split one prompt's responses (a group would change)."""
    batches: list[list[int]] = [[]]
    for i in indices:
        if len(batches[-1]) >= GRADE_CHUNK and items[i]["prompt_index"] != items[batches[-1][-1]]["prompt_index"]:
            batches.append([])
        batches[-1].append(i)
    return [b for b in batches if b]


def _grade(loop, teacher, cfg, rubric, items: list[dict]) -> list[dict]:
    """Grade ITEMS. In group mode the master keys are graded apart, each a group of one: inside their question's
    real group they would change its grades, and theirs would depend on the calibration's size."""
    requests = [JudgeRequest(it["question"], it["response"], it["ground_truth"], rubric=from_json(it.get("rubric")))
                for it in items]
    apart = [i for i, it in enumerate(items) if it["kind"] == "master_key"] if cfg.judge_mode == "group" else []
    together = sorted(set(range(len(items))) - set(apart), key=lambda i: (items[i].get("prompt_index", 0), i))
    judgements, done, start = [None] * len(items), 0, time.perf_counter()
    for batch in _batches(items, together):
        for i, j in zip(batch, loop.run_until_complete(teacher.judge([requests[i] for i in batch])), strict=True):
            judgements[i] = j
        done += len(batch)
        logger.info("graded %d/%d responses (%.0f s)", done, len(items), time.perf_counter() - start)
    if apart:
        for i, j in zip(apart, loop.run_until_complete(_judge_apart(teacher, [requests[i] for i in apart])),
                        strict=True):
            judgements[i] = j
    rows = ev.grade_rows(cfg, rubric, judgements, [it["question"] for it in items], [it["response"] for it in items],
                         [it["ground_truth"] for it in items], [r.rubric for r in requests])
    criterion = answer_scale(rubric)[0]
    for row, j, req in zip(rows, judgements, requests, strict=True):
        if "samples" in j.extra:  # teacher_samples > 1: each ok sample's answer score, for self_disagreement
            row["sample_answer_scores"] = [
                answer_score({"judge_status": s["status"], "scores": s["scores"],
                              "teacher_reward": rubric.reward(s["scores"], req.rubric) if s["status"] == "ok" else None},
                             criterion)
                for s in j.extra["samples"] if s["status"] == "ok"]
    return rows


def calibrate(cfg, output: str | Path, model: str | None = None, limit: int = 0, samples: int = 4,
              responses: str | Path | None = None, split: str | None = None, batch_size: int = 16) -> dict:
    """Measure the configured teacher (see the module doc); write calibration.json and the rollouts; return it."""
    if samples < 1:
        raise CalibrationError(f"--samples {samples}: must be at least 1 (4 or more gives right and wrong answers).")
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model = model or cfg.student_model_name
    split = split or cfg.eval_split
    items = read_responses(responses, cfg.dataset_rubric_column) if responses else sample_responses(cfg, model, split, limit, samples, batch_size)
    items = [{"kind": "sample", **it} for it in items]
    questions = sorted({(it["prompt_index"], it["question"], it["ground_truth"] or "", it.get("rubric") or "")
                        for it in items})
    items += [{"kind": "master_key", "question": q, "response": key, "ground_truth": truth or None, "prompt_index": p,
               "rubric": own}
              for key, (p, q, truth, own) in zip(MASTER_KEYS, (questions * len(MASTER_KEYS))[:len(MASTER_KEYS)],
                                                 strict=True)]
    rubric = Rubric.from_config(cfg)
    criterion = answer_scale(rubric)[0]
    teacher = build_teacher(cfg, rubric, cache_path=out / "judgements.sqlite")
    # teacher_samples > 1 grades each response several times already: its samples give self_disagreement.
    repeat = (build_teacher(repeat_config(cfg), rubric, cache_path=None)
              if cfg.teacher_temperature > 0 and cfg.teacher_samples == 1 else None)
    loop = asyncio.new_event_loop()  # one loop for every call: the teacher's client is bound to its loop
    try:
        loop.run_until_complete(teacher.health_check())
        rows = [{**it, **row} for it, row in zip(items, _grade(loop, teacher, cfg, rubric, items), strict=True)]
        if repeat is not None:
            logger.info("teacher_temperature %.2g > 0: grading the samples again for self_disagreement",
                        cfg.teacher_temperature)
            again = _grade(loop, repeat, cfg, rubric, [it for it in items if it["kind"] == "sample"])
            for row, second in zip((r for r in rows if r["kind"] == "sample"), again, strict=True):
                row["repeat_answer_score"] = answer_score(second, criterion)
    finally:
        try:
            for t in (teacher, repeat):
                if t is not None:
                    loop.run_until_complete(t.aclose())
        finally:
            loop.close()
    tmp = out / (ROLLOUTS_FILE + ".partial")
    tmp.unlink(missing_ok=True)
    writer = JsonlWriter(tmp)
    writer.write_many(rows)
    writer.close()
    os.replace(tmp, out / ROLLOUTS_FILE)
    result = measure(read_jsonl(out / ROLLOUTS_FILE), rubric, seed=cfg.seed, judge_mode=cfg.judge_mode)
    result.update(model=None if responses else model, responses=str(responses) if responses else None, split=split,
                  limit=limit, samples=None if responses else samples, teacher=cfg.teacher_model_name,
                  teacher_backend=cfg.teacher_backend, answer_roc=_roc(rows, criterion))
    part = out / (CALIBRATION_FILE + ".partial")
    part.write_text(json.dumps(json.loads(dumps(result)), indent=2) + "\n", encoding="utf-8")
    os.replace(part, out / CALIBRATION_FILE)
    return result


def _roc(rows: list[dict], criterion: str | None) -> list[list[float]]:
    pairs = [(answer_score(r, criterion), r["answer_correct"]) for r in rows if r["kind"] == "sample"]
    pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
    return [list(p) for p in stats.roc_curve([p[0] for p in pairs], [p[1] for p in pairs])]
