"""Each example's own rubric, read from ``dataset_rubric_column`` and checked before any model loads.

A cell may hold (or hold as JSON text):

* a list of strings: checklist items, ids ``item_1``, ``item_2``, ... by position;
* a list of objects ``{id?, criterion?, description?, weight?, check?}``: the teacher reads ``description`` (or
  ``criterion`` where there is no description); the id is ``id``, else ``criterion`` where that is a short name,
  else ``item_<position>``; ``weight`` (alias ``points``, as HealthBench writes it) defaults to 1 and may be
  negative (a pitfall); ``check`` is a programmatic check (``data/constraints.py``), used for measurement and by
  ``verifier_checklist_weight``, never shown to the teacher;
* nothing (None, an empty string, NaN): the row has no rubric and is graded on the config's criteria.

Bad data stops the run with one line naming the row, the column and the fix (``RubricError``). The loader stores
every rubric as canonical JSON text (``to_json``), so rows whose items differ in shape still make one Arrow column,
and the reward reads it back with ``from_json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from grpo_llm_eval.teacher.types import RubricItem

logger = logging.getLogger(__name__)

_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_GROUP_LABEL = re.compile(r"R[0-9]+")
# Tag and key names the grading prompt and parser use: an item id must not be one of them.
RESERVED_IDS = frozenset({"question", "student_response", "ground_truth", "rubric", "evaluation", "evaluations",
                          "score", "explanation", "overall"})
KNOWN_KEYS = frozenset({"id", "criterion", "description", "weight", "points", "check", "tags"})
MAX_ITEMS = 64
MAX_ITEM_CHARS = 2000


class RubricError(ValueError):
    """A rubric cell that cannot be used; the message names the problem and the fix (the caller adds the row)."""


def is_empty(value: Any) -> bool:
    """Whether a cell holds no rubric (None, blank text, NaN)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def parse_cell(value: Any) -> tuple[RubricItem, ...]:
    """The items of one non-empty cell, checked; raises RubricError.

    >>> [i.id for i in parse_cell(["Mentions the dose.", {"criterion": "polite", "weight": 2}])]
    ['item_1', 'polite']
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RubricError(f"the rubric is text but not JSON ({exc.msg} at character {exc.pos}); write a JSON "
                              "list of items, or a list in the file itself") from None
    if hasattr(value, "tolist"):  # numpy arrays from parquet
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RubricError(f"the rubric is a {type(value).__name__}, not a list of items; write a list of strings "
                          "or of {criterion, description, weight} objects")
    if not value:
        raise RubricError("the rubric is an empty list; give at least one item, or leave the cell empty (null) to "
                          "grade this row on the config's criteria")
    if len(value) > MAX_ITEMS:
        raise RubricError(f"the rubric has {len(value)} items, more than {MAX_ITEMS}; split it or keep the items "
                          "that matter")
    items = [_item(raw, k) for k, raw in enumerate(value, start=1)]
    ids = [i.id for i in items]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise RubricError(f"item id {dupes[0]!r} appears more than once; give each item of a row its own id")
    if not any(i.weight > 0 for i in items):
        raise RubricError("no item has a positive weight, so no response could score; give at least one item a "
                          "weight above 0")
    return tuple(items)


def _item(raw: Any, position: int) -> RubricItem:
    where = f"item {position}"
    if isinstance(raw, str):
        text = raw.strip()
        if not text:
            raise RubricError(f"{where} is empty text; remove it or write what the response must do")
        return RubricItem(f"item_{position}", _bounded(text, where))
    if not isinstance(raw, dict):
        raise RubricError(f"{where} is a {type(raw).__name__}; write a string or a {{criterion, description, "
                          "weight}} object")
    unknown = sorted(k for k, v in raw.items() if k not in KNOWN_KEYS and v is not None)
    if unknown:
        raise RubricError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; the keys are "
                          f"{', '.join(sorted(KNOWN_KEYS))}")
    criterion = _text(raw.get("criterion"), f"{where}'s criterion")
    description = _text(raw.get("description"), f"{where}'s description")
    text = description or criterion
    if not text:
        raise RubricError(f"{where} has no text; give it a description (or a criterion) saying what to check")
    weight = _weight(raw.get("weight", raw.get("points")), where)
    item_id = raw.get("id")
    if item_id is not None:
        if not isinstance(item_id, str) or not _ID.fullmatch(item_id):
            raise RubricError(f"{where}'s id {item_id!r} is not a name (letters, digits, _; at most 64, not "
                              "starting with a digit); rename it")
    elif criterion and _ID.fullmatch(criterion) and description:
        item_id = criterion
    else:
        item_id = f"item_{position}"
    if item_id.lower() in RESERVED_IDS or _GROUP_LABEL.fullmatch(item_id):
        raise RubricError(f"{where}'s id {item_id!r} is a name the grading format uses; rename it")
    check = raw.get("check")
    return RubricItem(item_id, _bounded(text, where), weight, None if check is None else _check_json(check, where))


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RubricError(f"{what} is a {type(value).__name__}, not text; write it as a string")
    return value.strip()


def _bounded(text: str, where: str) -> str:
    if len(text) > MAX_ITEM_CHARS:
        raise RubricError(f"{where} has {len(text)} characters, more than {MAX_ITEM_CHARS}; shorten it")
    return text.replace("\0", "")


def _weight(value: Any, where: str) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RubricError(f"{where}'s weight {value!r} is not a number; write a number such as 1, 5 or -2")
    if not math.isfinite(value):
        raise RubricError(f"{where}'s weight {value!r} is not finite; write a number such as 1, 5 or -2")
    return float(value)


def _check_json(check: Any, where: str) -> str:
    if not isinstance(check, dict):
        raise RubricError(f"{where}'s check is a {type(check).__name__}; write an object such as "
                          '{"type": "max_words", "n": 20}')
    spec = {k: v for k, v in check.items() if v is not None}  # Arrow fills other rows' keys with None
    from grpo_llm_eval.data.constraints import validate_spec

    problem = validate_spec(spec)
    if problem:
        raise RubricError(f"{where}'s check: {problem}")
    return json.dumps(spec, sort_keys=True, ensure_ascii=False)


# The local teacher's context (teacher/backends/local_backend.py); a served teacher's is not known here.
LOCAL_CONTEXT_TOKENS = 4096


def context_chars(cfg) -> int | None:
    """Characters a rubric may take in the teacher's prompt: half the local teacher's context at 3 characters a
    token, leaving the rest to the instructions, question, response and grade; None where it is not known."""
    if cfg.teacher_backend != "local":
        return None
    return LOCAL_CONTEXT_TOKENS // 2 * 3


def column_items(values, column: str, where: str) -> list[tuple[RubricItem, ...]]:
    """Each cell's items (() for an empty cell) of COLUMN's VALUES; raises RubricError naming WHERE, the row
    (counted from 1) and the column."""
    out = []
    for number, value in enumerate(values, start=1):
        if is_empty(value):
            out.append(())
            continue
        try:
            out.append(parse_cell(value))
        except RubricError as exc:
            raise RubricError(f"{where} row {number}, column {column!r}: {exc}") from None
    return out


def rows_items(rows: list[dict], column: str, where: str) -> list[tuple[RubricItem, ...]]:
    """``column_items`` of plain dict rows (``judge``'s and ``calibrate --responses``' input)."""
    return column_items([row.get(column) for row in rows], column, where)


def to_json(items: tuple[RubricItem, ...] | None) -> str:
    """Canonical JSON text of a row's items ("" for none), as the loader stores them."""
    if not items:
        return ""
    return json.dumps([{"id": i.id, "text": i.text, "weight": i.weight,
                        "check": None if i.check is None else json.loads(i.check)} for i in items],
                      ensure_ascii=False)


_PARSED: dict[str, tuple[RubricItem, ...]] = {}


def from_json(text: str | None) -> tuple[RubricItem, ...]:
    """A row's items from ``to_json`` text (() for ""), memoised: the reward reads the same rows every step.

    >>> from_json(to_json((RubricItem("a", "A", 2.0),)))
    (RubricItem(id='a', text='A', weight=2.0, check=None),)
    """
    if not text:
        return ()
    found = _PARSED.get(text)
    if found is None:
        if len(_PARSED) > 100_000:
            _PARSED.clear()
        found = _PARSED[text] = tuple(
            RubricItem(d["id"], d["text"], float(d["weight"]),
                       None if d.get("check") is None else json.dumps(d["check"], sort_keys=True, ensure_ascii=False))
            for d in json.loads(text))
    return found
