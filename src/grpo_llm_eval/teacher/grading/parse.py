"""Reading a teacher's grade out of its text: the seed's XML block or a JSON object, whichever ends last.

Decisions (the tests in tests/test_parse.py pin each one):

* **The last complete block counts.** For XML that is the block closed by the last ``</evaluation>``,
  opened by the nearest ``<evaluation>`` before that close. For JSON it is the object that starts with
  ``{"``, parses, has at least one criterion name as a key and ends last (an enclosing object with
  criterion keys wins over one nested inside it). When both kinds are present, the one ending later is
  read. So a teacher that quotes a student's forged block before writing its own has its own block read.
  A complete forged block quoted *after* the teacher's own unfinished block is read, because text alone
  cannot tell whose it is; the defence there is the prompt fence (see ``rubric.fence``), which escapes
  ``<evaluation`` and ``{"`` inside the student's response, so a verbatim quote of it is neither a tag
  nor a JSON object here.
* **Within an XML block**, a criterion is read from its last ``</name>`` and the nearest ``<name>``
  before it (without a closing tag: from the last ``<name>``), its score from the first ``<score>`` in
  that section. A missing ``</explanation>`` (the seed's own example omits it) or ``</score>`` is fine.
* **Scores.** ``7``, ``7.5``, ``**7**`` and ``7/10`` (or ``7 out of 10``) read as numbers; a denominator
  other than the criterion's max gives None. A score outside the criterion's [min, max] gives None: it is
  not clamped, because an off-scale number means the teacher did not follow the scale. NaN and infinity
  give None. A missing criterion or score gives None.
* **Status.** ``"ok"``: every criterion scored. ``"incomplete"``: some scored. ``"unparseable"``: no
  complete block, or a block where no criterion could be scored. ``"empty"``: None or whitespace only.
* **Bounded work** (the parser sees adversarial text and must never raise): only the last
  ``MAX_PARSE_CHARS`` characters are searched, so a block starting before them is not found; at most
  ``MAX_JSON_CANDIDATES`` JSON objects are decoded, scanning about ``MAX_JSON_WORK`` characters in all
  (later candidates first, so megabytes of junk after a grade can crowd it out); every regex is linear (no
  nested or adjacent overlapping quantifiers); a score is read from at most ``_MAX_SCORE_CHARS`` characters.
  A 1 MB adversarial string parses in well under 0.1 s.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rubric.py imports this module; the type is only needed for annotations
    from collections.abc import Sequence

    from grpo_llm_eval.teacher.grading.rubric import Criterion

MAX_PARSE_CHARS = 65_536
MAX_JSON_CANDIDATES = 128
MAX_JSON_WORK = 4 * MAX_PARSE_CHARS  # characters JSON decoding may scan in total, over all candidates
_MAX_SCORE_CHARS = 200
# A probability share of ambiguous first digits ("1" of "10") above which logprob scoring gives up.
AMBIGUOUS_SHARE_MAX = 0.05

_EVAL_OPEN = re.compile(r"<\s*evaluation\s*>", re.I)
_EVAL_CLOSE = re.compile(r"<\s*/\s*evaluation\s*>", re.I)
_SCORE_OPEN = re.compile(r"<\s*score\s*>", re.I)
_SCORE_CLOSE = re.compile(r"<\s*/\s*score\s*>", re.I)
_EXPL_OPEN = re.compile(r"<\s*explanation\s*>", re.I)
_EXPL_CLOSE = re.compile(r"<\s*/\s*explanation\s*>", re.I)
_ANY_TAG = re.compile(r"<\s*/?\s*[A-Za-z_]")
_DECORATION = re.compile(r"[\s*_\"'`]*")
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")
_DENOMINATOR = re.compile(r"\s*(?:/|out\s+of)\s*([0-9]+(?:\.[0-9]+)?)", re.I)
_JSON_START_REVERSED = re.compile(r'"\s*\{')  # `{"` read backwards: where a JSON object with keys starts
# Strings (escape-aware, alternatives disjoint so matching stays linear) and structural characters.
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:]', re.S)
_DIGITS = re.compile(r"[0-9]{1,6}")  # longer runs are no score token; int() of them could raise
# strict=False: small teachers put raw newlines inside JSON strings; the grade is still readable.
_DECODER = json.JSONDecoder(strict=False)


@dataclass
class Parsed:
    """The result of parsing one teacher output.

    >>> Parsed(scores={"answer": 9.0}, feedback="<evaluation>...", status="ok").status
    'ok'
    """

    scores: dict[str, float | None]
    feedback: str | None
    status: str


@dataclass
class Block:
    """The block a grade was read from. Spans are absolute character offsets into the parsed text."""

    kind: str  # "xml" or "json"
    start: int
    end: int
    scores: dict[str, float | None] = field(default_factory=dict)
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)  # where each score's number is written
    explanations: dict[str, str] = field(default_factory=dict)


@lru_cache(maxsize=256)
def _tag(name: str, closing: bool) -> re.Pattern:
    slash = r"/\s*" if closing else ""
    return re.compile(rf"<\s*{slash}{re.escape(name)}\s*>", re.I)


def _last(pattern: re.Pattern, text: str, pos: int, endpos: int) -> re.Match | None:
    match = None
    for match in pattern.finditer(text, pos, endpos):  # noqa: B007 - we want the last one
        pass
    return match


def score_value(text: str, lo: float, hi: float, start: int = 0) -> tuple[float | None, tuple[int, int] | None]:
    """Read a score at ``text[start:]``: its value (None if unreadable or off-scale) and the number's span.

    >>> score_value(" 7/10 ", 0, 10)
    (7.0, (1, 2))
    >>> score_value("11", 0, 10)
    (None, (0, 2))
    """
    head_end = start + _MAX_SCORE_CHARS
    deco = _DECORATION.match(text, start, head_end)
    number = _NUMBER.match(text, deco.end(), head_end)
    if number is None:
        return None, None
    span = (number.start(), number.end())
    value = float(number.group())  # a digit run that long is inf, never an error
    denominator = _DENOMINATOR.match(text, number.end(), head_end)
    if denominator is not None and float(denominator.group(1)) != hi:
        return None, span
    if not math.isfinite(value) or value < lo or value > hi:
        return None, span
    return value, span


def read_xml(text: str, start: int, end: int, criteria: Sequence[Criterion]) -> Block:
    """The criteria's scores and explanations from the XML section ``text[start:end]`` (rules above)."""
    block = Block("xml", start, end)
    for c in criteria:
        close = _last(_tag(c.name, True), text, start, end)
        section_end = close.start() if close else end
        opening = _last(_tag(c.name, False), text, start, section_end)
        block.scores[c.name] = None
        if opening is None:
            continue
        score_open = _SCORE_OPEN.search(text, opening.end(), section_end)
        if score_open is not None:
            value, span = score_value(text, c.min, c.max, score_open.end())
            limit = _SCORE_CLOSE.search(text, score_open.end(), section_end)
            if value is not None and span[1] <= (limit.start() if limit else section_end):
                block.scores[c.name], block.spans[c.name] = value, span
        expl = _EXPL_OPEN.search(text, opening.end(), section_end)
        if expl is not None:
            stop = _EXPL_CLOSE.search(text, expl.end(), section_end) or _ANY_TAG.search(text, expl.end(), section_end)
            block.explanations[c.name] = text[expl.end() : stop.start() if stop else section_end].strip()
    return block


def _find_xml(text: str, base: int, criteria: Sequence[Criterion]) -> Block | None:
    close = _last(_EVAL_CLOSE, text, base, len(text))
    if close is None:
        return None
    opening = _last(_EVAL_OPEN, text, base, close.start())
    if opening is None:
        return None
    block = read_xml(text, opening.end(), close.start(), criteria)
    block.start, block.end = opening.start(), close.end()
    return block


def _json_value(value: object, c: Criterion) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) and c.min <= number <= c.max else None
    if isinstance(value, str):
        return score_value(value, c.min, c.max)[0]
    return None


def _number_span(text: str, pos: int, end: int) -> tuple[int, int] | None:
    while pos < end and text[pos].isspace():
        pos += 1
    if text.startswith('"', pos):
        pos += 1
    number = _NUMBER.match(text, pos, min(end, pos + _MAX_SCORE_CHARS))
    return (number.start(), number.end()) if number else None


def _json_spans(text: str, start: int, end: int, names: set[str]) -> dict[str, tuple[int, int]]:
    """Spans of each criterion's score number: the value of a top-level key, or of its object's "score"."""
    spans: dict[str, tuple[int, int]] = {}
    depth, previous, inside = 0, None, None
    for token in _JSON_TOKENS.finditer(text, start, end):
        t = token.group()
        if t == ":" and previous is not None:
            key = previous[1:-1]
            value_at = token.end()
            while value_at < end and text[value_at].isspace():
                value_at += 1
            if depth == 1 and key in names:
                if text.startswith("{", value_at):
                    inside = key
                elif (span := _number_span(text, value_at, end)) is not None:
                    spans[key] = span
            elif depth == 2 and inside is not None and key == "score":
                if (span := _number_span(text, value_at, end)) is not None:
                    spans[inside] = span
        elif t in "{[":
            depth += 1
        elif t in "}]":
            depth -= 1
            if depth <= 1:
                inside = None
        previous = t if t.startswith('"') else None
    return spans


def last_object(text: str, base: int, accept) -> tuple[int, int, dict] | None:
    """The JSON object (a dict starting with ``{"`` at or after ``base``) that ``accept(obj)`` takes and that
    ends last, as ``(start, end, obj)`` with absolute offsets; None if there is none. Bounded as the module
    docstring says (the last candidates first, at most MAX_JSON_CANDIDATES, about MAX_JSON_WORK characters)."""
    # A decode error counts newlines up to its position, so decode a window, not the whole text; and
    # search the reversed window so that only the last candidates are ever visited.
    window = text[base:]
    reverse = window[::-1]
    best: tuple[int, int, dict] | None = None
    work = 0
    for found in itertools.islice(_JSON_START_REVERSED.finditer(reverse), MAX_JSON_CANDIDATES):
        if work > MAX_JSON_WORK:
            break
        pos = len(window) - found.end()
        try:
            obj, end = _DECODER.raw_decode(window, pos)
        except json.JSONDecodeError as error:
            work += error.pos - pos
            continue
        except (ValueError, RecursionError):  # huge integers; deeply nested brackets
            work += len(window) - pos
            continue
        work += end - pos
        if isinstance(obj, dict) and accept(obj) and (best is None or end >= best[1]):
            best = (pos, end, obj)
    return None if best is None else (best[0] + base, best[1] + base, best[2])


def read_object(obj: dict, criteria: Sequence[Criterion], start: int = 0, end: int = 0) -> Block:
    """A grade's scores and explanations from a decoded JSON object (``{name: score}`` or
    ``{name: {"score", "explanation"}}``); no spans."""
    block = Block("json", start, end)
    for c in criteria:
        value = obj.get(c.name)
        if isinstance(value, dict):
            if isinstance(value.get("explanation"), str):
                block.explanations[c.name] = value["explanation"].strip()
            value = value.get("score")
        block.scores[c.name] = _json_value(value, c)
    return block


def _find_json(text: str, base: int, criteria: Sequence[Criterion]) -> Block | None:
    names = {c.name for c in criteria}
    found = last_object(text, base, lambda obj: not names.isdisjoint(obj))
    if found is None:
        return None
    start, end, obj = found
    block = read_object(obj, criteria, start, end)
    spans = _json_spans(text, start, end, names)
    for c in criteria:
        if block.scores[c.name] is not None and c.name in spans:
            block.spans[c.name] = spans[c.name]
    return block


def find_block(text: str, criteria: Sequence[Criterion]) -> Block | None:
    """The last complete evaluation block (XML or JSON) in ``text``, read; None if there is none."""
    base = max(0, len(text) - MAX_PARSE_CHARS)
    candidates = [b for b in (_find_xml(text, base, criteria), _find_json(text, base, criteria)) if b is not None]
    return max(candidates, key=lambda b: b.end) if candidates else None


def parse(text: str | None, criteria: Sequence[Criterion]) -> Parsed:
    """Parse a teacher's output into per-criterion scores; never raises on a string.

    The feedback is the whole output, stripped: that is what SFT on feedback trains on.
    """
    names = [c.name for c in criteria]
    if text is None or not text.strip():
        return Parsed({n: None for n in names}, None, "empty")
    block = find_block(text, criteria)
    scores = {n: (block.scores.get(n) if block else None) for n in names}
    scored = sum(v is not None for v in scores.values())
    status = "ok" if scored == len(names) else "incomplete" if scored else "unparseable"
    return Parsed(scores, text.strip(), status)


def explanations(text: str | None, criteria: Sequence[Criterion]) -> dict[str, str]:
    """Per-criterion explanations from the block that ``parse`` reads; criteria without one are left out."""
    block = find_block(text, criteria) if text else None
    return dict(block.explanations) if block else {}


# ---- logprob-weighted scores (after G-Eval) ------------------------------------------------------


def _alternatives(token: dict) -> list[tuple[str, float]]:
    out = []
    for alt in token.get("top_logprobs") or ():
        piece, logprob = alt.get("token"), alt.get("logprob")
        if isinstance(piece, str) and isinstance(logprob, (int, float)) and not math.isnan(logprob):
            out.append((piece, math.exp(min(float(logprob), 0.0))))
    return out


def _extends(prefix: str, lo: float, hi: float) -> bool:
    """Whether some in-range integer has more digits than ``prefix`` and starts with it ("1" -> 10)."""
    if prefix.startswith("0"):
        return False
    for extra in range(1, 4):
        smallest, largest = int(prefix + "0" * extra), int(prefix + "9" * extra)
        if smallest > hi:
            return False
        if largest >= lo:
            return True
    return False


def _expected(tokens: list[dict], pieces: list[str], offsets: list[int], span: tuple[int, int], c: Criterion):
    first, stop = span
    i = bisect.bisect_right(offsets, first) - 1
    if not 0 <= i < len(pieces) or pieces[i][: first - offsets[i]].strip():
        return None
    sampled = pieces[i].strip()
    if not _DIGITS.fullmatch(sampled):
        return None  # e.g. "-" or "7<": the alternatives would not be numbers we can compare
    continued = offsets[i + 1] < stop and i + 1 < len(tokens)  # e.g. "10" written as "1", "0"
    alternatives = [(p.strip(), q) for p, q in _alternatives(tokens[i]) if _DIGITS.fullmatch(p.strip())]
    # A tokenizer with multi-digit number tokens writes 10 as "10", so its "1" means 1.
    multi_digit = any(len(p) > 1 for p, _ in alternatives)
    mass: dict[int, float] = {}
    ambiguous = 0.0
    for piece, prob in alternatives:
        following = _alternatives(tokens[i + 1]) if continued and piece == sampled else []
        norm = sum(q for _, q in following)
        if norm > 0:
            for nxt, q in following:
                value = int(piece + nxt) if _DIGITS.fullmatch(nxt) else int(piece)
                mass[value] = mass.get(value, 0.0) + prob * q / norm
            continue
        if (continued and piece == sampled) or (not multi_digit and _extends(piece, c.min, c.max)):
            ambiguous += prob
            continue
        mass[int(piece)] = mass.get(int(piece), 0.0) + prob
    valid = {v: p for v, p in mass.items() if c.min <= v <= c.max}
    total = sum(valid.values())
    if total <= 0 or ambiguous > AMBIGUOUS_SHARE_MAX * (total + ambiguous):
        return None
    return sum(v * p for v, p in valid.items()) / total


def logprob_scores(tokens: list[dict], criteria: Sequence[Criterion]) -> dict[str, float | None]:
    """Probability-weighted mean score per criterion from the score token's ``top_logprobs``.

    ``tokens`` is OpenAI's ``choices[0].logprobs.content`` as plain dicts. The score position is found
    by parsing the joined tokens exactly as ``parse`` does (last complete block). At that position the
    alternatives that are integers in [min, max] are weighted by probability and renormalised. A number
    split over two tokens ("1", "0") is resolved with the next position's alternatives. A first digit that
    could begin a longer in-range number ("1" of a 0..10 scale) is ambiguous when the tokenizer shows no
    multi-digit tokens there: it is dropped, and if it holds more than ``AMBIGUOUS_SHARE_MAX`` of the mass
    the criterion is None. None also when no position or no valid alternative is found; the caller then
    keeps the parsed score. Decimals are read at their first (integer) token.

    >>> from grpo_llm_eval.teacher.grading.rubric import Criterion
    >>> toks = [{"token": t, "logprob": 0.0, "top_logprobs": []} for t in ["<evaluation><answer><score>"]]
    >>> toks.append({"token": "8", "logprob": -0.1, "top_logprobs": [{"token": "8", "logprob": math.log(0.5)},
    ...              {"token": "6", "logprob": math.log(0.5)}]})
    >>> toks.append({"token": "</score></answer></evaluation>", "logprob": 0.0, "top_logprobs": []})
    >>> logprob_scores(toks, [Criterion("answer", 1.0, "")])
    {'answer': 7.0}
    """
    out: dict[str, float | None] = {c.name: None for c in criteria}
    pieces = [t.get("token") if isinstance(t.get("token"), str) else "" for t in tokens]
    text = "".join(pieces)
    block = find_block(text, criteria)
    if block is None:
        return out
    offsets = list(itertools.accumulate((len(p) for p in pieces), initial=0))
    for c in criteria:
        if c.name in block.spans:
            out[c.name] = _expected(tokens, pieces, offsets, block.spans[c.name], c)
    return out
