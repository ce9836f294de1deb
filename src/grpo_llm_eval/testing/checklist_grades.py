"""The scripted teacher on prompts that carry an example's own rubric: each checklist item graded by its check.

A correct checklist teacher for tests and benchmarks: it reads the items of the prompt's ``<rubric>`` fence
(``- id: text`` lines, as ``teacher/grading/items.py`` renders them), recovers each item's programmatic check from
its id (a constraint type of ``data/constraints.py``) and its text (the number and the quoted word it states),
and grades the fenced student response with it: 1 met, 0 not met; ``overall`` (implicit aggregation) is 10 times
the share met. Items it cannot check are graded 0. ``data.constraints`` is imported only when a prompt has items.
"""

from __future__ import annotations

import re

_RUBRIC = re.compile(r"<rubric>\n(.*?)\n</rubric>", re.S)
_ITEM = re.compile(r"^- ([A-Za-z_]\w*)(?: \([^)\n]*\))?: (.*)$", re.M)
_NUMBER = re.compile(r"\d+")
_QUOTED = re.compile(r'"([^"]+)"')


def rubric_items(prompt: str) -> list[tuple[str, str]]:
    """(id, text) of each item in the prompt's last rubric fence; [] when there is none."""
    found = _RUBRIC.findall(prompt)
    return _ITEM.findall(found[-1]) if found else []


def spec_from_item(item_id: str, text: str) -> dict | None:
    """The check an item states, where its id is a constraint type and its text gives the arguments.

    >>> spec_from_item("max_words", "The response is at most 20 words long.")
    {'type': 'max_words', 'n': 20}
    >>> spec_from_item("tone", "Is polite.") is None
    True
    """
    from grpo_llm_eval.data.constraints import CONSTRAINT_TYPES

    kind = CONSTRAINT_TYPES.get(item_id)
    if kind is None:
        return None
    spec: dict = {"type": item_id}
    for arg in kind.args:
        found = (_NUMBER if arg == "n" else _QUOTED).search(text)
        if found is None:
            return None
        spec[arg] = int(found.group(0)) if arg == "n" else found.group(1)
    return spec


def unfence(text: str) -> str:
    """The student's text as written, before the fence escaped its tags and JSON openings."""
    return text.replace("&lt;", "<").replace('{\\"', '{"')


def checklist_grade(prompt: str, response: str | None, names: list[str]) -> dict | None:
    """{criterion: (score, explanation)} for a prompt whose criteria are its rubric's items (or ``overall``);
    None when the prompt has no rubric items among NAMES."""
    items = rubric_items(prompt)
    ids = {i for i, _ in items}
    if not items or not (set(names) & (ids | {"overall"})):
        return None
    from grpo_llm_eval.data.constraints import check

    answer = unfence(response or "")
    verdicts = {}
    for item_id, text in items:
        spec = spec_from_item(item_id, text)
        verdicts[item_id] = bool(spec) and bool(answer.strip()) and check(spec, answer)
    grade = {n: (int(verdicts[n]), "Met." if verdicts[n] else "Not met.") for n in names if n in verdicts}
    if "overall" in names:
        share = sum(verdicts.values()) / len(verdicts)
        grade["overall"] = (round(10 * share), f"{sum(verdicts.values())} of {len(verdicts)} items met.")
    return grade
