"""Verifier rewards: checks that need no teacher (answer equality with math-verify, think-tag format)."""

from __future__ import annotations

import logging
import re

from grpo_llm_eval import verify_worker

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)?")
_INTEGER = re.compile(r"-?\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _strip_thinking(text: str, think_close: str) -> str:
    """The answer part of a response: what follows the last closing think tag, if any."""
    if think_close and think_close in text:
        return text.rsplit(think_close, 1)[1]
    return text


def answer_part(response: str, think_close: str = "</think>") -> str:
    """The answer part of a response: what follows the last THINK_CLOSE, or all of it when there is none.

    >>> answer_part("<think>a</think>b</think> c")
    ' c'
    """
    return _strip_thinking(response or "", think_close)


def _states_number(answer: str, gold: str) -> bool:
    """Whether ANSWER writes the number GOLD itself (thousands separators allowed), not only an expression of it."""
    value = float(gold)
    return any(float(n.replace(",", ".")) == value for n in _NUMBER.findall(_THOUSANDS.sub("", answer)))


def answer_correct(response: str, ground_truth: str | None, think_close: str = "</think>") -> bool | None:
    """Whether the response's final answer equals the ground truth (None: no ground truth to check against).

    Uses math-verify (LaTeX and plain expressions, `\\boxed{}` included) in a child process with a deadline
    (`verify_worker`): an answer that makes it compute for ever, such as a nested power, reads as False (not
    verified) after `verify_worker.CHECK_TIMEOUT_S`. Where math-verify parses nothing or raises, the last
    numbers are compared.
    Where the ground truth is an integer, the response must also write that integer: math-verify evaluates
    expressions, so "To calculate 19 + 25, we" would otherwise count as the answer 44. A student trained on
    this reward learned exactly that within 10 steps (see the README's Results). A decimal or symbolic ground
    truth is left to math-verify, so "$\\frac{1}{2}$" still answers 0.5.

    >>> answer_correct("<think>3+4</think> The answer is $\\\\boxed{7}$", "7")
    True
    >>> answer_correct("It is 8", "7")
    False
    >>> answer_correct("To calculate 3 + 4, we", "7")
    False
    """
    if ground_truth is None or not str(ground_truth).strip():
        return None
    answer = _strip_thinking(response or "", think_close)
    gold = str(ground_truth).strip()
    if _INTEGER.fullmatch(gold) and not _states_number(answer, gold):
        return False
    try:
        verdict = verify_worker.shared().check(gold, answer[-2000:])
        if verdict is not None:
            return verdict
    except verify_worker.CheckTimeout as exc:
        # A hostile answer (a power tower) must not earn the reward by stalling the check: not verified.
        _log_timeout(exc)
        return False
    except ValueError as exc:  # math-verify raises on odd input; fall back rather than lose the sample
        logger.debug("math-verify failed (%s); comparing last numbers", exc)
    numbers = _NUMBER.findall(answer)
    gold_numbers = _NUMBER.findall(str(ground_truth))
    if not numbers or not gold_numbers:
        return False
    try:
        return float(numbers[-1].replace(",", ".")) == float(gold_numbers[-1].replace(",", "."))
    except ValueError:
        return False


def _log_timeout(exc: Exception) -> None:
    count = verify_worker.shared().timeouts
    if count == 1 or count % 100 == 0:  # a student that learns the trick would otherwise flood the log
        logger.warning("answer check: %s (%d such answers so far); the answer counts as not verified", exc, count)


def format_correct(response: str, think_open: str = "<think>", think_close: str = "</think>") -> bool:
    """Whether the response has one think block followed by a non-empty answer.

    >>> format_correct("<think>4+3=7</think>7")
    True
    >>> format_correct("7")
    False
    """
    text = response or ""
    start = text.find(think_open)
    end = text.find(think_close, start + len(think_open)) if start >= 0 else -1
    if start < 0 or end < 0 or text.count(think_open) != 1 or text.count(think_close) != 1:
        return False
    return bool(text[start + len(think_open):end].strip()) and bool(text[end + len(think_close):].strip())


def _checkable(item) -> bool:
    spec = item.get("check") if isinstance(item, dict) else None
    return isinstance(spec, dict) and spec.get("type") is not None


def _weight(item: dict) -> float:
    weight = item.get("weight")
    return 1.0 if weight is None else float(weight)


def _checked(items, response: str, think_close: str) -> list[tuple[str, float, bool]]:
    """(name, weight, passed) of each item of ITEMS that has a check."""
    from grpo_llm_eval.data.constraints import check  # data/ imports this module: import at first use

    return [(str(item.get("id") or item.get("criterion") or index), _weight(item),
             check(item["check"], response, think_close))
            for index, item in enumerate(items or []) if _checkable(item)]


def checklist_results(items, response: str, think_close: str = "</think>") -> dict[str, bool]:
    """Item id -> whether RESPONSE passes the item's programmatic check, for the items that have one.

    ITEMS are rubric items `{id, criterion, description, weight, check}`; `check` is a constraint spec of
    `grpo_llm_eval.data.constraints` (None, or absent, for an item only a teacher can grade). An item without
    an id is named by its criterion, else by its position. Only the answer part is checked (after the last
    THINK_CLOSE). Raises ValueError for a check that is not a valid spec (`constraints.validate_spec` says
    why before a run).

    >>> checklist_results([{"id": "no_commas", "check": {"type": "no_commas"}}, {"id": "tone", "check": None}],
    ...                   "Hello, world")
    {'no_commas': False}
    """
    return {name: passed for name, _, passed in _checked(items, response, think_close)}


def checklist_score(items, response: str, think_close: str = "</think>") -> float | None:
    """Weighted share of the checkable items RESPONSE passes, in [0, 1]; None when no item has a check.

    The explicit aggregation of Rubrics as Rewards and HealthBench: the weights of the items met over the sum
    of the positive weights, clipped to [0, 1]. A negative weight is a pitfall: met, it subtracts. A missing
    weight is 1. Only items with a `check` count, in the numerator and the denominator; None also when no
    checkable item has a positive weight (nothing to earn).

    >>> items = [{"id": "lowercase", "weight": 1.0, "check": {"type": "lowercase"}},
    ...          {"id": "max_words", "weight": 3.0, "check": {"type": "max_words", "n": 3, "word": None}},
    ...          {"id": "rude", "weight": -2.0, "check": {"type": "must_include", "word": "idiot"}}]
    >>> checklist_score(items, "all lowercase here")
    1.0
    >>> checklist_score(items, "Four words, not lowercase")
    0.0
    >>> checklist_score(items, "you idiot")
    0.5
    """
    checked = _checked(items, response, think_close)
    total = sum(weight for _, weight, _ in checked if weight > 0)
    if total <= 0:
        return None
    earned = sum(weight for _, weight, passed in checked if passed)
    return min(1.0, max(0.0, earned / total))
