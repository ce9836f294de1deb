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
