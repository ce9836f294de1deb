"""`teacher_samples: k`: each completion graded k times at teacher_temperature and averaged, against a real sampled
teacher server on loopback (its `random` mode draws afresh per request at temperature > 0)."""

from __future__ import annotations

import asyncio
import json
import statistics

import pytest

from grpo_llm_eval.config import SEED_EVALUATION_PROMPT
from grpo_llm_eval.config.load import ConfigError, load_config
from grpo_llm_eval.evaluation.calibrate import MASTER_KEYS, calibrate, measure
from grpo_llm_eval.rewards import TeacherRubricReward
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.cache import JudgementCache
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.samples import SampledTeacher
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from tests.conftest import CACHE_DIR, judge_once


def config(server, *extra: str):
    return load_config(None, [
        "teacher_backend=openai", "teacher_model_name=teacher", f"openai_base_url={server.base_url}",
        "teacher_structured_output=false", "teacher_logprob_scores=false", "max_feedback_new_tokens=512",
        "teacher_max_retries=0", f"evaluation_prompt={SEED_EVALUATION_PROMPT}", f"cache_dir={CACHE_DIR}",
        "teacher_temperature=0.7", *extra])


def requests(n: int) -> list[JudgeRequest]:
    return [JudgeRequest(f"What is {i} + {i}?", f"<think>{i}+{i}</think> {2 * i}", str(2 * i)) for i in range(n)]


def check_average(j, rubric) -> None:
    """J's scores are the mean of its ok samples, and its spread their rewards' population std."""
    ok = [s for s in j.extra["samples"] if s["status"] == "ok"]
    for name in rubric.names:
        assert j.scores[name] == pytest.approx(statistics.fmean(s["scores"][name] for s in ok))
    rewards = [rubric.reward(s["scores"]) for s in ok]
    if len(rewards) >= 2:
        assert j.extra["sample_spread"] == pytest.approx(statistics.pstdev(rewards))
    else:
        assert j.extra["sample_spread"] is None


class TestSampledTeacher:
    def test_three_samples_send_three_calls_per_completion_and_average_them(self):
        with TeacherServer(mode="random") as server:
            cfg = config(server, "teacher_samples=3")
            rubric = Rubric.from_config(cfg)
            teacher = build_teacher(cfg, rubric)
            assert isinstance(teacher, SampledTeacher)
            judgements = judge_once(teacher, requests(6))
            assert server.stats()["chat_requests"] == 18
        assert teacher.usage.usage.calls == 18
        for j in judgements:
            assert j.ok and len(j.extra["samples"]) == 3 and j.extra["usage"]["calls"] == 3
            check_average(j, rubric)
        # The draws differ (a fixed seed or a shared grade would make every spread 0).
        assert sum(j.extra["sample_spread"] > 0 for j in judgements) >= 4

    def test_a_failed_sample_is_left_out_of_the_average_and_all_failed_is_a_failure(self):
        with TeacherServer(mode="random", fault_script=("500", None, None, "500", "500", "500")) as server:
            cfg = config(server, "teacher_samples=3", "teacher_max_concurrency=1")
            rubric = Rubric.from_config(cfg)
            first = judge_once(build_teacher(cfg, rubric), requests(1))[0]
            second = judge_once(build_teacher(cfg, rubric), requests(2)[1:])[0]
        assert first.ok and [s["status"] for s in first.extra["samples"]].count("http_error") == 1
        check_average(first, rubric)
        assert not second.ok and second.status == "http_error" and second.error
        assert all(v is None for v in second.scores.values()) and second.extra["sample_spread"] is None

    def test_the_cache_keeps_samples_apart_and_a_single_grade_cache_serves_as_sample_zero(self, tmp_path):
        path = tmp_path / "judgements.sqlite"
        with TeacherServer(mode="random") as server:
            single = config(server)
            rubric = Rubric.from_config(single)
            judge_once(build_teacher(single, rubric, cache_path=path), requests(4))
            assert server.stats()["chat_requests"] == 4
            sampled = config(server, "teacher_samples=3")
            fresh = judge_once(build_teacher(sampled, rubric, cache_path=path), requests(4))
            assert server.stats()["chat_requests"] == 4 + 4 * 2  # sample 0 came from the cache written with k=1
            again = judge_once(build_teacher(sampled, rubric, cache_path=path), requests(4))
            assert server.stats()["chat_requests"] == 12  # every sample cached, each under its own key
        cache = JudgementCache(path)
        assert len(cache) == 12
        cache.close()
        for a, b in zip(fresh, again, strict=True):
            assert a.scores == b.scores and a.extra["samples"] == b.extra["samples"] and b.cached
            assert "usage" not in b.extra  # a cached grade cost nothing

    def test_the_reward_function_reports_the_mean_sample_spread(self):
        with TeacherServer(mode="random") as server:
            cfg = config(server, "teacher_samples=2")
            rubric = Rubric.from_config(cfg)
            teacher = build_teacher(cfg, rubric)
            reward = TeacherRubricReward(cfg, rubric, teacher)
            reqs = requests(4)
            logged: dict[str, float] = {}

            async def go():
                try:
                    return await reward([[{"role": "user", "content": r.question}] for r in reqs],
                                        [[{"role": "assistant", "content": r.response}] for r in reqs],
                                        answer=[r.ground_truth for r in reqs], log_metric=logged.__setitem__)
                finally:
                    await teacher.aclose()

            asyncio.run(go())
        assert logged["judge/sample_spread"] > 0


class TestConfig:
    def test_samples_at_temperature_zero_are_refused_with_the_fix(self):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["teacher_samples=3", "teacher_temperature=0", "teacher_backend=openai",
                               "teacher_logprob_scores=false"])
        (line,) = [p for p in err.value.problems if p.startswith("teacher_samples")]
        assert "teacher_temperature: 0" in line and "set teacher_temperature above 0" in line

    def test_samples_with_the_local_forced_key_scores_are_refused_and_decoded_local_grades_are_not(self):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["teacher_samples=2", "teacher_temperature=0.7"])  # the offline default: forced keys
        assert any("forced-key" in p and "teacher_logprob_scores: false" in p for p in err.value.problems)
        cfg = load_config(None, ["teacher_samples=2", "teacher_temperature=0.7", "teacher_logprob_scores=false",
                                 "teacher_structured_output=true", "max_feedback_new_tokens=128"])
        assert cfg.teacher_samples == 2

    def test_zero_samples_is_refused(self):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["teacher_samples=0"])
        assert any(p.startswith("teacher_samples") for p in err.value.problems)


class TestCalibrate:
    def test_self_disagreement_comes_from_the_samples_without_a_second_round(self, tmp_path):
        rows = [{"question": f"What is {i} + 1?", "response": f"<think>add</think> {i + 1 + i % 2}",
                 "answer": str(i + 1)} for i in range(10)]
        responses = tmp_path / "responses.jsonl"
        responses.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        with TeacherServer(mode="random") as server:
            cfg = config(server, "teacher_samples=3")
            result = calibrate(cfg, tmp_path / "cal", responses=responses)
            # 3 samples of each response and master key; no repeat round on top.
            assert server.stats()["chat_requests"] == 3 * (len(rows) + len(MASTER_KEYS))
        assert result["self_disagreement"] is not None and result["self_disagreement"] > 0
        graded = read_jsonl(tmp_path / "cal" / "calibration_rollouts.jsonl")
        assert all(len(r["sample_answer_scores"]) == 3 for r in graded)
        assert measure(graded, Rubric.from_config(cfg), seed=cfg.seed)["self_disagreement"] == result["self_disagreement"]


class TestLocalDecodedSamples:
    def test_each_sample_draws_with_its_own_seed_and_a_repeat_of_one_sample_is_the_same_draw(self):
        """Would have caught: the local backend seeded every decoded grade with the run's seed, so k samples at
        teacher_temperature > 0 were k copies of one draw."""
        from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher

        cfg = load_config(None, ["teacher_logprob_scores=false", "teacher_temperature=1.0",
                                 "max_feedback_new_tokens=40"])
        teacher = LocalTeacher(cfg, Rubric.from_config(cfg), n_threads=1)
        (req,) = requests(1)
        other = JudgeRequest(req.question, req.response, req.ground_truth, sample=1)
        # The first grade evaluates the whole prompt at once, the later ones reuse its cached prefix, and the
        # sums come out in another order: at temperature 1 that alone may change a draw, so it is left out.
        _, first, second, first_again = judge_once(teacher, [req, req, other, req])
        assert first.raw != second.raw
        assert first.raw == first_again.raw


class TestSamplesOfGroups:
    def test_each_group_is_graded_k_times_in_separate_calls_and_each_completion_averaged(self):
        with TeacherServer(mode="random") as server:
            cfg = config(server, "teacher_samples=3", "judge_mode=group", "num_return_sequences=4")
            rubric = Rubric.from_config(cfg)
            reqs = [JudgeRequest(f"What is {q} + 1?", f"<think>add</think> {q + 1 + i}", str(q + 1))
                    for q in range(2) for i in range(4)]
            judgements = judge_once(build_teacher(cfg, rubric), reqs)
            assert server.stats()["chat_requests"] == 2 * 3  # two groups of four, three samples each
        for j in judgements:
            assert j.ok and len(j.extra["samples"]) == 3 and j.extra["usage"]["calls"] == pytest.approx(3 / 4)
            check_average(j, rubric)
        assert sum(j.extra["sample_spread"] > 0 for j in judgements) >= 6
