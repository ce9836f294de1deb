"""Malformed and huge teacher output: parsing stays bounded in time and memory, and nothing is made up."""

from __future__ import annotations

import sys
import time
import tracemalloc

import pytest

from grpo_llm_eval.teacher.grading.completion import MAX_CONTENT_CHARS, judgement_from_completion
from grpo_llm_eval.teacher.grading.rubric import Rubric, seed_criteria
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.testing import TeacherServer
from grpo_llm_eval.testing.grades import adversarial_text
from tests.reliability.helpers import run_async, teacher_at

RUBRIC = Rubric(seed_criteria())
GOOD = ("<evaluation><thought_process><score>7</score></thought_process><answer><score>8</score></answer>"
        "<format><score>9</score></format></evaluation>")
MB = 1_000_000
# Each is a shape that makes a naive parser slow or hungry: regex backtracking, quadratic JSON retries,
# deep recursion, giant numbers, unclosed tags.
HOSTILE = {
    "mixed near-misses": lambda n: adversarial_text(n, seed=1),
    "unclosed JSON objects": lambda n: ('{"answer": [' * (n // 12 + 1))[:n],
    "unclosed evaluation tags": lambda n: ("<evaluation><answer><score>" * (n // 27 + 1))[:n],
    "deep brackets": lambda n: "[" * n,
    "one giant number": lambda n: "<evaluation><answer><score>" + "9" * n,
    "escaped quotes": lambda n: '{"answer": "' + '\\"' * (n // 2),
    "spaces inside tags": lambda n: "<" + " " * n + "evaluation>",
    # every `{"` starts an object whose unclosed array runs to the end: each decode attempt scans it all
    "long unclosed arrays": lambda n: (('{"answer": [' + "1," * 20_000) * (n // 40_012 + 1))[:n],
}
# What parsing may allocate, whatever the input's size: it reads only the last MAX_PARSE_CHARS characters.
MEMORY_BOUND = 1_000_000


def measure(fn):
    """(result, seconds, peak bytes allocated while it ran)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        result = fn()
        return result, time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class TestHugeTeacherOutput:
    @pytest.mark.parametrize("shape", list(HOSTILE))
    @pytest.mark.parametrize("size", [1 * MB, 5 * MB])
    def test_megabytes_of_hostile_text_parse_fast_in_bounded_memory_as_unparseable(self, shape, size):
        text = HOSTILE[shape](size)
        judgement, seconds, peak = measure(lambda: judgement_from_completion(
            RUBRIC, text, None, None, False, "<think>", "</think>", latency_s=0.0, attempts=1))
        assert judgement.status == "unparseable" and all(v is None for v in judgement.scores.values())
        assert seconds < 1.0, f"{shape}: {seconds:.2f}s"
        assert peak < MEMORY_BOUND, f"{shape}: peak {peak / sys.getsizeof(text):.2f}x the input"

    @pytest.mark.parametrize("shape", list(HOSTILE))
    def test_the_parser_alone_is_bounded_too(self, shape):
        text = HOSTILE[shape](5 * MB)
        parsed, seconds, peak = measure(lambda: RUBRIC.parse(text))
        assert parsed.status == "unparseable" and seconds < 1.0
        assert peak < MEMORY_BOUND, f"{shape}: peak {peak / sys.getsizeof(text):.3f}x the input"

    def test_a_real_grade_after_megabytes_of_junk_is_still_read(self):
        text = adversarial_text(3 * MB) + "\nFinal grade:\n" + GOOD
        judgement, seconds, _ = measure(lambda: judgement_from_completion(
            RUBRIC, text, None, None, False, "<think>", "</think>", latency_s=0.0, attempts=1))
        assert judgement.status == "ok" and judgement.scores == {"thought_process": 7.0, "answer": 8.0, "format": 9.0}
        assert seconds < 1.0

    def test_what_a_grade_keeps_is_cut_to_a_bounded_tail(self):
        text = adversarial_text(2 * MB) + GOOD
        j = judgement_from_completion(RUBRIC, text, "r" * (2 * MB), None, False, "<think>", "</think>", 0.0, 1)
        assert j.ok and len(j.raw) == MAX_CONTENT_CHARS and j.raw.endswith(GOOD)
        assert j.extra["cut_chars"] == len(text) - MAX_CONTENT_CHARS
        assert len(j.feedback) < 2 * MAX_CONTENT_CHARS + 100  # reasoning and content, each cut

    def test_a_server_answering_five_megabytes_gives_an_unparseable_grade_quickly(self):
        with TeacherServer(fault_rate=1.0, faults=("huge",), huge_chars=5 * MB) as srv:
            teacher = teacher_at(srv.base_url, teacher_max_retries=3)
            start = time.monotonic()
            [j] = run_async(teacher, lambda: teacher.judge([JudgeRequest("1+1?", "<think>1+1</think> 2", "2")]))
            assert srv.stats()["chat_requests"] == 1  # unparseable is not asked again
        assert j.status == "unparseable" and j.scores["answer"] is None
        assert time.monotonic() - start < 10
        assert len(j.raw) == MAX_CONTENT_CHARS and j.extra["cut_chars"] == 5 * MB - MAX_CONTENT_CHARS
