"""The judgement cache: what is stored, what is replayed, and that processes can share it."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3

import pytest

from grpo_llm_eval.config import Config
from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher
from grpo_llm_eval.teacher.cache import CachedTeacher, JudgementCache, cache_key, flags_from_config
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import Judgement, JudgeRequest
from grpo_llm_eval.testing import TeacherServer
from tests.conftest import judge_once

NAMES = ["thought_process", "answer", "format"]


def ok(score: float = 7.0, feedback: str = "Fine.") -> Judgement:
    return Judgement(scores=dict.fromkeys(NAMES, score), feedback=feedback, raw=feedback, status="ok",
                     latency_s=1.5, attempts=2, extra={"score_source": dict.fromkeys(NAMES, "parsed")})


def failed(status: str = "timeout") -> Judgement:
    return Judgement.failed(status, NAMES, error="boom", latency_s=0.5)


def write_many(path: str, worker: int, n: int, start) -> None:
    cache = JudgementCache(path)
    start.wait(timeout=30)  # both processes write at the same moment
    for i in range(0, n, 10):
        cache.put_many((f"w{worker}-{j}", ok(float(j % 10))) for j in range(i, i + 10))
        assert len(cache.get_many([f"w{worker}-{i}"])) == 1
    cache.close()


class TestJudgementCache:
    def test_counts_hits_and_misses(self, tmp_path):
        cache = JudgementCache(tmp_path / "c.db")
        cache.put_many([("a", ok())])
        found = cache.get_many(["a", "b", "c"])
        assert set(found) == {"a"} and (cache.hits, cache.misses) == (1, 2)

    def test_a_cached_judgement_is_marked_cached_with_no_latency(self, tmp_path):
        cache = JudgementCache(tmp_path / "c.db")
        cache.put_many([("a", ok(9.0, "Good."))])
        j = cache.get_many(["a"])["a"]
        assert j.cached and j.latency_s == 0.0 and j.attempts == 0
        assert j.scores == dict.fromkeys(NAMES, 9.0) and j.feedback == "Good." and j.ok
        assert j.extra["score_source"]["answer"] == "parsed"

    @pytest.mark.parametrize("status", ["timeout", "rate_limited", "http_error", "unparseable", "incomplete", "empty"])
    def test_only_ok_judgements_are_stored(self, tmp_path, status):
        cache = JudgementCache(tmp_path / "c.db")
        assert cache.put_many([("bad", failed(status)), ("good", ok())]) == 1
        assert set(cache.get_many(["bad", "good"])) == {"good"} and len(cache) == 1

    def test_judgements_persist_across_reopening(self, tmp_path):
        first = JudgementCache(tmp_path / "c.db")
        first.put_many([("a", ok(3.0))])
        first.close()
        again = JudgementCache(tmp_path / "c.db")
        assert again.get_many(["a"])["a"].scores["answer"] == 3.0

    def test_the_database_is_in_wal_mode(self, tmp_path):
        JudgementCache(tmp_path / "c.db").close()
        with sqlite3.connect(tmp_path / "c.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def test_a_closed_cache_refuses_use(self, tmp_path):
        cache = JudgementCache(tmp_path / "c.db")
        cache.close()
        with pytest.raises(RuntimeError, match="closed"):
            cache.get_many(["a"])

    def test_two_processes_can_write_at_once(self, tmp_path):
        path = str(tmp_path / "c.db")
        JudgementCache(path).close()
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        start = ctx.Barrier(2)
        workers = [ctx.Process(target=write_many, args=(path, w, 300, start)) for w in range(2)]
        for p in workers:
            p.start()
        for p in workers:
            p.join(timeout=60)
        assert [p.exitcode for p in workers] == [0, 0]
        assert len(JudgementCache(path)) == 600

    def test_threads_share_one_cache(self, tmp_path):
        cache = JudgementCache(tmp_path / "c.db")

        async def go():
            await asyncio.gather(*(asyncio.to_thread(cache.put_many, [(f"k{i}", ok())]) for i in range(20)))
        asyncio.run(go())
        assert len(cache.get_many([f"k{i}" for i in range(20)])) == 20


class TestCacheKey:
    def test_every_input_changes_the_key(self):
        base = ("m", "fp", {"structured": False}, JudgeRequest("q", "r", "g"))
        variants = [("m2", *base[1:]), (base[0], "fp2", *base[2:]), (*base[:2], {"structured": True}, base[3]),
                    (*base[:3], JudgeRequest("q2", "r", "g")), (*base[:3], JudgeRequest("q", "r2", "g")),
                    (*base[:3], JudgeRequest("q", "r", None))]
        keys = {cache_key(*v) for v in [base, *variants]}
        assert len(keys) == 7


    @pytest.mark.parametrize("change", [
        {"teacher_temperature": 0.7}, {"teacher_backend": "local"}, {"openai_base_url": "http://127.0.0.1:9/v1"},
        {"think_open_string": "<reasoning>"}, {"think_close_string": "</reasoning>"},
        {"max_feedback_new_tokens": 64}])
    def test_each_setting_that_shapes_a_grade_changes_the_key(self, change):
        """Would have caught: the key held only structured output and logprobs, so a run resumed or re-pointed
        with another temperature, backend, server, think tags or grade length reused grades made otherwise."""
        base = dict(teacher_backend="openai", teacher_model_name="teacher", openai_base_url="http://127.0.0.1:8/v1")
        request = JudgeRequest("q", "r", "g")
        before = cache_key("teacher", "fp", flags_from_config(Config(**base)), request)
        after = cache_key("teacher", "fp", flags_from_config(Config(**{**base, **change})), request)
        assert before != after

    def test_credentials_in_the_url_do_not_change_the_key(self):
        urls = ["http://127.0.0.1:8/v1", "http://u:secret@127.0.0.1:8/v1/", "http://u:other@127.0.0.1:8/v1"]
        flags = [flags_from_config(Config(teacher_backend="openai", openai_base_url=u)) for u in urls]
        assert flags[0] == flags[1] == flags[2] and "secret" not in str(flags[1])


class TestCachedTeacher:
    def make(self, srv: TeacherServer, path):
        cfg = Config(teacher_backend="openai", teacher_model_name="teacher", openai_base_url=srv.base_url,
                     teacher_max_retries=0, teacher_timeout_s=5.0)
        rubric = Rubric.from_config(cfg)
        return CachedTeacher(OpenAITeacher(cfg, rubric), JudgementCache(path), cfg.teacher_model_name, rubric,
                             flags_from_config(cfg))

    def run(self, teacher: CachedTeacher, requests: list[JudgeRequest]) -> list[Judgement]:
        return judge_once(teacher, requests)

    def test_a_repeated_request_is_answered_from_the_cache(self, tmp_path):
        requests = [JudgeRequest("6*7?", "<think>x</think> 42", "42"), JudgeRequest("6*7?", "41", "42")]
        with TeacherServer() as srv:
            fresh = self.run(self.make(srv, tmp_path / "c.db"), requests)
            again = self.run(self.make(srv, tmp_path / "c.db"), requests)
            assert srv.stats()["chat_requests"] == 2
        assert [j.cached for j in fresh] == [False, False] and [j.cached for j in again] == [True, True]
        assert [j.scores for j in again] == [j.scores for j in fresh] and again[0].latency_s == 0.0

    def test_identical_requests_share_one_calls_usage(self, tmp_path):
        """Old code gave each copy the whole call's usage, so rollouts.jsonl counted one call several times."""
        same = JudgeRequest("6*7?", "<think>x</think> 42", "42")
        requests = [same, JudgeRequest("6*7?", "41", "42"), same, same]
        with TeacherServer() as srv:
            teacher = self.make(srv, tmp_path / "c.db")
            judgements = self.run(teacher, requests)
            assert srv.stats()["chat_requests"] == 2
        spent = teacher.usage.usage
        summed = {name: sum(j.extra["usage"][name] for j in judgements) for name in ("calls", "prompt_tokens")}
        assert summed["calls"] == pytest.approx(spent.calls) == 2
        assert summed["prompt_tokens"] == pytest.approx(spent.prompt_tokens) and spent.prompt_tokens > 0
        assert judgements[0].extra["usage"]["calls"] == pytest.approx(1 / 3)

    def test_a_re_pointed_run_asks_the_new_server(self, tmp_path):
        """Would have caught: the key had no server, so a run pointed at another teacher server replayed the
        first server's grades and never asked the second."""
        requests = [JudgeRequest("6*7?", "<think>x</think> 42", "42")]
        with TeacherServer() as first, TeacherServer() as second:
            self.run(self.make(first, tmp_path / "c.db"), requests)
            again = self.run(self.make(second, tmp_path / "c.db"), requests)
            assert second.stats()["chat_requests"] == 1
        assert not again[0].cached

    def test_failures_are_graded_again_next_time(self, tmp_path):
        requests = [JudgeRequest("6*7?", "42", "42")]
        with TeacherServer(fault_rate=1.0, faults=("garbage",)) as srv:
            first = self.run(self.make(srv, tmp_path / "c.db"), requests)
            second = self.run(self.make(srv, tmp_path / "c.db"), requests)
            assert srv.stats()["chat_requests"] == 2
        assert first[0].status == second[0].status == "unparseable" and not second[0].cached

    def test_identical_requests_in_one_batch_are_graded_once(self, tmp_path):
        requests = [JudgeRequest("6*7?", "42", "42")] * 4 + [JudgeRequest("6*7?", "41", "42")]
        with TeacherServer() as srv:
            judgements = self.run(self.make(srv, tmp_path / "c.db"), requests)
            assert srv.stats()["chat_requests"] == 2
        assert [j.scores["answer"] for j in judgements] == [10.0] * 4 + [0.0]
        judgements[0].scores["answer"] = -1.0
        assert judgements[1].scores["answer"] == 10.0  # copies, not one shared object
