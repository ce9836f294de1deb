"""Group judging's prompt and parser: one teacher call grades N responses to one question (``judge_mode: group``).

The prompt is the user's ``evaluation_prompt`` (so domain instructions carry over) with ``{student_response}``
rendered as the N responses, each fenced as ``<student_response id="R1">`` ... ``</student_response>``, then the
group output format: XML ``<evaluations><R1>...criteria as in the rubric's XML...</R1>...</evaluations>``, or in
JSON mode one object ``{"R1": {criterion: {"score", "explanation"}}, ...}``.

Decisions (tests/test_group_prompt.py pins each one):

* **Fences.** The rubric's fence (``rubric.fence``) with the protected tags widened by ``evaluations`` and every
  label-shaped tag (``R`` and digits, any number, so a response cannot plant ``<R9>`` in a group of 8 either):
  no response can close its fence, and a verbatim quote of a forged group block is no tag (``&lt;``) and no JSON
  object (``{\\"``) for this parser.
* **The last complete block counts**, as in ``parse.find_block``: the XML block closed by the last
  ``</evaluations>`` (opened by the nearest ``<evaluations>`` before it) or the JSON object with label keys that
  ends last, whichever ends later.
* **Labels must match exactly.** A block whose labels are not exactly R1..Rn, each once (a missing, extra or
  repeated label), is ``group_mismatch``: the grades cannot be mapped back without guessing. Labels may come in
  any order. Keys of the JSON object that are not label-shaped are ignored.
* **Per response**, scores are read as a pointwise grade's are (``parse.read_xml`` / ``parse.read_object``) and
  get their own status (ok / incomplete / unparseable). The group status is "ok" once the labels match.
* **A group of one** whose teacher wrote the pointwise ``<evaluation>`` format instead is read as that grade:
  the same question answered, nothing ambiguous about whose grade it is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from grpo_llm_eval.teacher.grading import parse as _parse
from grpo_llm_eval.teacher.grading.parse import MAX_PARSE_CHARS, Parsed
from grpo_llm_eval.teacher.grading.rubric import FENCE_TAGS, NO_GROUND_TRUTH, Rubric, _num, render

__all__ = ["GroupParsed", "GroupPrompt", "labels"]

GROUP_TAG = "evaluations"
_LABEL = re.compile(r"R[0-9]+")
_GROUP_OPEN = re.compile(rf"<\s*{GROUP_TAG}\s*>", re.I)
_GROUP_CLOSE = re.compile(rf"<\s*/\s*{GROUP_TAG}\s*>", re.I)
_LABEL_OPEN = re.compile(r"<\s*(R[0-9]{1,6})\s*>", re.I)


def labels(n: int) -> list[str]:
    """The labels of ``n`` presented responses.

    >>> labels(3)
    ['R1', 'R2', 'R3']
    """
    return [f"R{i}" for i in range(1, n + 1)]


@dataclass
class GroupParsed:
    """A group grade read: one ``Parsed`` per label in label order ([] unless the labels matched).

    ``blocks`` holds each label's block text (what the teacher wrote for that response), in the same order.
    """

    status: str  # "ok" | "empty" | "unparseable" | "group_mismatch"
    grades: list[Parsed]
    error: str | None = None
    blocks: list[str] = field(default_factory=list)


def _protected(names: Sequence[str]) -> re.Pattern:
    alternatives = "|".join(re.escape(n) for n in sorted({*FENCE_TAGS, GROUP_TAG, *names}, key=len, reverse=True))
    return re.compile(rf"<(?=\s*(?:/\s*)?(?:{alternatives}|R[0-9]+)(?![A-Za-z0-9_]))", re.I)


def _feedback(scores: dict[str, float | None], explanations: dict[str, str], overall: str | None) -> str | None:
    """One response's own feedback: each criterion's score and explanation (what SFT on feedback trains on)."""
    lines = []
    for name, score in scores.items():
        expl = explanations.get(name, "")
        if score is not None or expl:
            shown = "-" if score is None else f"{_num(score)}"
            lines.append(f"{name} ({shown}): {expl}" if expl else f"{name} ({shown})")
    if overall:
        lines.append(overall)
    return "\n".join(lines) or None


def _status(scores: dict[str, float | None]) -> str:
    scored = sum(v is not None for v in scores.values())
    return "ok" if scored == len(scores) else "incomplete" if scored else "unparseable"


class GroupPrompt:
    """Renders group prompts, their schema, and reads group grades, for one rubric.

    >>> from grpo_llm_eval.teacher.grading.rubric import seed_criteria
    >>> g = GroupPrompt(Rubric(seed_criteria()))
    >>> g.parse("<evaluations><R1><answer><score>9</score></answer></R1></evaluations>", 1).grades[0].scores
    {'thought_process': None, 'answer': 9.0, 'format': None}
    """

    def __init__(self, rubric: Rubric):
        self.rubric = rubric
        self._protected = _protected(rubric.names)

    # ---- prompt ---------------------------------------------------------------------------------

    def xml_format(self, n: int) -> str:
        """The XML the teacher is asked to write: the first label in full, the others abbreviated."""
        names = self.rubric.names
        rows = "\n".join(f"    <{c}><score>NUMBER</score><explanation>WHY</explanation></{c}>" for c in names)
        out = [f"<{GROUP_TAG}>", "  <R1>", rows, "  </R1>"]
        out += [f"  <{label}>...the same criteria for {label}...</{label}>" for label in labels(n)[1:]]
        return "\n".join([*out, f"</{GROUP_TAG}>"])

    def _shape(self, compact: bool) -> str:
        if compact:
            inner = ", ".join(f'"{c.name}": <number from {_num(c.min)} to {_num(c.max)}>' for c in self.rubric.criteria)
            return "{" + inner + ', "explanation": "<one short sentence>"}'
        return "{" + ", ".join(
            f'"{c.name}": {{"score": <number from {_num(c.min)} to {_num(c.max)}>, "explanation": "<one sentence>"}}'
            for c in self.rubric.criteria) + "}"

    def instructions(self, n: int, json_mode: bool, compact: bool = False) -> str:
        """What replaces the template's single-grade format: grade each of the n responses, in the group format."""
        if n == 1:
            head = "There is 1 student response above, labelled R1. Grade it on every criterion. "
        else:
            head = (f"There are {n} student responses above, labelled R1 to R{n}. Grade each response separately, on "
                    "every criterion, on its own merits. ")
        head += "Answer format: instead of any single evaluation format the prompt gives, "
        if json_mode:
            shape = self._shape(compact)
            keys = ", ".join(f'"{label}": {shape if i == 0 else "{...}"}' for i, label in enumerate(labels(n)))
            return head + f"reply with only one JSON object and nothing else, one key per label, shaped like this: {{{keys}}}"
        return head + "give your grades in exactly this XML format, one number per score:\n" + self.xml_format(n)

    def responses_text(self, responses: Sequence[str]) -> str:
        """The responses, each fenced and labelled, for the template's ``{student_response}``."""
        parts = []
        for label, text in zip(labels(len(responses)), responses, strict=True):
            fenced = self.rubric.fenced("student_response", text or "", self._protected)
            parts.append(f'<student_response id="{label}">' + fenced[len("<student_response>"):])
        return "\n".join(parts)

    def messages(self, question: str, ground_truth: str | None, responses: Sequence[str], json_mode: bool,
                 compact: bool = False) -> list[dict]:
        """Chat messages asking the teacher to grade ``responses`` (in this order) in one answer."""
        if not responses:
            raise ValueError("a group prompt needs at least one response")
        values = {
            "rubric": self.rubric.rubric_block(),
            "question": self.rubric.fenced("question", question or "", self._protected),
            "student_response": self.responses_text(responses),
            "ground_truth": self.rubric.fenced("ground_truth", NO_GROUND_TRUTH if ground_truth is None else ground_truth,
                                               self._protected),
        }
        content = render(self.rubric.template_for(json_mode), values).rstrip("\n")
        instructions = self.instructions(len(responses), json_mode, compact)
        if json_mode and compact:
            # First, as a system message, as pointwise compact prompts do (a local teacher's prompt cache).
            return [{"role": "system", "content": instructions}, {"role": "user", "content": content + "\n"}]
        return [{"role": "user", "content": content + "\n\n" + instructions + "\n"}]

    # ---- structured output --------------------------------------------------------------------

    def json_schema(self, n: int, max_explanation_chars: int | None = None, compact: bool = False) -> dict:
        """``{"R1": <the rubric's grade schema>, ...}``: every label required, in order, nothing else allowed, so a
        grammar fixes the count (properties + required only: llama.cpp's json-schema-to-grammar handles them)."""
        one = self.rubric.json_schema(max_explanation_chars, compact)
        return {"type": "object", "properties": {label: one for label in labels(n)}, "required": labels(n),
                "additionalProperties": False}

    def response_format(self, n: int) -> dict:
        """The OpenAI ``response_format`` for a group of ``n``."""
        return {"type": "json_schema",
                "json_schema": {"name": "group_evaluation", "schema": self.json_schema(n), "strict": True}}

    # ---- reading grades -----------------------------------------------------------------------

    def parse(self, text: str | None, n: int) -> GroupParsed:
        """Per-response grades from a group grade (rules in the module docstring). Never raises on a string."""
        if text is None or not text.strip():
            return GroupParsed("empty", [], "the teacher returned empty content")
        base = max(0, len(text) - MAX_PARSE_CHARS)
        xml = self._xml_block(text, base)
        found = _parse.last_object(text, base, lambda obj: any(_LABEL.fullmatch(str(k).upper()) for k in obj))
        if xml is None and found is None:
            if n == 1 and (single := self.rubric.parse(text)).status != "unparseable":
                block = _parse.find_block(text, self.rubric.criteria)
                raw = text[block.start:block.end] if block else text.strip()
                return GroupParsed("ok", [Parsed(single.scores, self._own_feedback(block), single.status)], None, [raw])
            return GroupParsed("unparseable", [], f"the teacher's output has no <{GROUP_TAG}> block or JSON object "
                                                  "with the response labels")
        if found is None or (xml is not None and xml[1] >= found[1]):
            return self._read_xml(text, *xml, n)
        return self._read_json(text, *found, n)

    def _own_feedback(self, block) -> str | None:
        if block is None:
            return None
        return _feedback({c: block.scores.get(c) for c in self.rubric.names}, block.explanations, None)

    @staticmethod
    def _xml_block(text: str, base: int) -> tuple[int, int] | None:
        close = _parse._last(_GROUP_CLOSE, text, base, len(text))
        if close is None:
            return None
        opening = _parse._last(_GROUP_OPEN, text, base, close.start())
        return None if opening is None else (opening.end(), close.start())

    @staticmethod
    def _mismatch(seen: list[str], n: int) -> str | None:
        expected = labels(n)
        if sorted(seen) == sorted(expected):
            return None
        missing = [x for x in expected if x not in seen]
        extra = sorted({x for x in seen if x not in expected or seen.count(x) > 1})
        return (f"the group grade's labels do not match the {n} responses (missing: {', '.join(missing) or 'none'}; "
                f"extra or repeated: {', '.join(extra) or 'none'})")

    def _read_xml(self, text: str, start: int, end: int, n: int) -> GroupParsed:
        opens = list(_LABEL_OPEN.finditer(text, start, end))
        seen = [m.group(1).upper() for m in opens]
        if (error := self._mismatch(seen, n)) is not None:
            return GroupParsed("group_mismatch", [], error)
        by_label = {}
        for i, m in enumerate(opens):
            label = m.group(1).upper()
            stop = opens[i + 1].start() if i + 1 < len(opens) else end
            close = re.compile(rf"<\s*/\s*{label}\s*>", re.I).search(text, m.end(), stop)
            section_end = close.start() if close else stop
            block = _parse.read_xml(text, m.end(), section_end, self.rubric.criteria)
            scores = {c: block.scores.get(c) for c in self.rubric.names}
            parsed = Parsed(scores, _feedback(scores, block.explanations, None), _status(scores))
            by_label[label] = (parsed, text[m.start():close.end() if close else section_end].strip())
        ordered = [by_label[label] for label in labels(n)]
        return GroupParsed("ok", [p for p, _ in ordered], None, [b for _, b in ordered])

    def _read_json(self, text: str, start: int, end: int, obj: dict, n: int) -> GroupParsed:
        seen = [str(k).upper() for k in obj if _LABEL.fullmatch(str(k).upper())]
        if (error := self._mismatch(seen, n)) is not None:
            return GroupParsed("group_mismatch", [], error)
        values = {str(k).upper(): v for k, v in obj.items()}
        grades, blocks = [], []
        for label in labels(n):
            value = values[label]
            if not isinstance(value, dict):
                value = {}
            block = _parse.read_object(value, self.rubric.criteria)
            scores = {c: block.scores.get(c) for c in self.rubric.names}
            overall = value.get("explanation") if isinstance(value.get("explanation"), str) else None
            grades.append(Parsed(scores, _feedback(scores, block.explanations, overall), _status(scores)))
            blocks.append(json.dumps({label: values[label]}, ensure_ascii=False))
        return GroupParsed("ok", grades, None, blocks)
