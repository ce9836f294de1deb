"""The teacher against a real llama.cpp OpenAI-compatible server (llama-cpp-python) on the bundled GGUF model.

Runs in CI (marker `llamacpp`); nothing here skips. The 135M model is a weak judge, so the assertions are
about the pipeline (every grade parses, scores in range, logprob scores where top_logprobs came back, one
training step), not about grade quality; bench/teacher_ok_share.py measures that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from grpo_llm_eval.config import Config
from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.models import bundled_gguf_path
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.train import train
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.llamacpp

ALIAS = "teacher"
# Two right and two wrong answers, each with a think block.
RESPONSES = [JudgeRequest("What is 12 + 30?", "<think>12 + 30 = 42</think> 42", "42"),
             JudgeRequest("What is 7 * 8?", "<think>7 * 8 = 54</think> 54", "56"),
             JudgeRequest("What is 100 - 37?", "<think>100 - 37 = 63</think> 63", "63"),
             JudgeRequest("What is 9 + 9?", "<think>9 + 9 = 19</think> 19", "18")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(log_path: Path, logits_all: bool):
    """llama.cpp's server on the bundled GGUF, started as the docs start it (`python -m grpo_llm_eval.teacher.backends.llamacpp`,
    which is `python -m llama_cpp.server` with the portable model defaults); yields its base URL; always stopped.

    logits_all: llama-cpp-python needs it for logprobs, and it costs the logits of every prompt token
    (prompt x 49k vocabulary), several times slower on a small CPU; so it is on only where logprobs are asked.
    """
    port = free_port()
    command = [sys.executable, "-m", "grpo_llm_eval.teacher.backends.llamacpp", "--model", str(bundled_gguf_path("smollm2-135m-instruct")),
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--model_alias", ALIAS,
               # One thread: on a busy 2-core machine llama.cpp's spinning threads slow each other down 2-7x.
               "--n_threads", "1", "--n_threads_batch", "1", "--logits_all", str(logits_all).lower()]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url + "/models", timeout=2) as r:
                    served = [m["id"] for m in json.loads(r.read())["data"]]
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not answer /v1/models in 180 s: {log_path.read_text()[-2000:]}")
                time.sleep(0.5)
        assert served == [ALIAS]
        # The portable load (no AMX or repacked weights: teacher/backends/llamacpp.py) holds in the server too.
        assert "use_extra_bufts=False" in log_path.read_text(errors="replace")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("llama") / "server.log", logits_all=False) as url:
        yield url


@pytest.fixture(scope="module")
def llama_server_with_logprobs(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("llama-logprobs") / "server.log", logits_all=True) as url:
        yield url


def teacher_for(url: str, **settings) -> OpenAITeacher:
    cfg = Config(teacher_backend="openai", teacher_model_name=ALIAS, openai_base_url=url, teacher_timeout_s=300,
                 teacher_max_retries=1, teacher_structured_output=True, max_feedback_new_tokens=192,
                 teacher_max_concurrency=2, **settings)
    return OpenAITeacher(cfg, Rubric.from_config(cfg))


def grade(teacher: OpenAITeacher, requests: list[JudgeRequest]):
    async def go():
        try:
            await teacher.health_check()
            return await teacher.judge(requests)
        finally:
            await teacher.aclose()
    return asyncio.run(go())


def assert_in_range(judgements):
    for j in judgements:
        assert j.status == "ok", (j.status, j.error, j.raw)
        assert all(v is not None and 0.0 <= v <= 10.0 for v in j.scores.values()), j.scores


class TestGradingThroughLlamaCppServer:
    def test_structured_grades_of_real_responses_are_all_ok_and_in_range(self, llama_server):
        teacher = teacher_for(llama_server)
        judgements = grade(teacher, RESPONSES)
        assert_in_range(judgements)
        # llama-cpp-python's server refuses OpenAI's json_schema (with a 500); the schema goes as json_object.
        assert teacher.structured and teacher.structured_format == "json_object"
        grades = [json.loads(j.raw, strict=False) for j in judgements]
        # Explanations are bounded in the schema, so a rambling 135M teacher cannot run past the token limit:
        # without the bound, one of these four grades was cut at 192 tokens on an AMD EPYC machine (unparseable).
        bound = teacher.rubric.explanation_chars_within(192)
        assert all(len(g[name]["explanation"]) <= bound for g in grades for name in teacher.rubric.names)

    def test_the_health_check_learns_what_the_server_takes_so_no_call_of_the_batch_is_refused(self, llama_server):
        teacher = teacher_for(llama_server)

        async def go():
            try:
                await teacher.health_check()
                probes = teacher.usage.usage.calls
                return probes, await teacher.judge(RESPONSES[:2])
            finally:
                await teacher.aclose()

        probes, judgements = asyncio.run(go())
        assert probes == 2  # json_schema refused, then json_object with the schema taken
        assert teacher.structured_format == "json_object"
        assert teacher.usage.usage.calls == probes + 2  # one call per grade: none refused and sent again
        assert all(j.extra["usage"]["calls"] == 1 for j in judgements)

    def test_logprob_scores_are_used_where_the_server_returns_top_logprobs(self, llama_server_with_logprobs):
        teacher = teacher_for(llama_server_with_logprobs, teacher_logprob_scores=True)
        judgements = grade(teacher, RESPONSES[:2])
        assert_in_range(judgements)
        assert teacher.logprobs  # the server accepted logprobs (no fallback)
        sources = [s for j in judgements for s in j.extra["score_source"].values()]
        assert "logprob" in sources and set(sources) <= {"logprob", "parsed"}


class TestGroupJudgingThroughLlamaCppServer:
    def test_a_group_of_four_is_graded_in_one_structured_call_all_ok(self, llama_server):
        """judge_mode group with structured output: the group schema goes as json_object (a grammar fixes the
        four labels), so the 135M teacher's one answer maps back to all four responses."""
        cfg = Config(teacher_backend="openai", teacher_model_name=ALIAS, openai_base_url=llama_server,
                     teacher_timeout_s=300, teacher_max_retries=1, teacher_structured_output=True,
                     max_feedback_new_tokens=192, teacher_max_concurrency=2, judge_mode="group",
                     num_return_sequences=4)
        teacher = build_teacher(cfg, Rubric.from_config(cfg))
        requests = [JudgeRequest("What is 12 + 30?", f"<think>12 + 30 = {v}</think> {v}", "42") for v in (42, 41, 42, 52)]
        judgements = grade(teacher, requests)
        assert_in_range(judgements)
        assert teacher.backend.structured_format == "json_object"
        assert teacher.usage.usage.calls == 2 + 1  # the health check's two probes, then one call for the group
        assert len({j.extra["call_id"] for j in judgements}) == 1

    def test_groups_of_eight_bundled_problems_are_at_least_90_percent_ok(self, llama_server):
        """The offline default's group size (8) on bundled arithmetic problems, right and wrong answers with and
        without working: one structured call per group, and at least 90% of the grades ok (#18). Measured: 32 of
        32 ok on a 2-core AMD EPYC machine."""
        from grpo_llm_eval.data.bundled import read_bundled

        cfg = Config(teacher_backend="openai", teacher_model_name=ALIAS, openai_base_url=llama_server,
                     teacher_timeout_s=600, teacher_max_retries=1, teacher_structured_output=True,
                     max_feedback_new_tokens=64, teacher_max_concurrency=2, judge_mode="group",
                     num_return_sequences=8, teacher_cache=False)
        teacher = build_teacher(cfg, Rubric.from_config(cfg))
        requests = []
        for row in read_bundled("arithmetic", "test")[:4]:
            truth = int(float(row["answer"]))
            requests += [JudgeRequest(row["question"], text, row["answer"]) for a in (truth, truth + 1)
                         for text in (str(a), f"{a}.", f"The answer is {a}.", f"<think>I work it out.</think> {a}")]
        judgements = grade(teacher, requests)
        assert teacher.usage.usage.calls == 2 + 4  # the health check's two probes, then one call per group
        ok = sum(j.ok for j in judgements)
        assert ok >= 0.9 * len(judgements), [(j.status, j.error) for j in judgements if not j.ok]
        assert all(0.0 <= v <= 10.0 for j in judgements if j.ok for v in j.scores.values())


class TestTrainingWithLlamaCppTeacher:
    def test_one_training_step_graded_by_the_server(self, tiny_model, llama_server, tmp_path):
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            cfg = load_config(None, tiny_overrides(
                tiny_model, tmp_path, openai_base_url=llama_server, teacher_model_name=ALIAS, total_steps=1,
                prompts_per_step=1, num_return_sequences=2, max_new_tokens=8, teacher_structured_output=True,
                teacher_timeout_s=300, max_feedback_new_tokens=192))
            result = train(cfg)
        finally:
            torch.set_num_threads(threads)
        rows = read_jsonl(Path(result.run_dir) / "rollouts.jsonl")
        assert result.global_step == 1 and len(rows) == 2
        assert all(r["judge_status"] == "ok" and r["reward"] is not None for r in rows), [r["judge_status"] for r in rows]
