"""Several replicas of one teacher (`openai_base_url` as a list), against real loopback servers (no mocks)."""

from __future__ import annotations

import asyncio
import base64

import pytest

from grpo_llm_eval.config import Config
from grpo_llm_eval.config.load import ConfigError, apply_overrides, load_config, to_dict, validate
from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import TeacherUnavailable
from grpo_llm_eval.testing import TeacherServer
from tests.conftest import judge_once
from tests.test_openai_backend import arithmetic, check, free_port


def make_teacher(urls, **overrides) -> OpenAITeacher:
    settings = {"teacher_timeout_s": 5.0, "teacher_max_retries": 0, "teacher_max_concurrency": 8, **overrides}
    cfg = Config(teacher_backend="openai", teacher_model_name="teacher", openai_base_url=urls, **settings)
    return OpenAITeacher(cfg, Rubric.from_config(cfg), backoff_base_s=0.05, probe_s=0.05)


def chat_requests(srv: TeacherServer) -> int:
    return srv.stats()["chat_requests"]


class TestFailover:
    def test_a_replica_that_dies_mid_batch_loses_no_grade_and_its_calls_move(self):
        # No retries at all: only the failover to the other replica can save the calls the dead one drops.
        with TeacherServer(latency_s=0.05, die_after=6) as a, TeacherServer(latency_s=0.05) as b:
            teacher = make_teacher([a.base_url, b.base_url])
            judgements = judge_once(teacher, arithmetic(40))
            served_a, served_b = chat_requests(a), chat_requests(b)
        assert [j.status for j in judgements] == ["ok"] * 40
        assert [j.scores["answer"] for j in judgements] == [10.0 if i % 2 == 0 else 0.0 for i in range(40)]
        assert served_a <= 10 and served_b >= 30  # A served its 6 (and those it had started), B took over
        assert teacher.stats["failovers"] >= 1  # at least one call met the dead replica and was sent on
        calls = teacher.usage.endpoint_calls
        assert calls[1] >= 30 and sum(calls) == 40 + teacher.stats["failovers"]

    def test_calls_spread_over_healthy_replicas(self):
        with TeacherServer(latency_s=0.05) as a, TeacherServer(latency_s=0.05) as b:
            teacher = make_teacher([a.base_url, b.base_url])
            judgements = judge_once(teacher, arithmetic(20))
            served = chat_requests(a), chat_requests(b)
        assert all(j.ok for j in judgements)
        # Least loaded first: both replicas share the batch (the exact split depends on which calls end first).
        assert sum(served) == 20 and min(served) >= 6 and list(served) == teacher.usage.endpoint_calls

    def test_a_replica_taken_out_is_probed_back_in(self):
        with TeacherServer(latency_s=0.02) as a, TeacherServer(latency_s=0.02) as b:
            teacher = make_teacher([a.base_url, b.base_url], teacher_max_concurrency=2)
            a.kill()
            first = judge_once(teacher, arithmetic(10))
            assert all(j.ok for j in first) and chat_requests(b) == 10
            assert teacher.endpoints.endpoints[0].down
            a.start()  # same port, alive again
            before = chat_requests(a)
            second = judge_once(teacher, arithmetic(20, start=10))
            back = chat_requests(a) - before
        assert all(j.ok for j in second)
        assert not teacher.endpoints.endpoints[0].down and back >= 5  # probed back in, and used again

    def test_with_one_url_nothing_is_taken_out_and_retries_work_as_before(self):
        with TeacherServer(fault_script=("500", "500")) as srv:
            teacher = make_teacher(srv.base_url, teacher_max_retries=2)
            [j] = judge_once(teacher, arithmetic(1))
        assert j.ok and j.attempts == 3 and teacher.stats["failovers"] == 0
        assert teacher.usage.endpoint_calls == []  # one replica: no per-replica counts


class TestHealthCheck:
    def test_the_check_names_the_unreachable_replica(self):
        dead = f"http://127.0.0.1:{free_port()}/v1"
        with TeacherServer() as a:
            with pytest.raises(TeacherUnavailable) as info:
                check(make_teacher([a.base_url, dead]))
            assert a.stats()["model_requests"] == 1
        assert str(info.value).startswith(f"cannot reach teacher replica 2 of 2 at {dead}")

    def test_the_check_names_the_replica_that_lacks_the_model(self):
        with TeacherServer() as a, TeacherServer(models=("other",)) as b:
            with pytest.raises(TeacherUnavailable) as info:
                check(make_teacher([a.base_url, b.base_url]))
        assert f"replica 2 of 2 at {b.base_url} does not serve 'teacher'" in str(info.value)

    def test_credentials_are_per_url(self):
        def basic(user, password):
            return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

        with TeacherServer(require_auth=basic("u1", "p1")) as a, TeacherServer(require_auth=basic("u2", "p2")) as b:
            urls = [a.base_url.replace("http://", "http://u1:p1@"), b.base_url.replace("http://", "http://u2:p2@")]
            teacher = make_teacher(urls)
            check(teacher)
            judgements = judge_once(teacher, arithmetic(6))
            served = chat_requests(a), chat_requests(b)
        assert all(j.ok for j in judgements) and served == (3, 3)
        assert "p1" not in teacher.url and "p2" not in teacher.url


class TestConfig:
    def test_a_list_is_taken_from_yaml_and_from_set(self):
        cfg = validate(apply_overrides({"teacher_backend": "openai", "teacher_model_name": "t"},
                                       ["openai_base_url=[http://h1:8000/v1,http://u:secret@h2:8000/v1]"]))
        assert cfg.openai_base_url == ["http://h1:8000/v1", "http://u:secret@h2:8000/v1"]
        assert to_dict(cfg)["openai_base_url"] == ["http://h1:8000/v1", "http://***@h2:8000/v1"]
        assert load_config(None, ["openai_base_url=http://h1:8000/v1"]).openai_base_url == "http://h1:8000/v1"

    @pytest.mark.parametrize("value", [[], ["http://h:1/v1", ""], ["http://h:1/v1", "http://h:1/v1"], 3])
    def test_a_bad_list_is_refused_naming_the_key(self, value):
        with pytest.raises(ConfigError) as info:
            validate({"teacher_backend": "openai", "teacher_model_name": "t", "openai_base_url": value})
        assert str(info.value).startswith("openai_base_url: ")


def test_replicas_serve_several_event_loops():
    with TeacherServer() as a, TeacherServer() as b:
        teacher = make_teacher([a.base_url, b.base_url])
        for start in (0, 4):
            assert all(j.ok for j in asyncio.run(teacher.judge(arithmetic(4, start))))
        asyncio.run(teacher.aclose())


def test_a_training_run_loses_no_grade_when_a_replica_dies_and_logs_calls_by_endpoint(tiny_model, tmp_path):
    import subprocess
    import sys

    from grpo_llm_eval.training.records import read_jsonl
    from tests.conftest import tiny_overrides

    with TeacherServer(mode="scripted", latency_s=0.05, die_after=6) as a, TeacherServer(mode="scripted") as b:
        args = [sys.executable, "-m", "grpo_llm_eval.cli", "train"]
        for s in tiny_overrides(tiny_model, tmp_path, openai_base_url=[a.base_url, b.base_url], total_steps=3,
                                save_steps=100, teacher_max_retries=0):
            args += ["--set", s]
        done = subprocess.run(args, capture_output=True, text=True, timeout=600)
        served = chat_requests(a), chat_requests(b)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert all(r["judge_status"] == "ok" for r in read_jsonl(run / "rollouts.jsonl"))  # no retries: failover only
    rows = [m for m in read_jsonl(run / "metrics.jsonl") if "judge/calls" in m]
    by_endpoint = [sum(m[f"judge/calls_by_endpoint/{i}"] for m in rows) for i in (0, 1)]
    assert sum(by_endpoint) == sum(m["judge/calls"] for m in rows)
    assert by_endpoint[0] >= served[0] >= 6 and by_endpoint[1] == served[1] > by_endpoint[0]  # the calls moved to B
