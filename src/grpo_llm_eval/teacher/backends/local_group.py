"""Group judging on the local llama.cpp teacher (``judge_mode: group``): one call grades every response of a group.

Both local grading paths have a group form, and both end in `group_grading.group_judgements`, as the openai
backend's calls do, so a group grade maps back to its responses by the same rules (labels must match exactly):

- decoded: the group prompt (`GroupPrompt.messages`, compact JSON or XML), with structured output a grammar built
  from `GroupPrompt.json_schema(n)` (llama.cpp's json-schema grammar fixes the labels and their count), up to
  n x ``max_feedback_new_tokens`` tokens;
- forced keys (the offline default, `local_scores.ForcedScorer.grade_group`): ``{"R1": {"thought_process": `` ...
  forced, each score read from the digit probabilities, a short explanation per label; the scores of the
  Judgements are those probability-weighted means, as pointwise.

Tokens are counted with the model's tokenizer, per call; the backend checks the budget before each call.
"""

from __future__ import annotations

import hashlib
import json
import time

from grpo_llm_eval.teacher.grading.group_grading import failed_group, group_judgements
from grpo_llm_eval.teacher.grading.group_prompt import GroupPrompt, labels
from grpo_llm_eval.teacher.types import GroupCall, Judgement

# Explanation bound of a decoded compact grade per label, as pointwise (local_backend): a 135M model rambles.
EXPLANATION_CHARS = 32


def call_seed(seed: int, call: GroupCall) -> int:
    """The sampling seed of one group call: the run's seed moved by what the call shows and by its sample index,
    so that a rerun draws the same grades (call ids are random) while the repeats of ``teacher_samples`` draw
    separately at ``teacher_temperature`` > 0, even for a group of one whose order cannot change.

    >>> a = GroupCall("q", "1", ("x", "y"), "id1")
    >>> call_seed(42, a) == call_seed(42, GroupCall("q", "1", ("x", "y"), "id2")) != call_seed(42, GroupCall("q", "1", ("x", "y"), "id1", 1))
    True
    """
    shown = json.dumps([call.question, call.ground_truth, list(call.responses), call.sample], ensure_ascii=False)
    return (seed + int(hashlib.sha256(shown.encode()).hexdigest()[:8], 16)) % 2**31


def decoded_group(llm, group: GroupPrompt, cfg, call: GroupCall) -> tuple[list[Judgement], tuple[int, int]]:
    """Grade CALL with one decoded chat completion; (per-response Judgements, (prompt, completion) tokens)."""
    n = len(call.responses)
    structured = bool(cfg.teacher_structured_output)
    max_tokens = n * cfg.max_feedback_new_tokens
    kwargs: dict = dict(
        messages=group.messages(call.question, call.ground_truth, call.responses, json_mode=structured, compact=True),
        temperature=cfg.teacher_temperature, max_tokens=max_tokens, seed=call_seed(cfg.seed, call))
    if structured:
        schema = group.json_schema(n, max_explanation_chars=EXPLANATION_CHARS, compact=True)
        kwargs["response_format"] = {"type": "json_object", "schema": schema}
    start = time.perf_counter()
    out = llm.create_chat_completion(**kwargs)
    used = out.get("usage") or {}
    tokens = (int(used.get("prompt_tokens", 0) or 0), int(used.get("completion_tokens", 0) or 0))
    choice = out["choices"][0]
    judgements = group_judgements(group, call, choice["message"].get("content"), time.perf_counter() - start, 1,
                                  *tokens, choice.get("finish_reason"), max_tokens)
    return judgements, tokens


def forced_group(scorer, group: GroupPrompt, call: GroupCall) -> tuple[list[Judgement], tuple[int, int]]:
    """Grade CALL with the forced-key scorer in group form; (per-response Judgements, (prompt, completion) tokens).

    The grade text is well-formed by construction, so it maps back through the group parser like any other; each
    ok response then takes the probability-weighted scores read for its label (a criterion with no probability
    on its scale makes that response "incomplete", as pointwise).
    """
    n = len(call.responses)
    start = time.perf_counter()
    messages = group.messages(call.question, call.ground_truth, call.responses, json_mode=True, compact=True)
    text, per_label = scorer.grade_group(messages, labels(n), group.rubric.criteria)
    tokens = scorer.token_counts(messages, text)
    judgements = group_judgements(group, call, text, time.perf_counter() - start, 1, *tokens)
    names = group.rubric.names
    for i, (j, scores) in enumerate(zip(judgements, per_label, strict=True)):
        if not j.ok:
            continue
        missing = [name for name in names if scores.get(name) is None]
        if missing:
            failed = Judgement.failed("incomplete", names, raw=j.raw, latency_s=j.latency_s,
                                      error=f"the teacher put no probability on the scale of: {', '.join(missing)}")
            failed.extra = j.extra
            judgements[i] = failed
            continue
        j.scores = {name: scores[name] for name in names}
        j.extra["score_source"] = dict.fromkeys(names, "logprob")
    return judgements, tokens


def closed_group(call: GroupCall, names: list[str]) -> list[Judgement]:
    """Every response of CALL failed: the teacher was closed before the call was made."""
    return failed_group(call, names, "error", "the teacher was closed", attempts=0)
