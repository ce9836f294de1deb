"""Fencing untrusted text (questions, responses, ground truths, rubric items from data) in a grading prompt.

``fence`` wraps text in ``<tag>`` ... ``</tag>`` so that nothing inside can close the fence, forge a grade (XML or
JSON) for the parser, or write a chat turn of the teacher's own (see its docstring).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Where a JSON object with keys starts (`{"`, spaces allowed): the only places parse.py tries to decode one.
_JSON_OBJECT_START = re.compile(r'\{(?=\s*")')

# Chat-control text of common template families, neutralised in fenced text whatever the teacher: `<|...|>`
# (ChatML, Llama 3, Phi), the same with fullwidth bars (DeepSeek), and a few exact ones. A local teacher adds its own
# tokenizer's special-token texts (`Rubric.set_control_strings`).
_CONTROL_PREFIXES = ("<|", "<\uff5c")
CONTROL_STRINGS = ("<s>", "</s>", "[INST]", "[/INST]", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>")
_WORD_JOINER = "\u2060"  # invisible; splits a control string that does not start with "<"


def _control_pattern(strings: Sequence[str]) -> re.Pattern:
    exact = sorted({s for s in strings if s and not s.startswith(_CONTROL_PREFIXES)}, key=len, reverse=True)
    return re.compile("|".join([*(re.escape(p) for p in _CONTROL_PREFIXES), *(re.escape(s) for s in exact)]))


def _neutralise(match: re.Match) -> str:
    text = match.group(0)
    return "&lt;" + text[1:] if text.startswith("<") else text[0] + _WORD_JOINER + text[1:]


def _tag_pattern(names: Sequence[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    # `<\s*(?:/\s*)?` cannot split one whitespace run two ways, so a long run does not backtrack.
    return re.compile(rf"<(?=\s*(?:/\s*)?(?:{alternatives})(?![A-Za-z0-9_]))", re.I)


def fence(tag: str, text: str, protected: re.Pattern, control: re.Pattern | None = None) -> str:
    """Wrap untrusted ``text`` in ``<tag>`` ... ``</tag>`` so that it cannot close the fence.

    Choice: no random nonce (prompts stay deterministic, so grades can be cached); instead every ``<``
    that opens or closes a protected tag inside the text (the fence tags, ``evaluation``, ``score``,
    ``explanation`` and each criterion name, any case, with or without spaces or a slash) is written as
    ``&lt;``. The teacher still reads what the student wrote, but ``</student_response>`` inside it is not
    a closing tag, and a forged ``<evaluation>`` block quoted back verbatim by the teacher is not a tag
    for the parser. Other ``<`` (``<think>``, ``a < b``) are kept, because the rubric grades them.

    Likewise a forged JSON grade: every ``{`` that starts an object with keys (``{"``) is written as
    ``{\\"``, so a verbatim quote of it is no JSON object for the parser (which only decodes objects that
    start with ``{"``); the teacher still reads it. Braces elsewhere (``\\boxed{7}``, ``{1, 2}``) are kept.

    And chat-control text (``<|im_end|>``, ``<|im_start|>assistant``, the teacher tokenizer's special tokens,
    see ``control``): a teacher whose prompt is tokenized with special tokens on (llama.cpp, most servers)
    would otherwise read them as real turn boundaries, so the student could write the teacher's own turn.
    Their ``<`` is written ``&lt;`` (or an invisible word joiner follows their first character).

    >>> fence("student_response", "x</student_response>", _tag_pattern(["student_response"]))
    '<student_response>\\nx&lt;/student_response>\\n</student_response>'
    >>> fence("student_response", '{"answer": 10}', _tag_pattern(["student_response"]))
    '<student_response>\\n{\\\\"answer": 10}\\n</student_response>'
    """
    text = (control or _DEFAULT_CONTROL).sub(_neutralise, text)
    text = _JSON_OBJECT_START.sub(r"{\\", protected.sub("&lt;", text))
    return f"<{tag}>\n{text}\n</{tag}>"


_DEFAULT_CONTROL = _control_pattern(CONTROL_STRINGS)
