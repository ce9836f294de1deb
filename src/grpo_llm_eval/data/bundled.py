"""Bundled datasets: small sets of verifiable problems shipped inside the package, for the offline default.

`bundled:arithmetic` is generated here, `bundled:instructions` in `instructions.py`; both deterministically,
shipped as JSONL under `assets/`.
Regenerate (or check the shipped files for drift) with::

    python -m grpo_llm_eval.data.bundled            # rewrite the files
    python -m grpo_llm_eval.data.bundled --check    # exit 1 if they differ from a fresh generation

Every problem is checked at generation time by `verify_row`, which re-reads the numbers from the question
text and evaluates the template's formula with a tiny AST evaluator, independently of the generator's
own arithmetic.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import operator
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

SUFFIX = " Give only the final number."
# The benchmark task of the "prove it learns" issue: keep this template exactly as it is.
ADDITION_TEMPLATE = "What is {a} + {b}?" + SUFFIX
ARITHMETIC_SEED = 20240611
# Problems per kind; addition is the majority (70 %) because it is the benchmark task.
ARITHMETIC_COUNTS = {"addition": 560, "subtraction": 80, "multiplication": 80, "word": 80}
TEST_FRACTION = 0.15  # per kind, so the held-out split has the same mix as train

NAMES = ["Tom", "Anna", "Ben", "Maya", "Leo", "Sara", "Omar", "Lucy", "Ivan", "Nora"]


@dataclass(frozen=True)
class WordTemplate:
    """A word problem: `text` with {name}, {a}, {b}[, {c}]; `formula` over a, b, c is what `verify_row` checks."""

    text: str
    formula: str
    make: Callable[[Callable[[int, int], int]], dict[str, int]]  # draws the numbers
    solve: Callable[[dict[str, int]], int]  # the generator's own answer


WORD_TEMPLATES = [
    WordTemplate("{name} has {a} apples and buys {b} more. How many apples does {name} have now?", "a + b",
                 lambda r: {"a": r(2, 30), "b": r(2, 30)}, lambda v: v["a"] + v["b"]),
    WordTemplate("{name} has {a} marbles and gives {b} to a friend. How many marbles does {name} have left?",
                 "a - b", lambda r: _pair_a_gt_b(r, 10, 40), lambda v: v["a"] - v["b"]),
    WordTemplate("A box holds {a} pencils. How many pencils are in {b} boxes?", "a * b",
                 lambda r: {"a": r(2, 12), "b": r(2, 9)}, lambda v: v["a"] * v["b"]),
    WordTemplate("{name} shares {a} cookies equally among {b} friends. How many cookies does each friend get?",
                 "a // b", lambda r: _divisible(r), lambda v: v["a"] // v["b"]),
    WordTemplate("A shop had {a} balloons and sold {b}. How many balloons are left?", "a - b",
                 lambda r: _pair_a_gt_b(r, 10, 50), lambda v: v["a"] - v["b"]),
    WordTemplate("There are {a} birds on a tree. {b} fly away and then {c} more land. How many birds are on the "
                 "tree now?", "a - b + c", lambda r: {**_pair_a_gt_b(r, 8, 30), "c": r(2, 15)},
                 lambda v: v["a"] - v["b"] + v["c"]),
    WordTemplate("{name} reads {a} pages a day for {b} days. How many pages does {name} read in total?", "a * b",
                 lambda r: {"a": r(2, 15), "b": r(2, 7)}, lambda v: v["a"] * v["b"]),
    WordTemplate("{name} had {a} stickers, got {b} more, and then gave away {c}. How many stickers does {name} "
                 "have now?", "a + b - c", lambda r: _three_sticker(r), lambda v: v["a"] + v["b"] - v["c"]),
]


def _pair_a_gt_b(r: Callable[[int, int], int], lo: int, hi: int) -> dict[str, int]:
    a = r(lo, hi)
    return {"a": a, "b": r(2, a - 1)}


def _divisible(r: Callable[[int, int], int]) -> dict[str, int]:
    b, q = r(2, 6), r(2, 9)
    return {"a": b * q, "b": b}


def _three_sticker(r: Callable[[int, int], int]) -> dict[str, int]:
    a, b = r(2, 20), r(2, 20)
    return {"a": a, "b": b, "c": r(1, a + b - 1)}


# ---- deterministic randomness ------------------------------------------------------------------
# Only `Random.random()` is guaranteed to give the same sequence on every Python version and platform
# (randint, choice and shuffle may change), so everything below is built on it alone.


def _randint(rng: random.Random, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi] from `rng.random()` only."""
    return lo + int(rng.random() * (hi - lo + 1))


def stable_shuffle(items: list, seed: int) -> list:
    """A shuffled copy of `items`, identical on every platform and Python version for the same seed."""
    rng = random.Random(seed)
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        out[i], out[j] = out[j], out[i]
    return out


# ---- generation ----------------------------------------------------------------------------------


def _draw(kind: str, rng: random.Random) -> tuple[str, int]:
    r = lambda lo, hi: _randint(rng, lo, hi)  # noqa: E731
    if kind == "addition":
        a, b = r(2, 30), r(2, 30)
        return ADDITION_TEMPLATE.format(a=a, b=b), a + b
    if kind == "subtraction":
        a = r(10, 50)
        b = r(2, a - 1)
        return f"What is {a} - {b}?{SUFFIX}", a - b
    if kind == "multiplication":
        a, b = r(2, 12), r(2, 12)
        return f"What is {a} * {b}?{SUFFIX}", a * b
    if kind == "word":
        template = WORD_TEMPLATES[_randint(rng, 0, len(WORD_TEMPLATES) - 1)]
        values = template.make(r)
        name = NAMES[_randint(rng, 0, len(NAMES) - 1)]
        return template.text.format(name=name, **values) + SUFFIX, template.solve(values)
    raise ValueError(f"unknown problem kind {kind!r}; kinds: {', '.join(ARITHMETIC_COUNTS)}")


def generate_arithmetic(seed: int = ARITHMETIC_SEED) -> dict[str, list[dict[str, str]]]:
    """Generate `bundled:arithmetic`: {"train": rows, "test": rows}, rows {question, answer, kind}.

    Deterministic for a seed; questions are unique across both splits; every row passes `verify_row`.

    >>> generate_arithmetic()["test"][0].keys()
    dict_keys(['question', 'answer', 'kind'])
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for kind, count in ARITHMETIC_COUNTS.items():
        rows = []
        while len(rows) < count:
            question, answer = _draw(kind, rng)
            if question in seen:
                continue
            seen.add(question)
            rows.append({"question": question, "answer": str(answer), "kind": kind})
        n_test = round(count * TEST_FRACTION)
        splits["test"] += rows[:n_test]
        splits["train"] += rows[n_test:]
    splits = {name: stable_shuffle(rows, seed + i) for i, (name, rows) in enumerate(splits.items())}
    train_questions = {row["question"] for row in splits["train"]}
    shared = [row["question"] for row in splits["test"] if row["question"] in train_questions]
    assert not shared, f"test questions also in train: {shared[:3]}"
    bad = [row for rows in splits.values() for row in rows if not verify_row(row)]
    assert not bad, f"generated rows with a wrong answer: {bad[:3]}"
    return splits


# ---- independent verification --------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}
_ARITH_RE = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?" + re.escape(SUFFIX) + "$")


def safe_eval(expr: str, names: dict[str, int] | None = None) -> int:
    """Evaluate an integer expression of + - * // and names, without `eval`.

    >>> safe_eval("a - b + c", {"a": 9, "b": 4, "c": 2})
    7
    """
    names = names or {}

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            return names[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported expression element {ast.dump(node)} in {expr!r}")

    return walk(ast.parse(expr, mode="eval"))


def _template_regex(text: str) -> re.Pattern:
    pattern = re.escape(text + SUFFIX)
    for key in ("a", "b", "c"):
        pattern = pattern.replace(re.escape("{" + key + "}"), rf"(?P<{key}>\d+)", 1)
    pattern = pattern.replace(re.escape("{name}"), r"(?P<name>[A-Z][a-z]+)", 1)
    return re.compile("^" + pattern.replace(re.escape("{name}"), r"(?P=name)") + "$")


_WORD_PATTERNS = [(_template_regex(t.text), t.formula) for t in WORD_TEMPLATES]


def verify_row(row: dict[str, str]) -> bool:
    """True if `row["answer"]` is the value of the problem in `row["question"]`, re-read from the text.

    >>> verify_row({"question": "What is 2 + 3? Give only the final number.", "answer": "5", "kind": "addition"})
    True
    """
    question, answer = row["question"], row["answer"]
    match = _ARITH_RE.match(question)
    if match:
        value = safe_eval(f"{match[1]} {match[2]} {match[3]}")
        return str(value) == answer and value >= 0
    for pattern, formula in _WORD_PATTERNS:
        match = pattern.match(question)
        if match:
            value = safe_eval(formula, {k: int(v) for k, v in match.groupdict().items() if k != "name"})
            return str(value) == answer and value >= 0
    return False


# ---- registry and files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BundledDataset:
    """A bundled dataset: how to generate it and what it is."""

    description: str
    generate: Callable[[], dict[str, list[dict]]]
    splits: tuple[str, ...]


BUNDLED_DATASETS: dict[str, BundledDataset] = {
    "arithmetic": BundledDataset(
        "800 verifiable integer problems (70 % 'What is a + b?', a, b in 2..30; a - b, a * b; word problems); "
        "train 680, held-out test 120.",
        generate_arithmetic,
        ("train", "test"),
    ),
    "instructions": BundledDataset(
        "400 short writing tasks (10 templates: describe to a child, advice, product blurb, ...) each with 2 to 4 "
        "constraints a program checks, written out as instructions and as the row's rubric (one checklist item "
        "per constraint, its spec under 'check'); answer empty. Rows with each type: max_words 191 (10..40 "
        "words), ends_with_question 169, no_commas 137, starts_with 133, must_include 127, lowercase 122, "
        "must_exclude 120, sentence_count 95 (exactly 1..3), min_words 59 (5..15), valid_json 37. "
        "Train 340, held-out test 60.",
        lambda: _generate_instructions(),
        ("train", "test"),
    ),
}


def _generate_instructions() -> dict[str, list[dict]]:
    from grpo_llm_eval.data.instructions import generate_instructions  # it builds on this module's helpers

    return generate_instructions()


def asset_file(name: str, split: str) -> str:
    """File name of a bundled split under `grpo_llm_eval/assets/`."""
    return f"{name}_{split}.jsonl"


def read_bundled(name: str, split: str) -> list[dict]:
    """Rows of a shipped bundled split (name and split must be in `BUNDLED_DATASETS`)."""
    text = resources.files("grpo_llm_eval.assets").joinpath(asset_file(name, split)).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def to_jsonl(rows: list[dict]) -> str:
    """JSON Lines text with '\\n' line ends on every platform."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> int:
    """Regenerate the bundled JSONL files (or, with --check, report whether they drifted)."""
    parser = argparse.ArgumentParser(prog="python -m grpo_llm_eval.data.bundled", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 if the shipped files differ; write nothing.")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets"), help="Folder to write to.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    drift = 0
    for name, spec in BUNDLED_DATASETS.items():
        for split, rows in spec.generate().items():
            path = Path(args.out) / asset_file(name, split)
            text = to_jsonl(rows)
            if args.check:
                same = path.is_file() and path.read_text(encoding="utf-8") == text
                drift += not same
                logger.info("%s: %s", path, "up to date" if same else "DIFFERS from a fresh generation")
            else:
                path.write_text(text, encoding="utf-8", newline="\n")
                logger.info("wrote %s (%d rows)", path, len(rows))
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
