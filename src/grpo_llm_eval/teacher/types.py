"""Typed requests and results of the teacher, and the interface every backend implements."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

# Statuses a Judgement can carry. "ok" is the only one whose scores count.
STATUS_OK = "ok"
# "truncated": the grade stopped at max_feedback_new_tokens before its scores were complete.
# "budget_spent": the call was not sent because a teacher token or cost budget was spent.
# "group_mismatch": a group grade's labels or count did not match the responses it was shown (judge_mode: group).
STATUSES = ("ok", "http_error", "timeout", "rate_limited", "connection_error", "unparseable", "incomplete", "empty",
            "truncated", "budget_spent", "error", "group_mismatch")


class TeacherUnavailable(RuntimeError):
    """The teacher cannot be used at all (unreachable, wrong model name): raised by health_check, fail fast."""


@dataclass(frozen=True)
class RubricItem:
    """One item of an example's own rubric (``dataset_rubric_column``; data/rubrics.py reads and checks them).

    ``id`` names the item's score in grades and records (stable across rows where the data gives it); ``text`` is
    what the teacher reads; a negative ``weight`` marks a pitfall (met = the response makes that mistake);
    ``check`` is the item's programmatic check as canonical JSON (data/constraints.py), never shown to the teacher.
    """

    id: str
    text: str
    weight: float = 1.0
    check: str | None = None


@dataclass(frozen=True)
class JudgeRequest:
    """One student response to grade; ``rubric`` holds the example's own items (empty: the config's criteria)."""

    question: str
    response: str
    ground_truth: str | None = None
    sample: int = 0  # which of teacher_samples repeated grades this is (0: the first)
    rubric: tuple[RubricItem, ...] = ()


@dataclass(frozen=True)
class GroupCall:
    """One teacher call that grades several responses to ONE question (``judge_mode: group``).

    ``responses`` are in presentation order (already shuffled), labelled ``group_prompt.labels(len(responses))``;
    ``call_id`` is recorded with every completion the call graded; ``sample`` is which of ``teacher_samples``
    repeated grades this call is (a sampling teacher's seed follows it).
    """

    question: str
    ground_truth: str | None
    responses: tuple[str, ...]
    call_id: str
    sample: int = 0
    rubric: tuple[RubricItem, ...] = ()


@dataclass
class Judgement:
    """A teacher's grade of one response. A failure is a status, never a made-up score.

    >>> Judgement(scores={"answer": 9.0}, feedback="Right.", raw="...", status="ok").ok
    True
    """

    scores: dict[str, float | None]
    feedback: str | None
    raw: str | None
    status: str
    latency_s: float = 0.0
    attempts: int = 1
    cached: bool = False
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def failed(cls, status: str, criteria: list[str], error: str | None = None, raw: str | None = None,
               latency_s: float = 0.0, attempts: int = 1) -> Judgement:
        return cls(scores={c: None for c in criteria}, feedback=None, raw=raw, status=status,
                   latency_s=latency_s, attempts=attempts, error=error)


class Teacher(Protocol):
    """What the reward function needs: grade a batch concurrently, in order. `usage` (a usage.UsageMeter)
    counts every call made and refuses new ones once a budget is spent."""

    usage: object

    async def judge(self, requests: list[JudgeRequest]) -> list[Judgement]: ...

    async def health_check(self) -> None: ...

    async def aclose(self) -> None: ...
