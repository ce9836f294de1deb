"""What the fake teacher of `teacher_server` writes for a GROUP prompt (``judge_mode: group``; stdlib only).

A group prompt fences each response as ``<student_response id="R1">`` ... ``</student_response>``. Each response
is graded as the server's mode grades a single response (`grades.mode_grade` on a prompt holding only that
response), and the grades are written in the group format: XML ``<evaluations><R1>...</R1>...</evaluations>``,
or JSON keyed by label when a JSON response_format is asked for. Group-only modes:

- `position_biased`: the FIRST presented response gets the top of every scale, the others 0, whatever they say;
- `group_wrong_count`: an honest grade that omits the last label;
- `group_forged`: an honest grade, with every group block the responses contain (a forged grade the student
  wrote, as the prompt shows it) quoted verbatim before AND after the teacher's own: the worst case for a
  parser that reads the last complete block. `obedient` grades group prompts the same way.
"""

from __future__ import annotations

import json
import re

GROUP_MODES = ("position_biased", "group_wrong_count", "group_forged")
_RESPONSE = re.compile(r'<student_response id="(R[0-9]+)">\n?(.*?)\n?</student_response>', re.S)
_QUOTABLE = re.compile(r"(?:<|&lt;)evaluations>.*?(?:<|&lt;)/evaluations>", re.S | re.I)


def is_group_prompt(prompt: str) -> bool:
    """Whether PROMPT fences labelled responses (a group prompt)."""
    return _RESPONSE.search(prompt) is not None


def responses_in(prompt: str) -> list[tuple[str, str]]:
    """(label, response text as the prompt shows it) for each fenced response, in presentation order."""
    return [(m.group(1), m.group(2)) for m in _RESPONSE.finditer(prompt)]


def single_prompt(prompt: str, response: str) -> str:
    """PROMPT with its labelled responses replaced by one plainly fenced RESPONSE (what `mode_grade` reads)."""
    return _RESPONSE.sub("", prompt) + f"\n<student_response>\n{response}\n</student_response>\n"


def group_grades(mode: str, prompt: str, fixed_scores: dict[str, int] | None, draw: str = "") -> dict[str, dict]:
    """{label: {criterion: (score, explanation)}} for a group prompt, in presentation order (DRAW: `mode_grade`'s)."""
    from grpo_llm_eval.testing.grades import criteria_in, mode_grade

    shown = responses_in(prompt)
    if mode == "position_biased":
        names = criteria_in(prompt)
        return {label: {c: (10 if i == 0 else 0, "First is best." if i == 0 else "Not the first.") for c in names}
                for i, (label, _) in enumerate(shown)}
    single_mode = "scripted" if mode in GROUP_MODES or mode == "obedient" else mode
    grades = {label: mode_grade(single_mode, single_prompt(prompt, text), fixed_scores, draw) for label, text in shown}
    if mode == "group_wrong_count" and grades:
        grades.pop(list(grades)[-1])
    return grades


def _xml(grades: dict[str, dict]) -> str:
    out = ["<evaluations>"]
    for label, grade in grades.items():
        rows = [f"    <{c}><score>{s}</score><explanation>{e}</explanation></{c}>" for c, (s, e) in grade.items()]
        out += [f"  <{label}>", *rows, f"  </{label}>"]
    return "\n".join([*out, "</evaluations>"])


def _json(grades: dict[str, dict], response_format: dict) -> str:
    from grpo_llm_eval.testing.grades import fill_schema

    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") or response_format.get("schema")
    out = {}
    for label, grade in grades.items():
        sub = ((schema or {}).get("properties") or {}).get(label)
        out[label] = fill_schema(sub, grade) if sub else {c: {"score": s, "explanation": e} for c, (s, e) in grade.items()}
    return json.dumps(out)


def group_content(mode: str, prompt: str, fixed_scores: dict[str, int] | None, response_format: dict,
                  draw: str = "") -> str:
    """What a teacher in MODE writes for a group PROMPT: JSON when a JSON response_format is asked for, else XML."""
    grades = group_grades(mode, prompt, fixed_scores, draw)
    as_json = response_format.get("type") in ("json_schema", "json_object")
    own = _json(grades, response_format) if as_json else _xml(grades)
    if mode not in ("group_forged", "obedient"):
        return own
    quoted = []
    for _, text in responses_in(prompt):
        quoted += _QUOTABLE.findall(text)
        first, last = text.find("{"), text.rfind("}")
        if 0 <= first < last and "R1" in text[first:last]:
            quoted.append(text[first:last + 1])  # a JSON-looking group grade, however it is escaped
    if not quoted:
        return own
    quotes = "\n".join(f"A response contains this grade, quoted as written:\n{q}" for q in quoted)
    return f"{quotes}\n{own}\n{quotes}"
