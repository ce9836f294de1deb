"""The reward TRL calls: the teacher's rubric grade plus optional verifier checks, combined by weight.

One reward function rather than several: TRL masks a completion only when every reward function returns None,
so a failed grade beside a verifier would otherwise be scored on the verifier alone, which makes the
completions of one group incomparable. Here a failed grade masks the whole completion (reward None).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import statistics
import time
from collections import Counter

from grpo_llm_eval.data.rubrics import from_json
from grpo_llm_eval.evaluation.items import checklist_results, checklist_score, item_metrics, item_records
from grpo_llm_eval.teacher.types import Judgement, JudgeRequest
from grpo_llm_eval.verifiers import answer_correct, format_correct

logger = logging.getLogger(__name__)


def completion_text(completion) -> str:
    """Plain text of a TRL completion (conversational list of messages, or a string)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))


def prompt_text(prompt) -> str:
    """The last user turn of a conversational prompt (or the prompt string)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
    return str(users[-1]) if users else ""


class TeacherRubricReward:
    """TRL reward function `(prompts, completions, **columns) -> list[float | None]`.

    reward = teacher_weight * Σ_c weight_c * score_c + verifier_answer_weight * [answer right]
             + verifier_format_weight * [format right] + verifier_checklist_weight * (share of checkable items met);
    None when the teacher part is needed and missing. With an example's own rubric, the teacher part is that
    rubric's score times the config rubric's top reward (teacher/grading/items.py).

    >>> # with a teacher that gives answer=10 (weight 0.1) and verifier_answer_weight=1 on a right answer:
    >>> # reward = 1.0 * (0.1 * 10) + 1 * 1 = 2.0
    """

    __name__ = "teacher_rubric"

    def __init__(self, cfg, rubric, teacher, recorder=None):
        self.cfg = cfg
        self.rubric = rubric
        self.teacher = teacher
        self.recorder = recorder
        self.last_judge_wall_s = 0.0  # judging time of the last scored batch, start to finish
        self.last_judge_wait_s = 0.0  # the part of it the trainer waited for (the rest overlapped other work)
        # Judging started ahead, per batch content, oldest first: two batches of identical (question, text) tuples
        # (a collapsed policy) each keep their own paid call, scored in the order they were sampled.
        self._ahead: dict[tuple, collections.deque[concurrent.futures.Future]] = {}
        # on_budget_end: verifier_only, once the run's teacher budget is spent (training/judge_spend.py): no more
        # teacher calls, and every batch is rewarded by the verifiers alone.
        self.verifier_only = False

    @staticmethod
    def _columns(prompts, completions, answer, question, rubric=None):
        texts = [completion_text(c) for c in completions]
        questions = question if question is not None else [prompt_text(p) for p in prompts]
        # An empty answer is no ground truth (rows that carry their own rubric may have none).
        truths = [None if a is None or not str(a).strip() else str(a) for a in (answer or [None] * len(texts))]
        items = [from_json(r) for r in (rubric or [""] * len(texts))]
        return list(questions), texts, truths, items

    def judge_in_background(self, loop, prompts, completions, rows: list[dict]) -> None:
        """Start grading a sampled batch on LOOP now; the call that later scores the same batch awaits it."""
        if self.cfg.teacher_weight <= 0 or self.teacher is None or self.verifier_only:
            return
        answer = [r.get("answer") for r in rows] if rows and "answer" in rows[0] else None
        question = [r.get("question") for r in rows] if rows and "question" in rows[0] else None
        rubric = [r.get("rubric") for r in rows] if rows and "rubric" in rows[0] else None
        questions, texts, truths, items = self._columns(prompts, completions, answer, question, rubric)
        key = tuple(zip(questions, texts, strict=True))
        future = asyncio.run_coroutine_threadsafe(self._judge(questions, texts, truths, items), loop)
        self._ahead.setdefault(key, collections.deque()).append(future)

    def cancel_background(self) -> None:
        """Drop judging started for batches that will not be scored (the run stopped early)."""
        for futures in self._ahead.values():
            for future in futures:
                future.cancel()
        self._ahead.clear()

    async def __call__(self, prompts, completions, answer=None, question=None, rubric=None, log_metric=None, **_):
        questions, texts, truths, items = self._columns(prompts, completions, answer, question, rubric)
        key = tuple(zip(questions, texts, strict=True))
        queued = self._ahead.get(key)
        started = queued.popleft() if queued else None
        if queued is not None and not queued:
            del self._ahead[key]
        wait_from = time.perf_counter()
        if started is not None:
            judgements, self.last_judge_wall_s = await asyncio.wrap_future(started)
        else:
            judgements, self.last_judge_wall_s = await self._judge(questions, texts, truths, items)
        self.last_judge_wait_s = min(self.last_judge_wall_s, time.perf_counter() - wait_from)
        if self.cfg.on_budget_end == "verifier_only" and (
                self.verifier_only or any(j is not None and j.status == "budget_spent" for j in judgements)):
            # The whole batch on the verifiers, so that no group mixes teacher-graded and verifier-only rewards.
            judgements = [None] * len(texts)
        rows = [self.score(j, t, g, i) for j, t, g, i in zip(judgements, texts, truths, items, strict=True)]
        if self.recorder is not None:
            self.recorder.add_local(prompts, questions, texts, truths, judgements, rows)
        if log_metric is not None:
            for name, value in self.batch_metrics(judgements, rows).items():
                log_metric(name, value)
        return [r["reward"] for r in rows]

    async def _judge(self, questions, texts, truths, items) -> tuple[list[Judgement | None], float]:
        """The teacher's judgements of a batch, and the wall time they took."""
        if self.cfg.teacher_weight <= 0 or self.teacher is None or self.verifier_only:
            return [None] * len(texts), 0.0
        requests = [JudgeRequest(q, t, g, rubric=i) for q, t, g, i in zip(questions, texts, truths, items, strict=True)]
        start = time.perf_counter()
        judgements = await self.teacher.judge(requests)
        return judgements, time.perf_counter() - start

    def score(self, judgement: Judgement | None, text: str, truth: str | None, items: tuple = ()) -> dict:
        """The reward row of one completion: verifier checks, the teacher's reward and the weighted total; with the
        example's own rubric ITEMS, each item's grade and programmatic check too (``item_records``)."""
        cfg = self.cfg
        # None without a ground truth, or where nothing uses the check (it costs a call to math-verify).
        uses_check = cfg.verifier_answer_weight > 0 or cfg.verifier_veto or cfg.verifier_monitor
        right = answer_correct(text, truth, cfg.think_close_string) if uses_check else None
        fmt = format_correct(text, cfg.think_open_string, cfg.think_close_string)
        row = {"answer_correct": right, "format_correct": fmt, "teacher_reward": None, "reward": None}
        checks = checklist_results(items, text, cfg.think_close_string) if items else {}
        if items:
            row.update(item_records(self.rubric.for_items(items), judgement, checks))
        total = 0.0
        if judgement is not None:
            scores = dict(judgement.scores)
            if (cfg.verifier_veto and not items and right is False and "answer" in scores
                    and scores["answer"] is not None):
                lowest = next(c.min for c in self.rubric.criteria if c.name == "answer")
                scores["answer"] = min(scores["answer"], lowest)
                row["vetoed"] = True
            teacher_reward = self.rubric.reward(scores, items) if judgement.ok else None
            row["teacher_reward"] = teacher_reward
            if teacher_reward is None:
                return row  # masked: never a made-up score
            total += cfg.teacher_weight * teacher_reward
        if cfg.verifier_answer_weight:
            total += cfg.verifier_answer_weight * float(bool(right))
        if cfg.verifier_format_weight:
            total += cfg.verifier_format_weight * float(fmt)
        if cfg.verifier_checklist_weight and checks:
            total += cfg.verifier_checklist_weight * (checklist_score(items, text, cfg.think_close_string) or 0.0)
        row["reward"] = total
        return row

    def batch_metrics(self, judgements: list[Judgement | None], rows: list[dict]) -> dict[str, float]:
        """Scalar metrics of one batch, averaged over logging steps by TRL."""
        out: dict[str, float] = {}
        graded = [j for j in judgements if j is not None]
        checked = [r["answer_correct"] for r in rows if r["answer_correct"] is not None]
        if checked:
            out["verifier/answer_accuracy"] = sum(checked) / len(checked)
        out["verifier/format_rate"] = sum(r["format_correct"] for r in rows) / max(1, len(rows))
        if not graded:
            return out
        statuses = Counter(j.status for j in graded)
        out["judge/failure_rate"] = 1 - statuses.get("ok", 0) / len(graded)
        for status in statuses:
            if status != "ok":
                out[f"judge/status_{status}"] = statuses[status] / len(graded)
        live = [j for j in graded if not j.cached]
        out["judge/cache_hit_rate"] = 1 - len(live) / len(graded)
        out["judge/failures"] = float(sum(not j.ok for j in graded))
        out["judge/retries"] = float(sum(max(0, j.attempts - 1) for j in live))
        if live:
            out["judge/latency_mean_s"] = statistics.fmean(j.latency_s for j in live)
        out["judge/wall_s"] = self.last_judge_wall_s
        # judge_mode group with two passes: the share of groups whose ranking the presentation order flipped.
        flips = {j.extra["group_id"]: j.extra["position_flip"] for j in graded
                 if j.extra.get("position_flip") is not None and "group_id" in j.extra}
        if flips:
            out["judge/position_flip_rate"] = sum(flips.values()) / len(flips)
        for c in self.rubric.criteria:
            vals = [j.scores.get(c.name) for j in graded if j.ok and j.scores.get(c.name) is not None]
            if vals:
                out[f"criteria/{c.name}/mean"] = statistics.fmean(vals)
                out[f"criteria/{c.name}/std"] = statistics.pstdev(vals)
        spreads = [j.extra["sample_spread"] for j in graded if j.extra.get("sample_spread") is not None]
        if spreads:  # teacher_samples > 1: how far one grade of the teacher strays from another
            out["judge/sample_spread"] = statistics.fmean(spreads)
        out.update(item_metrics(rows))
        teacher = [r["teacher_reward"] for r in rows if r["teacher_reward"] is not None]
        if teacher:
            out["teacher_reward/mean"] = statistics.fmean(teacher)
        return out
