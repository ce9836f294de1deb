"""The OpenAI-compatible teacher against a real fault-injecting server on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import email.utils
import gc
import hashlib
import itertools
import logging
import secrets
import socket
import time

import pytest

from grpo_llm_eval.config import Config
from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher, retry_after_seconds
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import JudgeRequest, TeacherUnavailable
from grpo_llm_eval.testing import FAULT_KINDS, TeacherServer
from grpo_llm_eval.testing.teacher_server import request_key
from tests.conftest import judge_once

# The status a request ends with when its last attempt met this fault (None: no fault).
STATUS_OF_LAST_FAULT = {None: "ok", "500": "http_error", "429": "rate_limited", "hang": "timeout",
                        "garbage": "unparseable", "empty": "empty"}


def make_teacher(url: str, **overrides) -> OpenAITeacher:
    settings = {"teacher_timeout_s": 5.0, "teacher_max_retries": 0, **overrides}
    cfg = Config(teacher_backend="openai", teacher_model_name="teacher", openai_base_url=url, **settings)
    # A short backoff keeps the suite fast; Retry-After is honoured regardless.
    return OpenAITeacher(cfg, Rubric.from_config(cfg), backoff_base_s=0.05)


grade = judge_once


def check(teacher: OpenAITeacher) -> None:
    async def go():
        try:
            await teacher.health_check()
        finally:
            await teacher.aclose()
    asyncio.run(go())


def arithmetic(n: int, start: int = 0) -> list[JudgeRequest]:
    """Distinct requests; even ones answered right, odd ones wrong; all with a think block."""
    return [JudgeRequest(f"What is {i} + {i}?", f"<think>{i}+{i}</think> {2 * i if i % 2 == 0 else 2 * i + 1}",
                         str(2 * i)) for i in range(start, start + n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_attempts(srv: TeacherServer, teacher: OpenAITeacher, request: JudgeRequest) -> list[dict]:
    """The server's log entries for one request (all its attempts), in arrival order."""
    key = request_key(teacher.rubric.messages(request.question, request.response, request.ground_truth))
    return sorted((e for e in srv.stats()["log"] if e["key"] == key), key=lambda e: e["t"])


class TestHealthCheck:
    def test_passes_when_the_server_serves_the_model(self):
        with TeacherServer(models=("other", "teacher")) as srv:
            check(make_teacher(srv.base_url))
            assert srv.stats()["model_requests"] == 1

    def test_unreachable_url_fails_fast_naming_the_url_and_the_fix(self):
        url = f"http://127.0.0.1:{free_port()}/v1"
        start = time.monotonic()
        with pytest.raises(TeacherUnavailable) as info:
            check(make_teacher(url, teacher_max_retries=5))
        assert time.monotonic() - start < 5
        assert str(info.value).startswith(f"cannot reach the teacher at {url}")
        assert "start the server or fix openai_base_url" in str(info.value)

    def test_wrong_model_name_fails_naming_the_served_models(self):
        with TeacherServer(models=("alpha", "beta")) as srv:
            with pytest.raises(TeacherUnavailable) as info:
                check(make_teacher(srv.base_url))
        assert "does not serve 'teacher'; it serves: alpha, beta; set teacher_model_name" in str(info.value)

    def test_server_without_a_models_endpoint_is_accepted_with_a_warning(self, caplog):
        with TeacherServer(models_endpoint=False) as srv, caplog.at_level(logging.WARNING):
            check(make_teacher(srv.base_url))
        assert any("no /models endpoint" in r.getMessage() for r in caplog.records)


class TestGrading:
    def test_a_correct_teacher_grades_right_and_wrong_answers_apart(self):
        with TeacherServer() as srv:
            right, wrong = grade(make_teacher(srv.base_url), arithmetic(2))
        assert right.ok and right.scores == {"thought_process": 10.0, "answer": 10.0, "format": 10.0}
        assert wrong.ok and wrong.scores == {"thought_process": 0.0, "answer": 0.0, "format": 10.0}
        assert right.attempts == 1 and right.latency_s > 0 and right.error is None

    def test_results_come_back_in_request_order(self):
        with TeacherServer(latency_s=0.05) as srv:
            judgements = grade(make_teacher(srv.base_url), arithmetic(10))
        assert [j.scores["answer"] for j in judgements] == [10.0 if i % 2 == 0 else 0.0 for i in range(10)]

    def test_max_tokens_is_the_teachers_budget_not_the_students(self):
        with TeacherServer() as srv:
            [j] = grade(make_teacher(srv.base_url, max_feedback_new_tokens=12, max_new_tokens=4096), arithmetic(1))
        assert j.extra["finish_reason"] == "length"  # 12 tokens cannot hold the grade
        assert j.status == "truncated" and all(v is None for v in j.scores.values())

    def test_a_grade_cut_off_by_the_token_limit_is_truncated_with_one_warning(self, caplog):
        """Would have caught: with max_feedback_new_tokens 8 every grade stopped mid-JSON and was recorded
        'unparseable' with no hint that the limit, not the teacher, was at fault."""
        from grpo_llm_eval.rewards import TeacherRubricReward

        with TeacherServer() as srv, caplog.at_level(logging.WARNING):
            teacher = make_teacher(srv.base_url, teacher_structured_output=True, max_feedback_new_tokens=8)
            judgements = grade(teacher, arithmetic(4))
        assert [j.status for j in judgements] == ["truncated"] * 4
        assert all(j.extra["finish_reason"] == "length" and "max_feedback_new_tokens=8" in j.error for j in judgements)
        warned = [r.getMessage() for r in caplog.records if "max_feedback_new_tokens" in r.getMessage()]
        assert len(warned) == 1 and "max_feedback_new_tokens=8" in warned[0] and "tokens" in warned[0], warned
        assert teacher.stats["failures"] == {"truncated": 4}
        reward = TeacherRubricReward(teacher.cfg, teacher.rubric, teacher)
        rows = [reward.score(j, r.response, r.ground_truth) for j, r in zip(judgements, arithmetic(4), strict=True)]
        metrics = reward.batch_metrics(judgements, rows)
        assert metrics["judge/status_truncated"] == 1.0 and all(r["reward"] is None for r in rows)

    def test_the_teacher_can_be_used_from_several_event_loops(self, caplog):
        with TeacherServer() as srv, caplog.at_level(logging.ERROR):
            teacher = make_teacher(srv.base_url)
            first = asyncio.run(teacher.judge(arithmetic(2)))  # no aclose: the loop's shutdown closes the client
            second = grade(teacher, arithmetic(2))
            gc.collect()
        assert [j.status for j in first + second] == ["ok"] * 4
        assert [r.getMessage() for r in caplog.records] == []  # no "Event loop is closed" from a stale client


class TestFaults:
    def test_every_request_ends_ok_or_with_the_status_of_its_last_fault(self):
        requests = arithmetic(40)
        # Seed 5 draws every fault kind among the first 32 requests, so each kind is exercised.
        with TeacherServer(fault_rate=0.3, seed=5, faults=FAULT_KINDS, hang_s=2.0, retry_after_s=1) as srv:
            teacher = make_teacher(srv.base_url, teacher_timeout_s=0.5, teacher_max_retries=2)
            judgements = grade(teacher, requests)
            attempts = [server_attempts(srv, teacher, r) for r in requests]
            injected = srv.stats()["faults"]
        assert all(injected[kind] > 0 for kind in FAULT_KINDS)
        for i, (j, tries) in enumerate(zip(judgements, attempts, strict=True)):
            assert j.status == STATUS_OF_LAST_FAULT[tries[-1]["fault"]]
            assert j.attempts == len(tries)
            if j.ok:
                assert j.scores == {"thought_process": 10.0 * (i % 2 == 0), "answer": 10.0 * (i % 2 == 0), "format": 10.0}
            else:  # a failure carries no score at all, never a made-up one
                assert all(v is None for v in j.scores.values()) and j.error
        statuses = [j.status for j in judgements]
        assert teacher.stats["retries"] == sum(len(t) - 1 for t in attempts) > 0
        assert teacher.stats["failures"] == {s: statuses.count(s) for s in set(statuses) - {"ok"}}
        # tokens are counted once, by the usage meter; old code kept a second count in stats (issue 26 item 10)
        assert not {"prompt_tokens", "completion_tokens"} & set(teacher.stats)
        assert teacher.usage.usage.prompt_tokens > 0
        waits = [b["t"] - a["t_done"] for t in attempts for a, b in itertools.pairwise(t) if a["fault"] == "429"]
        assert waits and min(waits) >= 1.0  # Retry-After: 1 honoured

    def test_a_retry_after_429_waits_at_least_retry_after(self):
        with TeacherServer(fault_rate=1.0, faults=("429",), retry_after_s=1) as srv:
            [j] = grade(make_teacher(srv.base_url, teacher_max_retries=1), arithmetic(1))
            first, second = srv.stats()["log"]
        assert j.status == "rate_limited" and j.attempts == 2
        assert second["t"] - first["t_done"] >= 1.0

    def test_a_hang_past_the_timeout_is_a_timeout(self):
        with TeacherServer(fault_rate=1.0, faults=("hang",), hang_s=3) as srv:
            [j] = grade(make_teacher(srv.base_url, teacher_timeout_s=0.5), arithmetic(1))
        assert j.status == "timeout" and j.attempts == 1
        assert 0.4 < j.latency_s < 2.0

    def test_server_errors_are_retried_with_backoff_then_reported(self):
        with TeacherServer(fault_rate=1.0, faults=("500",)) as srv:
            [j] = grade(make_teacher(srv.base_url, teacher_max_retries=2), arithmetic(1))
            assert srv.stats()["chat_requests"] == 3
        assert j.status == "http_error" and j.attempts == 3 and "500" in j.error

    def test_an_unparseable_grade_is_not_asked_again(self):
        with TeacherServer(fault_rate=1.0, faults=("garbage",)) as srv:
            [j] = grade(make_teacher(srv.base_url, teacher_max_retries=3), arithmetic(1))
            assert srv.stats()["chat_requests"] == 1
        assert j.status == "unparseable" and j.raw and j.scores["answer"] is None

    def test_a_model_the_server_lacks_is_an_http_error_without_retries(self):
        with TeacherServer(models=("other",)) as srv:
            [j] = grade(make_teacher(srv.base_url, teacher_max_retries=3), arithmetic(1))
        assert j.status == "http_error" and j.attempts == 1 and "404" in j.error

    def test_a_dead_server_is_a_connection_error(self):
        [j] = grade(make_teacher(f"http://127.0.0.1:{free_port()}/v1", teacher_max_retries=1), arithmetic(1))
        assert j.status == "connection_error" and j.attempts == 2


class TestConcurrencyCap:
    def test_the_cap_holds_across_the_whole_batch_and_is_reached(self):
        with TeacherServer(latency_s=0.2) as srv:
            judgements = grade(make_teacher(srv.base_url, teacher_max_concurrency=3), arithmetic(12))
            assert srv.stats()["max_in_flight"] == 3
        assert all(j.ok for j in judgements)

    def test_concurrent_judge_calls_share_one_cap(self):
        with TeacherServer(latency_s=0.2) as srv:
            teacher = make_teacher(srv.base_url, teacher_max_concurrency=3)

            async def go():
                try:
                    return await asyncio.gather(teacher.judge(arithmetic(6)), teacher.judge(arithmetic(6, start=6)))
                finally:
                    await teacher.aclose()
            asyncio.run(go())
            assert srv.stats()["max_in_flight"] == 3


class TestRetryAfter:
    def test_seconds_milliseconds_and_http_dates_are_read(self):
        assert retry_after_seconds({"retry-after": "2"}) == 2.0
        assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
        later = email.utils.formatdate(time.time() + 30, usegmt=True)
        assert 28 <= retry_after_seconds({"retry-after": later}) <= 30
        assert retry_after_seconds({"retry-after": "soon"}) is None
        assert retry_after_seconds({}) is None


class TestStructuredOutput:
    def test_structured_output_is_requested_and_its_json_is_read(self):
        with TeacherServer() as srv:
            [j] = grade(make_teacher(srv.base_url, teacher_structured_output=True), arithmetic(1))
            [entry] = srv.stats()["log"]
        assert entry["structured"]
        assert j.ok and j.raw.lstrip().startswith("{") and j.scores["answer"] == 10.0

    def test_a_refused_response_format_falls_back_to_plain_with_one_warning(self, caplog):
        with TeacherServer(refuse_response_format=True) as srv, caplog.at_level(logging.WARNING):
            teacher = make_teacher(srv.base_url, teacher_structured_output=True)
            judgements = grade(teacher, arithmetic(6))
            stats = srv.stats()
        assert stats["responses"]["400"] >= 1 and not any(e["structured"] for e in stats["log"])
        assert all(j.ok and "<evaluation>" in j.raw for j in judgements)
        warnings = [r for r in caplog.records if "structured output" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
        assert teacher.structured is False and teacher.stats["fallbacks"] == ["structured"]


    def test_a_server_that_wants_max_completion_tokens_gets_it_and_keeps_structured_output(self):
        with TeacherServer(refuse_max_tokens=True) as srv:
            teacher = make_teacher(srv.base_url, teacher_structured_output=True, max_feedback_new_tokens=12)
            [j] = grade(teacher, arithmetic(1))
            [entry] = srv.stats()["log"]
        assert entry["structured"] and teacher.structured is True
        assert j.extra["finish_reason"] == "length"  # the budget still applies under its new name


class TestLogprobScores:
    def test_logprob_weighted_scores_are_used_when_the_server_returns_top_logprobs(self):
        with TeacherServer() as srv:
            right, wrong = grade(make_teacher(srv.base_url, teacher_logprob_scores=True), arithmetic(2))
            assert all(e["logprobs"] for e in srv.stats()["log"])
        # The fake puts 0.8 on the written score and the rest on neighbours: 10 -> 9.75, 0 -> 0.65.
        assert right.scores["answer"] == pytest.approx(9.75)
        assert wrong.scores["answer"] == pytest.approx(0.65)
        assert right.extra["score_source"] == {"thought_process": "logprob", "answer": "logprob", "format": "logprob"}

    def test_refused_logprobs_fall_back_to_parsed_scores_with_a_warning(self, caplog):
        with TeacherServer(refuse_logprobs=True) as srv, caplog.at_level(logging.WARNING):
            teacher = make_teacher(srv.base_url, teacher_logprob_scores=True)
            [j] = grade(teacher, arithmetic(1))
        assert j.ok and j.scores["answer"] == 10.0 and j.extra["score_source"]["answer"] == "parsed"
        assert teacher.logprobs is False
        assert sum("logprob" in r.getMessage() for r in caplog.records) == 1


class TestReasoning:
    @pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
    def test_server_reasoning_is_kept_in_think_tags_and_never_parsed(self, field):
        with TeacherServer(reasoning_field=field) as srv:
            [j] = grade(make_teacher(srv.base_url), arithmetic(1))
        assert j.feedback.startswith("<think>\nFirst impression: <answer><score>5</score>")
        assert "</think>\n<evaluation>" in j.feedback
        assert j.scores["answer"] == 10.0  # the draft in the reasoning says 5
        assert "First impression" not in j.raw


class TestSecrets:
    def test_the_api_key_appears_in_no_log_record_or_error(self, caplog, monkeypatch):
        secret = "sk-test-" + secrets.token_hex(16)
        monkeypatch.setenv("OPENAI_API_KEY", secret)
        for name in ("", "openai", "httpx", "httpx2", "httpcore", "httpcore2", "grpo_llm_eval"):
            caplog.set_level(logging.DEBUG, logger=name)
        with TeacherServer(fault_rate=0.6, seed=3, faults=("500", "429", "garbage", "empty"), retry_after_s=0) as srv:
            judgements = grade(make_teacher(srv.base_url, teacher_max_retries=1), arithmetic(10))
            sent = {e["auth"] for e in srv.stats()["log"]}
        with pytest.raises(TeacherUnavailable) as down:
            check(make_teacher(f"http://127.0.0.1:{free_port()}/v1"))
        assert sent == {hashlib.sha256(secret.encode()).hexdigest()[:16]}  # the key really was used
        assert any(not j.ok for j in judgements) and caplog.records
        texts = [caplog.text, str(down.value), *(j.error or "" for j in judgements)]
        texts += [r.getMessage() + (r.exc_text or "") for r in caplog.records]
        assert not any(secret in t for t in texts)
