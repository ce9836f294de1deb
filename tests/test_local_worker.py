"""The local teacher's model in a process of its own (teacher/backends/local_worker.py): the same grades as in this
process, its usage counted here, a native crash mid-batch contained, and no reliance on the caller's __main__."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading

from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import GroupCall, JudgeRequest

REQUESTS = [JudgeRequest(f"What is {i} + 19? Give only the final number.", answer, str(i + 19))
            for i in range(3) for answer in (str(i + 19), f"To add {i} and 19 we")]


def run(teacher, coro_fn):
    async def go():
        try:
            await teacher.health_check()
            return await coro_fn()
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def offline(*overrides: str):
    cfg = load_config(None, ["teacher_cache=false", *overrides])
    return cfg, Rubric.from_config(cfg)


class TestSameGrades:
    def test_the_built_teacher_grades_in_another_process_with_the_in_process_grades_and_usage(self):
        cfg, rubric = offline()
        worker = build_teacher(cfg, rubric)
        assert isinstance(worker, LocalTeacher) and worker._worker is not None
        pids = []

        async def grade():
            pids.append(worker._worker.pid)
            return await worker.judge(REQUESTS)

        there = run(worker, grade)
        here_teacher = LocalTeacher(cfg, Rubric.from_config(cfg), n_threads=worker.n_threads)
        here = run(here_teacher, lambda: here_teacher.judge(REQUESTS))
        assert pids[0] not in (None, os.getpid())
        assert [j.status for j in there] == ["ok"] * len(REQUESTS)
        assert [j.scores for j in there] == [j.scores for j in here]
        assert [j.raw for j in there] == [j.raw for j in here]
        # What the child counted reaches this process's meter (the child's test grade is not counted).
        assert worker.usage.usage == here_teacher.usage.usage
        assert worker.usage.usage.calls == len(REQUESTS)
        assert worker._worker._proc is None  # closed with the teacher

    def test_group_calls_grade_there_too(self):
        cfg, rubric = offline("judge_mode=group")
        worker = LocalTeacher(cfg, rubric, process=True)
        here_teacher = LocalTeacher(cfg, Rubric.from_config(cfg), n_threads=worker.n_threads)
        call = GroupCall(REQUESTS[0].question, REQUESTS[0].ground_truth, tuple(r.response for r in REQUESTS[:2]), "c1")
        there = run(worker, lambda: worker.judge_group([call]))[0]
        here = run(here_teacher, lambda: here_teacher.judge_group([call]))[0]
        assert [j.status for j in there] == ["ok", "ok"]
        assert [j.scores for j in there] == [j.scores for j in here]
        assert worker.usage.usage == here_teacher.usage.usage


class TestNativeCrash:
    def test_a_crash_mid_batch_fails_the_grade_in_progress_and_the_next_grades_use_a_new_process(self):
        """Before: the teacher's model was in the trainer's process, so a native crash while grading killed the run
        with no message. Here the process is killed with SIGSEGV during a batch."""
        cfg, rubric = offline()
        teacher = LocalTeacher(cfg, rubric, n_threads=1, process=True)
        requests = [JudgeRequest(f"What is {i} + 2?", str(i + 2), str(i + 2)) for i in range(12)]
        first_pid = []

        async def grade():
            first_pid.append(teacher._worker.pid)
            threading.Timer(1.5, os.kill, (first_pid[0], signal.SIGSEGV)).start()
            return await teacher.judge(requests)

        judgements = run(teacher, grade)
        failed = [j for j in judgements if not j.ok]
        assert len(failed) == 1, [j.status for j in judgements]
        assert failed[0].status == "error" and "SIGSEGV" in failed[0].error and "rebuild" in failed[0].error
        assert all(v is None for v in failed[0].scores.values())
        after = judgements[judgements.index(failed[0]) + 1:]
        assert after and all(j.ok for j in after)  # graded by the new process
        assert teacher._worker.crashes == 1


    def test_a_process_that_died_between_batches_is_replaced_without_failing_a_grade(self):
        cfg, rubric = offline()
        teacher = LocalTeacher(cfg, rubric, n_threads=1, process=True)

        async def grade():
            first = await teacher.judge(REQUESTS[:2])
            pid = teacher._worker.pid
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            second = await teacher.judge(REQUESTS[2:4])
            return first, second, pid

        first, second, pid = run(teacher, grade)
        assert [j.status for j in first + second] == ["ok"] * 4
        assert teacher._worker.crashes == 1

    def test_after_the_last_restart_every_grade_fails_at_once_with_the_reason(self, monkeypatch):
        from grpo_llm_eval.teacher.backends import local_worker

        monkeypatch.setattr(local_worker, "MAX_RESTARTS", 0)
        cfg, rubric = offline()
        teacher = LocalTeacher(cfg, rubric, n_threads=1, process=True)

        async def grade():
            os.kill(teacher._worker.pid, signal.SIGKILL)
            await asyncio.sleep(0.5)
            return await teacher.judge(REQUESTS[:2])

        judgements = run(teacher, grade)
        assert [j.status for j in judgements] == ["error", "error"]
        assert all("died too often (1 crashes, 0 restarts)" in j.error for j in judgements), [j.error for j in judgements]


class TestNoMainGuardNeeded:
    def test_a_script_without_a_main_guard_can_grade(self, tmp_path):
        """multiprocessing's spawn would run this script again in the child and fail in its bootstrap."""
        script = tmp_path / "grade.py"
        script.write_text(textwrap.dedent("""
            import asyncio
            from grpo_llm_eval.config.load import load_config
            from grpo_llm_eval.teacher import build_teacher
            from grpo_llm_eval.teacher.grading.rubric import Rubric
            from grpo_llm_eval.teacher.types import JudgeRequest

            cfg = load_config(None, ["teacher_cache=false"])
            teacher = build_teacher(cfg, Rubric.from_config(cfg))

            async def go():
                await teacher.health_check()
                try:
                    return await teacher.judge([JudgeRequest("What is 2 + 3?", "5", "5")])
                finally:
                    await teacher.aclose()

            print("STATUS", asyncio.run(go())[0].status)
        """))
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "STATUS ok" in proc.stdout
