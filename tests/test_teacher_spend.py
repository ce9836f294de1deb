"""Teacher spend and limits against the real fault-injecting server on loopback: tokens and calls counted,
budgets, requests and tokens per minute, adaptive concurrency on a queueing server, options learned once."""

from __future__ import annotations

import asyncio

import pytest

from grpo_llm_eval.config import Config
from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.usage import Prices, Usage
from grpo_llm_eval.testing import TeacherServer
from tests.conftest import judge_once
from tests.test_openai_backend import arithmetic

WINDOW_S = 1.0  # the per-minute limits' window, shortened so a test sees several windows in seconds


def make_teacher(url: str, **overrides) -> OpenAITeacher:
    settings = {"teacher_timeout_s": 5.0, "teacher_max_retries": 0, **overrides}
    cfg = Config(teacher_backend="openai", teacher_model_name="teacher", openai_base_url=url, **settings)
    return OpenAITeacher(cfg, Rubric.from_config(cfg), backoff_base_s=0.05, rate_window_s=WINDOW_S)


def served_usage(srv: TeacherServer) -> Usage:
    """What the server reported in its answers' `usage`, summed, and how many chat requests it got."""
    log = srv.stats()
    used = [e["usage"] for e in log["log"] if e.get("usage")]
    return Usage(log["chat_requests"], sum(u["prompt_tokens"] for u in used), sum(u["completion_tokens"] for u in used))


def busiest_window(times: list[float], window_s: float) -> int:
    """The most requests that arrived within any window_s seconds."""
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u < t + window_s) for i, t in enumerate(times))


class TestUsageAccounting:
    def test_calls_and_tokens_are_what_the_server_reported_retries_included(self):
        with TeacherServer(mode="scripted", fault_script=("500", None, "429", None), retry_after_s=0.1) as srv:
            teacher = make_teacher(srv.base_url, teacher_max_retries=2, teacher_max_concurrency=1)
            judgements = judge_once(teacher, arithmetic(6))
            served = served_usage(srv)
        assert all(j.ok for j in judgements)
        assert teacher.usage.usage == served
        assert served.calls == 8 and served.prompt_tokens > 0 and served.completion_tokens > 0  # 6 + 2 retries
        # each grade carries its call's usage, so spend can be attributed to completions
        attributed = [j.extra["usage"] for j in judgements]
        assert Usage(*(sum(u[k] for u in attributed) for k in ("calls", "prompt_tokens", "completion_tokens"))) == served

    def test_cost_is_tokens_times_price(self):
        usage = Usage(3, 2_000_000, 500_000)
        assert Prices(0.15, 0.60).cost_usd(usage) == pytest.approx(0.3 + 0.3)
        assert not Prices().priced

    def test_cached_prompt_tokens_are_what_the_server_reported_and_cost_their_price(self):
        with TeacherServer(mode="scripted", prefix_cache=True, cache_block=4) as srv:
            teacher = make_teacher(srv.base_url, teacher_max_concurrency=1, teacher_price_input_per_mtok=2.0,
                                   teacher_price_output_per_mtok=8.0, teacher_price_cached_input_per_mtok=0.5)
            assert all(j.ok for j in judge_once(teacher, arithmetic(6)))
            log = [e["usage"] for e in srv.stats()["log"]]
        usage = teacher.usage.usage
        cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in log)
        assert log[0]["prompt_tokens_details"]["cached_tokens"] == 0  # nothing cached before the first call
        assert usage.cached_prompt_tokens == cached and 0 < cached < usage.prompt_tokens
        full = Prices(2.0, 8.0).cost_usd(usage)  # unset cached price: the input price, as before
        assert full == pytest.approx((2.0 * usage.prompt_tokens + 8.0 * usage.completion_tokens) / 1e6)
        assert teacher.usage.prices.cost_usd(usage) == pytest.approx(full - 1.5 * cached / 1e6)


class TestBudget:
    def test_no_call_is_sent_once_the_token_budget_is_spent(self):
        with TeacherServer(mode="scripted") as srv:
            one = make_teacher(srv.base_url)
            judge_once(one, arithmetic(1))
            per_call = one.usage.usage.total_tokens
            srv.reset_stats()
            budget = int(per_call * 3.5)
            teacher = make_teacher(srv.base_url, teacher_max_total_tokens=budget, teacher_max_concurrency=1)
            judgements = judge_once(teacher, arithmetic(10, start=1))
            served = served_usage(srv)
        assert [j.status for j in judgements] == ["ok"] * 4 + ["budget_spent"] * 6
        assert "teacher_max_total_tokens" in judgements[-1].error
        assert served.calls == 4 and budget <= served.total_tokens < budget + per_call * 1.5


class TestRequestsPerMinute:
    def test_teacher_rpm_holds_in_every_window(self):
        with TeacherServer(mode="scripted") as srv:
            teacher = make_teacher(srv.base_url, teacher_rpm=4, teacher_max_concurrency=32)
            judgements = judge_once(teacher, arithmetic(10))
            times = [e["t"] for e in srv.stats()["log"]]
        assert all(j.ok for j in judgements)
        # a little slack for the loopback trip: stamps are taken at the client, times read at the server
        assert busiest_window(times, WINDOW_S * 0.95) == 4
        assert max(times) - min(times) >= 2 * WINDOW_S * 0.95  # 10 requests at 4 a window need 3 windows

    def test_each_of_several_processes_takes_its_share_of_the_limit(self):
        with TeacherServer(mode="scripted") as srv:
            cfg = Config(teacher_backend="openai", teacher_model_name="teacher", openai_base_url=srv.base_url,
                         teacher_rpm=4, teacher_timeout_s=5.0)
            one_of_two = OpenAITeacher(cfg, Rubric.from_config(cfg), num_processes=2, rate_window_s=WINDOW_S)
            judge_once(one_of_two, arithmetic(6))
            times = [e["t"] for e in srv.stats()["log"]]
        assert busiest_window(times, WINDOW_S * 0.95) == 2  # 4 a window for the run: 2 for each of 2 processes

    def test_429s_are_still_honoured_and_retries_count_against_the_limit(self):
        with TeacherServer(mode="scripted", fault_script=("429", "429"), retry_after_s=1.5) as srv:
            teacher = make_teacher(srv.base_url, teacher_rpm=3, teacher_max_retries=2)
            judgements = judge_once(teacher, arithmetic(5))
            log = srv.stats()["log"]
        assert all(j.ok for j in judgements)
        assert len(log) == 7 and busiest_window([e["t"] for e in log], WINDOW_S * 0.95) <= 3
        limited = [e for e in log if e["fault"] == "429"]
        retries = [e for e in log if e["key"] in {x["key"] for x in limited} and e["fault"] is None]
        for first in limited:
            again = min(e["t"] for e in retries if e["key"] == first["key"])
            assert again - first["t_done"] >= 1.5  # Retry-After

    def test_teacher_tpm_holds_in_every_window(self):
        with TeacherServer(mode="scripted") as srv:
            one = make_teacher(srv.base_url)
            judge_once(one, arithmetic(1))
            per_call = one.usage.usage.total_tokens
            srv.reset_stats()
            teacher = make_teacher(srv.base_url, teacher_tpm=per_call * 3, max_feedback_new_tokens=64)
            judge_once(teacher, arithmetic(8))
            times = [e["t"] for e in srv.stats()["log"]]
        assert len(times) == 8 and busiest_window(times, WINDOW_S * 0.95) <= 3


class TestAdaptiveConcurrency:
    @staticmethod
    def run(adaptive: bool):
        # One request graded at a time, 0.2 s each: with a 1 s timeout, 16 calls in flight cannot all be answered.
        with TeacherServer(mode="scripted", serial=True, latency_s=0.2) as srv:
            teacher = make_teacher(srv.base_url, teacher_timeout_s=1.0, teacher_max_retries=3,
                                   teacher_max_concurrency=16, teacher_adaptive_concurrency=adaptive)

            async def go():
                try:
                    judged = await teacher.judge(arithmetic(16))
                    return judged, next(iter(teacher._states.values())).slots
                finally:
                    await teacher.aclose()

            judgements, slots = asyncio.run(go())
            return judgements, slots, srv.stats()

    def test_timeouts_in_a_queue_lower_the_calls_in_flight(self):
        judgements, slots, stats = self.run(adaptive=True)
        assert slots.decreases >= 1 and slots.limit < 16
        fixed_judgements, fixed_slots, fixed_stats = self.run(adaptive=False)
        assert fixed_slots.limit == 16 and fixed_slots.decreases == 0
        # fewer calls time out in the queue, so fewer are sent again and fewer grades are lost
        timeouts = sum(j.attempts - 1 for j in judgements)
        fixed_timeouts = sum(j.attempts - 1 for j in fixed_judgements)
        assert timeouts < fixed_timeouts
        assert sum(j.ok for j in judgements) >= sum(j.ok for j in fixed_judgements)
        assert stats["chat_requests"] < fixed_stats["chat_requests"]


class TestOptionsLearnedInTheHealthCheck:
    def test_a_server_refusing_json_schema_refuses_no_call_of_the_first_batch(self):
        with TeacherServer(mode="scripted", refuse_json_schema=True) as srv:
            teacher = make_teacher(srv.base_url, teacher_structured_output=True)

            async def go():
                try:
                    await teacher.health_check()
                    probed = srv.stats()
                    srv.reset_stats()
                    return probed, await teacher.judge(arithmetic(8))
                finally:
                    await teacher.aclose()

            probed, judgements = asyncio.run(go())
            batch = srv.stats()
        assert probed["responses"].get("400") == 1  # the probe, refused once
        assert all(j.ok for j in judgements)
        assert batch["chat_requests"] == 8 and "400" not in batch["responses"]
        assert all(e["structured"] for e in batch["log"])  # json_object with the schema, not plain text


class TestBudgetAcrossProcesses:
    def test_a_busy_process_may_spend_what_an_idle_one_leaves_and_the_total_holds(self, tmp_path):
        """Issue 26 item 5: each process refused calls at 1/n of the budget, so with uneven load one process's
        completions were masked while the run had budget left. With the spend ledger every process checks the
        run's total. Two teachers of a 2-process run share one ledger file; only the first grades."""
        from grpo_llm_eval.teacher.spend_ledger import SpendLedger

        budget = 2400  # the fake teacher's calls take about 240 tokens: about 10 calls
        with TeacherServer(mode="scripted") as srv:
            busy, idle = (make_teacher(srv.base_url, teacher_max_total_tokens=budget, teacher_max_concurrency=1)
                          for _ in range(2))
            for teacher in (busy, idle):
                teacher.num_processes = 2
                teacher.usage.ledger = SpendLedger(tmp_path / "judgements.sqlite")
                teacher.usage.aggregate = True  # as JudgeSpend.on_train_begin sets it when the file is shared
            judgements = judge_once(busy, arithmetic(20))
            spent = sum(e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"] for e in srv.stats()["log"])
            [late] = judge_once(idle, arithmetic(1, start=50))  # the run's budget is spent: refused here too
        ok = sum(j.ok for j in judgements)
        per_call = spent / ok
        assert spent >= budget - per_call  # the busy process used the whole budget, not half of it
        assert spent <= budget + per_call  # and the run's total holds
        assert late.status == "budget_spent"


class TestRateLimitsAcrossProcesses:
    """Issue 26 item 5, the limits half: limit / n per process starved a busy process beside an idle one, and a
    teacher_rpm below the process count overshot (each share floored at 1). With the shared ledger the window is
    the run's. Two teachers of a 2-process run share one ledger file, as JudgeSpend.on_train_begin sets them up."""

    @staticmethod
    def pair(url: str, tmp_path, **settings):
        from grpo_llm_eval.teacher.spend_ledger import SpendLedger

        teachers = [make_teacher(url, teacher_max_concurrency=8, **settings) for _ in range(2)]
        for teacher in teachers:
            teacher.num_processes = 2
            teacher.usage.ledger = SpendLedger(tmp_path / "judgements.sqlite")
            teacher.usage.aggregate = True
        return teachers

    def test_a_busy_process_gets_the_whole_limit_when_the_other_is_idle(self, tmp_path):
        with TeacherServer(mode="scripted") as srv:
            busy, _idle = self.pair(srv.base_url, tmp_path, teacher_rpm=4)
            assert all(j.ok for j in judge_once(busy, arithmetic(8)))
            times = [e["t"] for e in srv.stats()["log"]]
        assert busiest_window(times, WINDOW_S * 0.95) == 4  # not 2, its 1/2 share

    def test_a_limit_below_the_process_count_holds(self, tmp_path):
        import threading

        with TeacherServer(mode="scripted") as srv:
            teachers = self.pair(srv.base_url, tmp_path, teacher_rpm=1)
            results = {}
            threads = [threading.Thread(target=lambda i=i: results.update({i: judge_once(teachers[i], arithmetic(2, 10 * i))}))
                       for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            times = [e["t"] for e in srv.stats()["log"]]
        assert all(j.ok for i in (0, 1) for j in results[i])
        assert busiest_window(times, WINDOW_S * 0.95) == 1  # per-process shares floored at 1 let 2 through
