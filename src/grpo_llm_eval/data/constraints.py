"""Constraints a program can check, for instruction following: the registry behind `bundled:instructions`.

A constraint is a spec `{"type": <id>, <argument>: <value>, ...}`. Its type id is stable: it is the id of the
rubric item that carries it. Every type has an instruction sentence (appended to the prompt), a checklist
sentence (what the teacher grades) and a check (what a program measures). Arguments share two names across
types, `n` (a count) and `word`, so that a column of specs stays a small table.

What the checks read (the same rules the instructions and checklist sentences state):

- Only the ANSWER part: after the last `</think>` if there is one (`verifiers.answer_part`), stripped.
- A word is a run of letters or digits, with inner apostrophes or hyphens (`it's`, `well-known`): punctuation
  and markdown around words do not count, and neither do JSON's quotes and braces.
- An answer with no word at all meets no constraint. Otherwise an empty answer would meet every constraint
  that forbids something (no commas, no capitals, at most N words) and a student could learn silence.
- `sentence_count` is EXACTLY n sentences. A sentence ends at `.`, `!` or `?` (repeats and closing quotes or
  brackets allowed) followed by a space or the end; a last fragment without one counts too. So `3.5` and
  `e.g.x` do not end a sentence, but `Dr. Smith` does.
- `valid_json` is one JSON object (`{...}`), the whole answer, optionally inside one ```json fence. A bare
  string or number is JSON too, but it does not show a model formatting its answer as asked.
- `must_include` / `must_exclude` / `starts_with` look for the word case-insensitively, with no letter or digit
  right before or after it: `friends` and `befriend` do not contain the word `friend`, `friend's` does (and
  `well-known` contains `well`). `starts_with` skips what comes before the first letter or digit
  (`**Imagine**`, `"Imagine`).
- `ends_with_question`: the last character is `?`, closing quotes, brackets or markdown emphasis aside.

>>> check({"type": "max_words", "n": 5, "word": None}, "<think>long musing here</think> Short and sweet.")
True
>>> check({"type": "starts_with", "word": "Imagine"}, "**imagine** a world")
True
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from grpo_llm_eval.verifiers import answer_part

_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?]+['\"’”)\]*_]*(?=\s|$)")
_TRAILING_CLOSERS = "'\"’”)]*_ \t\n"
_LEADING = re.compile(r"[\W_]*")  # quotes, brackets, markdown before the first word
_FENCE = re.compile(r"^```(?:json)?[ \t]*\n(.*)\n```$", re.DOTALL | re.IGNORECASE)


def words(text: str) -> list[str]:
    """The words of TEXT as the checks count them.

    >>> words('{"answer": "It\\'s a well-known fact, 3.5 times."}')
    ['answer', "It's", 'a', 'well-known', 'fact', '3', '5', 'times']
    """
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """The sentences of TEXT as `sentence_count` counts them (each holds at least one word).

    >>> sentences("Hi there! Is it 3.5? Yes... it is")
    ['Hi there!', 'Is it 3.5?', 'Yes...', 'it is']
    """
    out, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        out.append(text[start:match.end()].strip())
        start = match.end()
    out.append(text[start:].strip())
    return [s for s in out if words(s)]


def _word_pattern(word: str) -> re.Pattern:
    """WORD, case-insensitive, with no letter or digit right before or after it."""
    return re.compile(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", re.IGNORECASE)


def _has_word(text: str, word: str) -> bool:
    return _word_pattern(word).search(text) is not None


def _starts_with(text: str, word: str) -> bool:
    return _word_pattern(word).match(text, _LEADING.match(text).end()) is not None


def _json_object(text: str) -> bool:
    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced[1] if fenced else text)
    except ValueError:
        return False
    return isinstance(value, dict)


def _ends_with_question(text: str) -> bool:
    return text.rstrip(_TRAILING_CLOSERS).endswith("?")


@dataclass(frozen=True)
class ConstraintType:
    """One kind of constraint: its arguments, how to draw them, how to say it, and how to check it."""

    args: tuple[str, ...]  # required argument names ("n": int >= 1, "word": one word)
    instruction: str  # appended to the prompt; str.format over the arguments
    description: str  # the checklist item the teacher grades; str.format over the arguments
    check: Callable[[dict, str], bool]  # (arguments, answer text with at least one word) -> met
    draw: Callable[[Callable[[int, int], int]], dict]  # seeded draw of the arguments from randint(lo, hi)


# Words the generator draws from. The three lists are disjoint, so no drawn set asks for a word it forbids.
START_WORDS = ["Imagine", "Today", "Yes", "First", "Honestly", "Picture", "Remember", "Sometimes", "Here",
               "Listen", "Well", "Friends"]
INCLUDE_WORDS = ["bright", "simple", "because", "together", "always", "careful", "small", "quickly", "happy",
                 "water", "light", "future", "green", "morning", "kind", "home"]
EXCLUDE_WORDS = ["very", "really", "just", "good", "great", "thing", "nice", "important", "amazing", "best",
                 "like", "also"]


def _pick(words_: list[str]) -> Callable[[Callable[[int, int], int]], dict]:
    return lambda r: {"word": words_[r(0, len(words_) - 1)]}


CONSTRAINT_TYPES: dict[str, ConstraintType] = {
    "max_words": ConstraintType(
        ("n",), "Answer in at most {n} words.", "The response is at most {n} words long.",
        lambda a, t: len(words(t)) <= a["n"], lambda r: {"n": r(2, 8) * 5}),
    "min_words": ConstraintType(
        ("n",), "Use at least {n} words.", "The response is at least {n} words long.",
        lambda a, t: len(words(t)) >= a["n"], lambda r: {"n": r(5, 15)}),
    "lowercase": ConstraintType(
        (), "Write only in lowercase letters, with no capital letters at all.",
        "The response contains no capital letters.",
        lambda a, t: t == t.lower(), lambda r: {}),
    "ends_with_question": ConstraintType(
        (), "End your response with a question.", "The response ends with a question mark.",
        lambda a, t: _ends_with_question(t), lambda r: {}),
    "no_commas": ConstraintType(
        (), "Do not use any commas.", "The response contains no commas.",
        lambda a, t: "," not in t and "，" not in t, lambda r: {}),
    "must_include": ConstraintType(
        ("word",), 'Include the word "{word}".', 'The response uses the word "{word}".',
        lambda a, t: _has_word(t, a["word"]), _pick(INCLUDE_WORDS)),
    "must_exclude": ConstraintType(
        ("word",), 'Do not use the word "{word}".', 'The response does not use the word "{word}".',
        lambda a, t: not _has_word(t, a["word"]), _pick(EXCLUDE_WORDS)),
    "starts_with": ConstraintType(
        ("word",), 'Start your response with the word "{word}".', 'The first word of the response is "{word}".',
        lambda a, t: _starts_with(t, a["word"]), _pick(START_WORDS)),
    "sentence_count": ConstraintType(
        ("n",), "Write exactly {n} {sentences}.", "The response has exactly {n} {sentences}.",
        lambda a, t: len(sentences(t)) == a["n"], lambda r: {"n": r(1, 3)}),
    "valid_json": ConstraintType(
        (), "Format your whole response as one JSON object, with no text outside it.",
        "The whole response is one valid JSON object, with no text outside it.",
        lambda a, t: _json_object(t), lambda r: {}),
}

# Pairs that cannot both be met, or read as a contradiction to a person (lowercase, and start with "Imagine").
CONFLICTING_TYPES = frozenset(frozenset(p) for p in [
    ("lowercase", "starts_with"), ("valid_json", "ends_with_question"), ("valid_json", "starts_with"),
    ("valid_json", "sentence_count")])
MIN_WORDS_GAP = 5  # a min_words and a max_words in one set leave at least this much room between them


def _arguments(spec: Mapping) -> tuple[str, dict]:
    """(type id, its arguments) of a spec, or ValueError naming what is wrong."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"a constraint spec must be a mapping with a 'type', got {type(spec).__name__}")
    present = {k: v for k, v in spec.items() if v is not None}  # Arrow fills other types' arguments with None
    kind = present.pop("type", None)
    if not isinstance(kind, str) or kind not in CONSTRAINT_TYPES:
        raise ValueError(f"unknown constraint type {kind!r}; known types: {', '.join(CONSTRAINT_TYPES)}")
    spec_type = CONSTRAINT_TYPES[kind]
    for name in spec_type.args:
        if name not in present:
            raise ValueError(f"constraint {kind!r} needs the argument {name!r}")
    extra = sorted(set(present) - set(spec_type.args))
    if extra:
        raise ValueError(f"constraint {kind!r} takes {', '.join(spec_type.args) or 'no arguments'}, "
                         f"not {', '.join(map(repr, extra))}")
    args = {name: present[name] for name in spec_type.args}
    n = args.get("n")
    if n is not None:
        if isinstance(n, float) and n.is_integer():
            args["n"] = n = int(n)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"constraint {kind!r}: argument 'n' must be a whole number >= 1, got {n!r}")
    word = args.get("word")
    if word is not None and (not isinstance(word, str) or words(word) != [word]):
        raise ValueError(f"constraint {kind!r}: argument 'word' must be one word (letters or digits), got {word!r}")
    return kind, args


def validate_spec(spec: Mapping) -> str | None:
    """None if SPEC is a usable constraint, else a one-line description of the problem.

    >>> validate_spec({"type": "max_words", "n": 0})
    "constraint 'max_words': argument 'n' must be a whole number >= 1, got 0"
    """
    try:
        _arguments(spec)
    except ValueError as exc:
        return str(exc)
    return None


def check(spec: Mapping, response: str, think_close: str = "</think>") -> bool:
    """Whether RESPONSE's answer part meets the constraint SPEC (keys whose value is None are ignored).

    Raises ValueError, naming the type or argument, for an unknown type or a missing or bad argument.

    >>> check({"type": "no_commas"}, "<think>a, b</think>No commas here.")
    True
    >>> check({"type": "lowercase"}, "")
    False
    """
    kind, args = _arguments(spec)
    text = answer_part(response or "", think_close).strip()
    if not words(text):
        return False
    return bool(CONSTRAINT_TYPES[kind].check(args, text))


def _format_args(args: Mapping) -> dict:
    return {**args, "sentences": "sentence" if args.get("n") == 1 else "sentences"}


def instruction(spec: Mapping) -> str:
    """The instruction sentence for SPEC, as appended to a prompt."""
    kind, args = _arguments(spec)
    return CONSTRAINT_TYPES[kind].instruction.format(**_format_args(args))


def description(spec: Mapping) -> str:
    """The checklist sentence for SPEC, as the teacher grades it."""
    kind, args = _arguments(spec)
    return CONSTRAINT_TYPES[kind].description.format(**_format_args(args))


def rubric_item(spec: Mapping) -> dict:
    """SPEC as a rubric item: {id, criterion, description, weight, check}, its id and criterion the type id."""
    kind, args = _arguments(spec)
    return {"id": kind, "criterion": kind, "description": description(spec), "weight": 1.0,
            "check": {"type": kind, **args}}


def conflict(specs: Iterable[Mapping]) -> str | None:
    """None if the constraints of one prompt can all be met together, else why not (one line).

    >>> conflict([{"type": "max_words", "n": 10}, {"type": "min_words", "n": 8}])
    'min_words 8 leaves less than 5 words of room below max_words 10'
    """
    parsed = [_arguments(s) for s in specs]
    kinds = [k for k, _ in parsed]
    if len(set(kinds)) != len(kinds):
        return f"a type appears twice: {', '.join(kinds)}"
    by_kind = dict(parsed)
    for pair in CONFLICTING_TYPES:
        if pair <= by_kind.keys():
            return f"{' and '.join(sorted(pair))} conflict"
    if {"min_words", "max_words"} <= by_kind.keys():
        low, high = by_kind["min_words"]["n"], by_kind["max_words"]["n"]
        if low > high - MIN_WORDS_GAP:
            return f"min_words {low} leaves less than {MIN_WORDS_GAP} words of room below max_words {high}"
    needed = max(len([k for k in ("starts_with", "must_include") if k in by_kind]),
                 by_kind.get("sentence_count", {}).get("n", 1), by_kind.get("min_words", {}).get("n", 1),
                 1 + ("valid_json" in by_kind))  # JSON needs a key, and the key is a word
    if "max_words" in by_kind and needed > by_kind["max_words"]["n"]:
        return f"max_words {by_kind['max_words']['n']} is fewer than the {needed} words the others need"
    excluded = by_kind.get("must_exclude", {}).get("word", "").lower()
    for kind in ("must_include", "starts_with"):
        if excluded and by_kind.get(kind, {}).get("word", "").lower() == excluded:
            return f"{kind} and must_exclude name the same word {excluded!r}"
    return None


def witness(specs: Iterable[Mapping], filler: str = "note") -> str:
    """A response that meets every constraint in SPECS (which `conflict` accepts): proof they can be met.

    >>> witness([{"type": "starts_with", "word": "Yes"}, {"type": "sentence_count", "n": 2},
    ...          {"type": "ends_with_question"}])
    'Yes. note?'
    """
    specs = list(specs)
    problem = conflict(specs)
    if problem:
        raise ValueError(f"constraints cannot all be met: {problem}")
    by_kind = dict(_arguments(s) for s in specs)
    if filler.lower() == by_kind.get("must_exclude", {}).get("word", "").lower():
        filler = "item"
    head = [by_kind[k]["word"] for k in ("starts_with", "must_include") if k in by_kind]
    is_json = "valid_json" in by_kind
    count = max(len(head), by_kind.get("sentence_count", {}).get("n", 1),
                by_kind.get("min_words", {}).get("n", 1) - is_json)  # the JSON key "answer" is a word
    body = head + [filler] * (count - len(head))
    if "lowercase" in by_kind:
        body = [w.lower() for w in body]
    if is_json:
        return json.dumps({"answer": " ".join(body)})
    n_sentences = by_kind.get("sentence_count", {}).get("n", 1)
    cuts = [len(body) * i // n_sentences for i in range(n_sentences + 1)]
    parts = [" ".join(body[cuts[i]:cuts[i + 1]]) for i in range(n_sentences)]
    end = "?" if "ends_with_question" in by_kind else "."
    return ". ".join(parts) + end
