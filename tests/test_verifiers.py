"""Verifier rewards: the answer check and the think-tag format check."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from grpo_llm_eval.verifiers import answer_correct, format_correct


class TestAnswerCorrect:
    def test_plain_number_equal_to_ground_truth(self):
        assert answer_correct("42", "42") is True

    def test_wrong_number(self):
        assert answer_correct("The answer is 41.", "42") is False

    def test_boxed_latex_answer_after_thinking(self):
        assert answer_correct("<think>40+2</think> so $\\boxed{42}$", "42") is True

    def test_numbers_inside_the_thinking_do_not_count(self):
        assert answer_correct("<think>maybe 42</think> 41", "42") is False

    def test_no_ground_truth_means_unchecked(self):
        assert answer_correct("42", None) is None and answer_correct("42", "  ") is None

    def test_works_off_the_main_thread(self):
        # TRL runs async rewards in a loop thread, where signal-based timeouts cannot work.
        out = []
        t = threading.Thread(target=lambda: out.append(answer_correct("$\\frac{1}{2}$", "0.5")))
        t.start()
        t.join(30)
        assert out == [True]

    def test_empty_response_is_wrong(self):
        assert answer_correct("", "3") is False

    def test_restating_the_question_is_not_the_answer(self):
        # math-verify evaluates "19 + 25" to 44; a student trained on that reward learned to echo questions.
        assert answer_correct("To calculate 19 + 25, we need to think of a", "44") is False
        assert answer_correct("19 + 25", "44") is False
        assert answer_correct("19 + 25 = 44", "44") is True

    def test_thousands_separator_and_decimal_forms_of_the_number_count(self):
        assert answer_correct("$\\boxed{1,000}$", "1000") is True
        assert answer_correct("44.0", "44") is True

    def test_a_non_numeric_ground_truth_is_left_to_math_verify(self):
        assert answer_correct("$\\frac{1}{2}$", "1/2") is True

    @settings(max_examples=60, deadline=None)
    @given(a=st.integers(0, 999), b=st.integers(0, 999), op=st.sampled_from(["+", "-", "*"]),
           said=st.integers(-2000, 999_000))
    def test_arithmetic_answers(self, a, b, op, said):
        truth = str(eval(f"{a} {op} {b}"))
        assert answer_correct(f"To calculate {a} {op} {b}, we", truth) is (truth in (str(a), str(b)))
        assert answer_correct(f"{a} {op} {b} = {said}", truth) is (str(said) == truth)


class TestFormatCorrect:
    def test_think_block_then_answer(self):
        assert format_correct("<think>3+4=7</think> 7") is True

    def test_no_tags(self):
        assert format_correct("7") is False

    def test_empty_answer_after_thinking(self):
        assert format_correct("<think>3+4</think>  ") is False

    def test_two_think_blocks(self):
        assert format_correct("<think>a</think>b<think>c</think>d") is False

    def test_custom_tags(self):
        assert format_correct("[T]x[/T] y", "[T]", "[/T]") is True


# A nested power that math-verify (sympy) computes for ever (Math-Verify issue 65): measured here, parse returns
# in 0.07 s and verify against "7" had not returned after 15 s. It writes the number 7, so the integer guard
# lets it through to math-verify.
POWER_TOWER = "<think>7</think> $\\boxed{7^{7^{7^{7}}}}$"

# Run in a child with a deadline, so that a regression hangs the child, not the test suite.
_TOWER_CHILD = r"""
import json, sys, threading, time
from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.rewards import TeacherRubricReward
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.verifiers import answer_correct

tower, overrides = sys.argv[1], sys.argv[2:]
answer_correct("$\\boxed{7}$", "7")  # start the checker before timing
cfg = load_config(None, overrides)
reward = TeacherRubricReward(cfg, Rubric.from_config(cfg), teacher=None)
out = {}
def run():  # off the main thread, as TRL calls rewards
    start = time.perf_counter()
    out["row"] = reward.score(None, tower, "7")
    out["tower_s"] = time.perf_counter() - start
    out["after"] = answer_correct("$\\boxed{7}$", "7")
t = threading.Thread(target=run)
t.start()
t.join()
print(json.dumps(out))
"""


def _score_tower(*overrides: str) -> dict:
    import json
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", _TOWER_CHILD, POWER_TOWER, "teacher_weight=0", *overrides],
                             capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        raise AssertionError("scoring a power tower did not return within 90 s: the answer check is unbounded") from None
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


class TestBoundedAnswerCheck:
    def test_a_power_tower_costs_bounded_time_and_scores_unverified(self):
        """Would have caught: math-verify ran in the reward's thread with its timeouts off, so this response
        stalled the reward (and with it every training step and background teacher call) for ever."""
        from grpo_llm_eval import verify_worker

        result = _score_tower("verifier_answer_weight=1.0")
        assert result["tower_s"] < verify_worker.CHECK_TIMEOUT_S + 5.0
        assert result["row"]["answer_correct"] is False and result["row"]["reward"] == 0.0
        assert result["after"] is True, "the checker must work again after a killed check"

    def test_the_check_is_skipped_when_nothing_uses_it(self):
        """Would have caught: the answer was checked for every completion even with no verifier weight, no veto
        and no monitor, so a hostile response cost the check's time for nothing."""
        result = _score_tower("verifier_answer_weight=0", "verifier_format_weight=1", "verifier_monitor=false")
        assert result["row"]["answer_correct"] is None
        assert result["tower_s"] < 0.5

    def test_a_dead_checker_is_replaced(self):
        from grpo_llm_eval.verify_worker import BoundedVerifier

        checker = BoundedVerifier()
        try:
            assert checker.check("7", "$\\boxed{7}$") is True
            checker._proc.kill()
            checker._proc.wait()
            assert checker.check("0.5", "$\\frac{1}{2}$") is True and checker.starts == 2
        finally:
            checker.close()

    def test_a_forked_process_gets_its_own_checker(self):
        """A fork (e.g. a data-loader worker) must not share the parent's pipes, nor stop its checker at exit."""
        import os

        from grpo_llm_eval import verify_worker

        checker = verify_worker.shared()
        assert checker.check("7", "$\\boxed{7}$") is True
        parent_child = checker._proc.pid
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the forked child reports through its exit code)
            ok = False
            try:
                ok = checker.check("0.5", "$\\frac{1}{2}$") is True and checker._proc.pid != parent_child
                checker.close()
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert checker._proc.pid == parent_child and checker.check("44", "44") is True
