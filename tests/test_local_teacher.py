"""The in-process llama.cpp teacher on the bundled GGUF: closing it while a batch is being graded."""

from __future__ import annotations

import asyncio

from grpo_llm_eval.config_load import load_config
from grpo_llm_eval.teacher.local_backend import LocalTeacher
from grpo_llm_eval.teacher.rubric import Rubric
from grpo_llm_eval.teacher.types import JudgeRequest


def test_closing_stops_a_batch_in_progress_after_its_current_grade():
    cfg = load_config(None)  # the offline default: bundled SmolLM2 teacher, structured grades
    teacher = LocalTeacher(cfg, Rubric.from_config(cfg), n_threads=1)
    requests = [JudgeRequest(f"What is {i} + 2?", str(i + 2), str(i + 2)) for i in range(40)]

    async def go():
        await teacher.health_check()
        batch = asyncio.ensure_future(teacher.judge(requests))
        await asyncio.sleep(2.0)  # a few grades in
        await teacher.aclose()
        return await batch

    judgements = asyncio.run(go())
    done = [j for j in judgements if j.ok]
    stopped = [j for j in judgements if j.error == "the teacher was closed"]
    assert done and stopped, [j.status for j in judgements]
    assert len(done) + len(stopped) == len(requests)
    assert judgements[: len(done)] == done  # graded in order until the close, failed (never made up) after
    assert all(j.status == "error" and all(v is None for v in j.scores.values()) for j in stopped)
    assert teacher._llm is None
