"""Turn one OpenAI-format chat completion into a Judgement (shared by the openai and llama.cpp backends)."""

from __future__ import annotations

import logging
import threading

from grpo_llm_eval.teacher.grading.parse import MAX_PARSE_CHARS
from grpo_llm_eval.teacher.types import Judgement

logger = logging.getLogger(__name__)
# A grade longer than this is cut to its tail before it is parsed, stored or recorded. The parser reads only
# the last MAX_PARSE_CHARS anyway, so grades read the same; what is bounded is what a misbehaving server's
# megabytes cost in memory, in rollouts.jsonl and in the SFT examples built from feedback.
MAX_CONTENT_CHARS = MAX_PARSE_CHARS

# Parse statuses of Rubric.parse that are failures, with the short error each Judgement carries.
_PARSE_ERRORS = {
    "empty": "the teacher returned empty content",
    "unparseable": "the teacher's output has no scores in the rubric's format",
    "incomplete": "the teacher's output lacks scores for: {missing}",
}


def wrap_reasoning(content: str | None, reasoning: str | None, think_open: str, think_close: str) -> str | None:
    """Feedback text: server-side reasoning kept inside think tags before the content, as the seed does.

    >>> wrap_reasoning("Grade: 7", "hmm", "<think>", "</think>")
    '<think>\\nhmm\\n</think>\\nGrade: 7'
    """
    if not reasoning or not reasoning.strip():
        return content
    return f"{think_open}\n{reasoning.strip()}\n{think_close}\n{(content or '').strip()}"


def judgement_from_completion(rubric, content: str | None, reasoning: str | None,
                              logprob_tokens: list[dict] | None, use_logprobs: bool,
                              think_open: str, think_close: str, latency_s: float, attempts: int) -> Judgement:
    """Grade text -> Judgement. Scores come from `content` only, never from `reasoning`.

    With `use_logprobs` and tokens, each criterion takes the rubric's probability-weighted score where
    the tokens yield one, else the parsed score; `extra["score_source"]` says which ("logprob",
    "parsed", or None when neither). A parse status other than "ok" becomes the Judgement's status, so
    the reward is masked rather than guessed. Content and reasoning over `MAX_CONTENT_CHARS` keep their
    tail (`extra["cut_chars"]` says how much was dropped).
    """
    cut = 0
    if content is not None and len(content) > MAX_CONTENT_CHARS:
        cut = len(content) - MAX_CONTENT_CHARS
        content = content[-MAX_CONTENT_CHARS:]
        logger.warning("a teacher grade of %d characters was cut to its last %d", cut + MAX_CONTENT_CHARS,
                       MAX_CONTENT_CHARS)
    if reasoning is not None and len(reasoning) > MAX_CONTENT_CHARS:
        reasoning = reasoning[-MAX_CONTENT_CHARS:]
    parsed = rubric.parse(content)
    scores: dict[str, float | None] = {name: parsed.scores.get(name) for name in rubric.names}
    source: dict[str, str | None] = {name: ("parsed" if scores[name] is not None else None) for name in scores}
    if use_logprobs and logprob_tokens and parsed.status in ("ok", "incomplete"):
        weighted = rubric.logprob_scores(logprob_tokens)
        for name in scores:
            if weighted.get(name) is not None:
                scores[name], source[name] = weighted[name], "logprob"
    # Keep the rubric's feedback (it may be cleaned up), falling back to the raw text when it has none.
    feedback = wrap_reasoning(parsed.feedback if parsed.feedback is not None else content,
                              reasoning, think_open, think_close)
    error = None
    if parsed.status != "ok":
        missing = ", ".join(n for n, v in scores.items() if v is None)
        error = _PARSE_ERRORS.get(parsed.status, "the teacher's output could not be parsed").format(missing=missing)
    status = parsed.status if parsed.status in _PARSE_ERRORS or parsed.status == "ok" else "unparseable"
    extra: dict = {"score_source": source}
    if cut:
        extra["cut_chars"] = cut
    return Judgement(scores=scores, feedback=feedback, raw=content, status=status, latency_s=latency_s,
                     attempts=attempts, error=error, extra=extra)


class TruncationCheck:
    """Marks a grade cut off by the token limit as "truncated" (not "unparseable"), and warns once per teacher.

    A grade the limit cut is only a failure where its scores did not make it: a complete block followed by
    rambling that hit the limit still counts.
    """

    def __init__(self, rubric, limit: int):
        self.rubric = rubric
        self.limit = limit
        self._warned = threading.Event()

    def apply(self, judgement: Judgement, finish_reason: str | None, json_mode: bool, compact: bool = False) -> Judgement:
        if finish_reason != "length" or judgement.ok:
            return judgement
        judgement.status = "truncated"
        judgement.error = (f"the grade stopped at max_feedback_new_tokens={self.limit} tokens before its scores "
                           "were complete")
        if not self._warned.is_set():
            self._warned.set()
            fewest, typical = self.rubric.grade_tokens(json_mode, compact)
            logger.warning(
                "teacher grades are cut off at max_feedback_new_tokens=%d: a bare grade of this rubric (%s, %d "
                "criteria, no explanation) takes about %d tokens, and explanations and any thinking come on top; "
                "raise max_feedback_new_tokens (e.g. to 512). Such grades are recorded as 'truncated'.",
                self.limit, "JSON" if json_mode else "XML", len(self.rubric.criteria), max(fewest, typical))
        return judgement
