"""Turn one group call's answer into one Judgement per response (shared by the backends' ``judge_group``)."""

from __future__ import annotations

from grpo_llm_eval.teacher.grading.completion import MAX_CONTENT_CHARS
from grpo_llm_eval.teacher.grading.group_prompt import GroupPrompt
from grpo_llm_eval.teacher.types import GroupCall, Judgement

_GRADE_ERRORS = {
    "unparseable": "the teacher's grade of this response has no scores",
    "incomplete": "the teacher's grade of this response lacks scores for: {missing}",
}


def split_usage(calls: float, prompt_tokens: float, completion_tokens: float, n: int) -> dict:
    """A call's usage divided evenly over its N responses, so that the per-response usages sum to the call's.

    >>> split_usage(1, 100, 40, 4)
    {'calls': 0.25, 'prompt_tokens': 25.0, 'completion_tokens': 10.0}
    """
    n = max(1, n)
    return {"calls": calls / n, "prompt_tokens": prompt_tokens / n, "completion_tokens": completion_tokens / n}


def _extra(call: GroupCall, usage: dict, finish_reason: str | None = None) -> dict:
    extra = {"call_id": call.call_id, "group_size": len(call.responses), "usage": dict(usage)}
    if finish_reason is not None:
        extra["finish_reason"] = finish_reason
    return extra


def failed_group(call: GroupCall, names: list[str], status: str, error: str | None, latency_s: float = 0.0,
                 attempts: int = 1, usage: dict | None = None, raw: str | None = None) -> list[Judgement]:
    """Every response of CALL failed with STATUS (a failed call, or a grade that cannot be mapped back)."""
    share = usage or split_usage(attempts, 0, 0, len(call.responses))
    out = []
    for _ in call.responses:
        j = Judgement.failed(status, names, error, raw=raw, latency_s=latency_s, attempts=attempts)
        j.extra = _extra(call, share)
        out.append(j)
    return out


def group_judgements(group: GroupPrompt, call: GroupCall, content: str | None, latency_s: float, attempts: int,
                     prompt_tokens: int = 0, completion_tokens: int = 0, finish_reason: str | None = None,
                     token_limit: int | None = None) -> list[Judgement]:
    """One Judgement per response of CALL, in presentation order, from the teacher's answer CONTENT.

    A group status other than "ok" (empty, unparseable, group_mismatch) fails every response with it. Otherwise
    each response gets its own grade's status; a grade the token limit cut (``finish_reason == "length"``) is
    "truncated" rather than unparseable. ``feedback`` is the response's own scores and explanations (what SFT on
    feedback trains on), ``raw`` its block of the answer; ``extra`` carries call_id, group_size and the call's
    usage split evenly over the responses.
    """
    n = len(call.responses)
    names = group.rubric.names
    usage = split_usage(attempts, prompt_tokens, completion_tokens, n)
    if content is not None and len(content) > MAX_CONTENT_CHARS:
        content = content[-MAX_CONTENT_CHARS:]  # as pointwise grades are cut (grading.MAX_CONTENT_CHARS)
    parsed = group.parse(content, n)
    cut = finish_reason == "length"
    if parsed.status != "ok":
        status, error = parsed.status, parsed.error
        if cut and status != "empty":
            status = "truncated"
            error = (f"the group grade stopped at its token limit ({token_limit}) before it was complete; raise "
                     "max_feedback_new_tokens (a group call may use group size x it)")
        out = failed_group(call, names, status, error, latency_s, attempts, usage, raw=content)
        for j in out:
            j.extra["finish_reason"] = finish_reason
        return out
    out = []
    for grade, block in zip(parsed.grades, parsed.blocks, strict=True):
        status, error = grade.status, None
        if status != "ok":
            missing = ", ".join(c for c, v in grade.scores.items() if v is None)
            status, error = ("truncated", "the group grade was cut off before this response's scores") if cut else (
                status, _GRADE_ERRORS[status].format(missing=missing))
        out.append(Judgement(scores=dict(grade.scores), feedback=grade.feedback, raw=block, status=status,
                             latency_s=latency_s, attempts=attempts, error=error,
                             extra=_extra(call, usage, finish_reason)))
    return out
