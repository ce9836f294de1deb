"""`grpo_llm_eval judge`: grade existing responses with the teacher, the evaluator on its own."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from grpo_llm_eval.data.rubrics import rows_items
from grpo_llm_eval.evaluation.items import checklist_results, item_records
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.teacher.usage import usage_summary
from grpo_llm_eval.training.records import JsonlWriter, read_jsonl
from grpo_llm_eval.verifiers import answer_correct

logger = logging.getLogger(__name__)

RESPONSE_KEYS = ("response", "completion", "student_response")
TRUTH_KEYS = ("answer", "ground_truth")


def _field(row: dict, keys: tuple[str, ...]):
    return next((row[k] for k in keys if row.get(k) is not None), None)


def judge_file(cfg, input_path: str, output_path: str, batch_size: int = 64) -> dict:
    """Grade every row of INPUT (JSONL with question, response, answer); write OUTPUT; return counts.

    Rows without a response are written with judge_status "skipped" so that output lines match input lines.
    """
    rows = read_jsonl(input_path)
    if not rows:
        raise ValueError(f"--input {input_path}: no JSON rows found; expected JSONL with question, response, answer.")
    rubric = Rubric.from_config(cfg)
    own = rows_items(rows, cfg.dataset_rubric_column, f"--input {input_path}")  # checked before the teacher loads
    out = Path(output_path)
    tmp = out.with_name(out.name + ".partial")
    tmp.unlink(missing_ok=True)
    writer = JsonlWriter(tmp)
    ok = written = 0
    teacher = None

    async def run() -> None:
        nonlocal ok, written
        try:
            await teacher.health_check()
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                todo = [i for i, r in enumerate(batch) if _field(r, RESPONSE_KEYS) is not None]
                requests = [JudgeRequest(str(batch[i].get("question", "")), str(_field(batch[i], RESPONSE_KEYS)),
                                         None if _field(batch[i], TRUTH_KEYS) is None else str(_field(batch[i], TRUTH_KEYS)),
                                         rubric=own[start + i])
                            for i in todo]
                judged = dict(zip(todo, await teacher.judge(requests), strict=True))
                graded = []
                for i, row in enumerate(batch):
                    j = judged.get(i)
                    if j is None:
                        graded.append({**row, "judge_status": "skipped"})
                        continue
                    ok += j.ok
                    truth = _field(row, TRUTH_KEYS)
                    items = own[start + i]
                    per_item = (item_records(rubric.for_items(items), j,
                                             checklist_results(items, str(_field(row, RESPONSE_KEYS)),
                                                               cfg.think_close_string))
                                if items else {})
                    graded.append({**row, "scores": j.scores, "feedback": j.feedback, "judge_status": j.status,
                                   "teacher_reward": rubric.reward(j.scores, items) if j.ok else None, **per_item,
                                   "answer_correct": answer_correct(str(_field(row, RESPONSE_KEYS)),
                                                                    None if truth is None else str(truth),
                                                                    cfg.think_close_string),
                                   "judge_latency_s": j.latency_s, "judge_attempts": j.attempts,
                                   "judge_call_id": j.extra.get("call_id")})
                writer.write_many(graded)
                writer.sync()
                written += len(graded)
                logger.info("graded %d/%d", min(start + batch_size, len(rows)), len(rows))
        finally:
            await teacher.aclose()

    try:
        teacher = build_teacher(cfg, rubric, cache_path=None)
        asyncio.run(run())
    except BaseException:
        writer.close()
        if written:  # keep what was graded, for a look or to grade only the rest
            logger.warning("grading stopped after %d of %d rows; those are in %s", written, len(rows), tmp)
        else:
            tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(out)
    return {"rows": len(rows), "ok": ok, "teacher_usage": usage_summary(teacher.usage)}
