"""Teacher faults: down at start, dying mid-run, slow, rate limited. Real servers on loopback, no mocks."""

from __future__ import annotations

import itertools
import math
import time

import pytest

from grpo_llm_eval.rewards import TeacherRubricReward
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.testing import TeacherServer
from grpo_llm_eval.testing.teacher_server import request_key
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.train import TrainingAborted, train
from tests.conftest import tiny_overrides
from tests.reliability.helpers import closed_port, rows_by_step, run_async, run_cli, sets, teacher_at, tiny_cfg


def requests(n: int) -> list[JudgeRequest]:
    return [JudgeRequest(f"What is {i} + {i}?", f"<think>{i}+{i}</think> {2 * i}", str(2 * i)) for i in range(n)]


def attempts_of(srv: TeacherServer, teacher, request: JudgeRequest) -> list[dict]:
    key = request_key(teacher.rubric.messages(request.question, request.response, request.ground_truth))
    return sorted((e for e in srv.stats()["log"] if e["key"] == key), key=lambda e: e["t"])


class TestTeacherDownAtStart:
    def test_the_cli_fails_in_seconds_with_one_line_before_loading_any_model(self, tmp_path):
        url = f"http://127.0.0.1:{closed_port()}/v1"
        # A student that cannot be loaded: had the model been loaded first, the error would name the student.
        args = sets(tiny_overrides(str(tmp_path / "no-such-student"), tmp_path / "runs", openai_base_url=url))
        result = run_cli(args)
        assert result.rc == 1, result.text
        errors = [line for line in result.err.splitlines() if line.startswith("error")]
        assert errors == [errors[0]] and errors[0].startswith(f"error: cannot reach the teacher at {url}")
        assert "start the server or fix openai_base_url" in errors[0]
        assert "Traceback" not in result.text and "no-such-student" not in result.text
        assert result.seconds < 60  # interpreter and library imports included; the check itself is instant


class TestTeacherDiesMidRun:
    def test_an_outage_is_retried_then_masked_and_the_run_goes_on(self, tiny_model, tmp_path):
        # Steps 1-2 are answered; every attempt of steps 3-4 (2 grades x 2 attempts each) finds the
        # connection closed without an answer; then the teacher is back.
        script = (None,) * 4 + ("drop",) * 8
        with TeacherServer(mode="scripted", fault_script=script) as srv:
            cfg = tiny_cfg(tiny_model, tmp_path, srv.base_url, total_steps=6, teacher_max_retries=1)
            result = train(cfg)
            stats = srv.stats()
        assert result.global_step == 6 and stats["faults"]["drop"] == 8
        steps = rows_by_step(read_jsonl(result.run_dir / "rollouts.jsonl"))
        assert sorted(steps) == [1, 2, 3, 4, 5, 6] and all(len(rows) == 2 for rows in steps.values())
        for step, rows in steps.items():
            down = step in (3, 4)
            assert {r["judge_status"] for r in rows} == ({"connection_error"} if down else {"ok"}), step
            if down:  # masked: no score, no reward, no advantage; and asked twice (one retry)
                assert all(r["reward"] is None and r["advantage"] is None for r in rows)
                assert all(v is None for r in rows for v in r["scores"].values())
        for m in read_jsonl(result.run_dir / "metrics.jsonl"):
            if "loss" in m:
                assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])

    def test_a_teacher_that_dies_for_good_stops_the_run_with_a_checkpoint(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted", die_after=4) as srv:
            cfg = tiny_cfg(tiny_model, tmp_path, srv.base_url, total_steps=20, teacher_max_retries=1,
                           max_consecutive_failed_steps=2)
            with pytest.raises(TrainingAborted, match="every grade failed for 2 steps"):
                train(cfg)
            assert srv.dead and srv.stats()["chat_requests"] == 4
        out = tmp_path / "run"
        assert (out / "checkpoint-4").is_dir()
        steps = rows_by_step(read_jsonl(out / "rollouts.jsonl"))
        assert sorted(steps) == [1, 2, 3, 4]
        assert [r["judge_status"] for s in (3, 4) for r in steps[s]] == ["connection_error"] * 4


class TestSlowTeacher:
    def test_a_hanging_teacher_times_out_and_the_grades_are_masked(self):
        with TeacherServer(fault_rate=1.0, faults=("hang",), hang_s=10) as srv:
            teacher = teacher_at(srv.base_url, teacher_timeout_s=0.5, teacher_max_retries=1)
            reward = TeacherRubricReward(teacher.cfg, teacher.rubric, teacher)
            prompts = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(4)]
            completions = [f"<think>{i}+{i}</think> {2 * i}" for i in range(4)]
            start = time.monotonic()
            rewards = run_async(teacher, lambda: reward(prompts, completions, answer=[str(2 * i) for i in range(4)]))
            elapsed = time.monotonic() - start
            assert srv.stats()["chat_requests"] == 8  # each asked twice
        assert rewards == [None] * 4
        assert teacher.stats["failures"] == {"timeout": 4}
        assert elapsed < 5  # two 0.5 s attempts and a backoff, not the server's 10 s

    def test_an_answer_trickled_past_the_timeout_is_a_timeout_too(self):
        # Bytes keep arriving, so no single read times out; the bound on the whole call must still hold.
        with TeacherServer(fault_rate=1.0, faults=("trickle",), hang_s=6) as srv:
            teacher = teacher_at(srv.base_url, teacher_timeout_s=1.0)
            start = time.monotonic()
            [j] = run_async(teacher, lambda: teacher.judge(requests(1)))
        assert j.status == "timeout" and j.scores["answer"] is None
        assert time.monotonic() - start < 4

    def test_a_slow_teacher_within_the_timeout_is_waited_for(self):
        with TeacherServer(latency_s=0.6) as srv:
            teacher = teacher_at(srv.base_url, teacher_timeout_s=3.0)
            judgements = run_async(teacher, lambda: teacher.judge(requests(4)))
        assert [j.status for j in judgements] == ["ok"] * 4 and all(j.latency_s >= 0.6 for j in judgements)


class TestRateLimitBursts:
    def test_a_burst_of_429s_is_waited_out_honouring_retry_after(self):
        batch = requests(8)
        with TeacherServer(fault_script=("429",) * 8, retry_after_s=1) as srv:
            teacher = teacher_at(srv.base_url, teacher_max_retries=2)
            judgements = run_async(teacher, lambda: teacher.judge(batch))
            tries = [attempts_of(srv, teacher, r) for r in batch]
        assert [j.status for j in judgements] == ["ok"] * 8 and [j.attempts for j in judgements] == [2] * 8
        waits = [b["t"] - a["t_done"] for t in tries for a, b in itertools.pairwise(t)]
        assert len(waits) == 8 and min(waits) >= 1.0  # never before Retry-After
        assert max(waits) < 1.6  # and not much later: jitter is at most 10% + 0.05 s

    def test_fractional_retry_after_is_honoured(self):
        with TeacherServer(fault_script=("429",) * 3, retry_after_s=0.4) as srv:
            teacher = teacher_at(srv.base_url, teacher_max_retries=3)
            [j] = run_async(teacher, lambda: teacher.judge(requests(1)))
            log = srv.stats()["log"]
        assert j.ok and j.attempts == 4
        assert all(b["t"] - a["t_done"] >= 0.4 for a, b in itertools.pairwise(log))

    def test_a_burst_longer_than_the_retries_ends_rate_limited_and_masked(self):
        with TeacherServer(fault_rate=1.0, faults=("429",), retry_after_s=0.2) as srv:
            teacher = teacher_at(srv.base_url, teacher_max_retries=2)
            reward = TeacherRubricReward(teacher.cfg, teacher.rubric, teacher)
            rewards = run_async(teacher, lambda: reward([[{"role": "user", "content": "1+1?"}]] * 3,
                                                        ["<think>1+1</think> 2"] * 3, answer=["2"] * 3))
            assert srv.stats()["chat_requests"] == 9
        assert rewards == [None] * 3 and teacher.stats["failures"] == {"rate_limited": 3}

