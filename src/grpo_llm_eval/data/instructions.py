"""`bundled:instructions`: short writing tasks, each with 2 to 4 constraints a program can check.

A prompt is a writing task from one of the templates below, with a filler, followed by its constraints written
out as instructions (`constraints.CONSTRAINT_TYPES`). The row carries the same constraints as its rubric: one
checklist item per constraint for the teacher, with the constraint's spec beside it for a program to check.
There is no single right answer, so "answer" is empty.

Generated deterministically (`bundled.py` writes and drift-checks the files). Every drawn set passes
`constraints.conflict`, and `constraints.witness` builds a response that meets all of it, checked at generation.
The student is small and writes few tokens, so word limits are short and the types a small model can learn
(lowercase, no commas, a question mark at the end, a first word, a word limit) are drawn most often.
"""

from __future__ import annotations

import random

from grpo_llm_eval.data import constraints
from grpo_llm_eval.data.bundled import _randint, stable_shuffle

INSTRUCTIONS_SEED = 20261205
ROWS_PER_KIND = 40
TEST_PER_KIND = 6  # per kind, so the held-out split has the same mix as train
CONSTRAINTS_PER_ROW = (2, 4)
# How often each type is drawn, relative to the others (before conflicts are ruled out).
TYPE_WEIGHTS = {"max_words": 4, "lowercase": 3, "no_commas": 3, "ends_with_question": 3, "starts_with": 3,
                "must_include": 2, "must_exclude": 2, "sentence_count": 2, "min_words": 1, "valid_json": 1}

TASKS: dict[str, tuple[str, list[str]]] = {
    "describe_to_child": ("Describe {} to a child.", [
        "a rainbow", "the moon", "a volcano", "thunder", "the ocean", "a butterfly", "snow", "a library",
        "the wind", "a rocket", "a bee", "a forest", "a city bus", "a shadow", "an island", "a dinosaur"]),
    "advice": ("Give advice to someone who wants to {}.", [
        "learn to cook", "start running", "save money", "make new friends", "sleep better", "learn a language",
        "grow tomatoes", "read more books", "keep a plant alive", "start drawing", "speak in public",
        "get up earlier", "learn to swim", "keep a diary", "travel on a budget", "play the guitar"]),
    "product_blurb": ("Write a product blurb for {}.", [
        "a reusable water bottle", "a folding bicycle", "a desk lamp", "a pair of rain boots", "a travel pillow",
        "a smart kettle", "a backpack", "a board game", "a wool scarf", "a solar charger", "a notebook",
        "a pair of headphones", "a picnic blanket", "an alarm clock", "a garden hose", "a coffee mug"]),
    "explain_why": ("Explain why {}.", [
        "people need sleep", "the sky looks blue", "leaves fall in autumn", "we brush our teeth", "ice floats",
        "bread goes stale", "cats purr", "bikes need oil", "plants need sunlight", "the sea is salty",
        "people yawn", "metal feels cold", "some birds fly south", "we wear seat belts", "the moon has phases"]),
    "invitation": ("Write a short invitation to {}.", [
        "a birthday party", "a picnic in the park", "a book club meeting", "a garden party", "a movie night",
        "a school concert", "a neighbourhood clean-up", "a board game evening", "a bake sale", "a farewell lunch",
        "a beach day", "a charity run", "a chess club", "a pottery class"]),
    "thank_you": ("Write a thank-you note to {}.", [
        "a neighbour who watered your plants", "a teacher", "a friend who helped you move", "a doctor",
        "a bus driver", "your grandmother", "a coach", "a colleague who covered your shift", "a librarian",
        "a stranger who returned your wallet", "a host who cooked dinner", "a mentor", "a nurse", "a baker"]),
    "opinion": ("Share your opinion on {}.", [
        "school uniforms", "homework", "city gardens", "electric cars", "board games", "working from home",
        "breakfast", "summer holidays", "reading on paper", "public libraries", "team sports",
        "learning music", "rainy days", "museums"]),
    "story_opening": ("Write the opening of a story about {}.", [
        "a lost key", "a talking cat", "a lighthouse keeper", "a robot gardener", "a secret door",
        "a dragon who hates fire", "a rainy market day", "a girl who collects clocks", "a ship in a bottle",
        "a quiet village", "an old map", "a snowman who travels", "a forgotten letter", "a brave mouse"]),
    "compare": ("Compare {}.", [
        "tea and coffee", "cats and dogs", "trains and planes", "books and films", "summer and winter",
        "the beach and the mountains", "pencils and pens", "cities and villages", "bikes and cars",
        "rain and snow", "breakfast and dinner", "running and swimming", "paper maps and phone maps",
        "cooking and baking"]),
    "fun_idea": ("Suggest a fun way to {}.", [
        "spend a rainy afternoon", "learn new words", "stay active at home", "celebrate a friend",
        "reuse old jars", "explore your town", "practise maths", "relax after work", "meet your neighbours",
        "cook with children", "spend a Sunday", "start a hobby", "enjoy a park", "make a small gift"]),
}


def _draw_constraints(rng: random.Random) -> list[dict]:
    """2 to 4 constraint specs of distinct, compatible types, in registry order."""
    r = lambda lo, hi: _randint(rng, lo, hi)  # noqa: E731
    while True:
        count = r(*CONSTRAINTS_PER_ROW)
        chosen: list[str] = []
        while len(chosen) < count:
            open_types = [t for t in TYPE_WEIGHTS if t not in chosen
                          and not any(frozenset((t, c)) in constraints.CONFLICTING_TYPES for c in chosen)]
            ticket = r(1, sum(TYPE_WEIGHTS[t] for t in open_types))
            for kind in open_types:
                ticket -= TYPE_WEIGHTS[kind]
                if ticket <= 0:
                    chosen.append(kind)
                    break
        specs = [{"type": t, **constraints.CONSTRAINT_TYPES[t].draw(r)} for t in constraints.CONSTRAINT_TYPES
                 if t in chosen]
        if constraints.conflict(specs) is None:  # e.g. min_words too close to max_words: draw again
            return specs


def make_row(kind: str, task: str, specs: list[dict]) -> dict:
    """A dataset row: the task and its instructions as the question, the constraints as the rubric."""
    question = " ".join([task] + [constraints.instruction(s) for s in specs])
    return {"question": question, "answer": "", "kind": kind, "rubric": [constraints.rubric_item(s) for s in specs]}


def row_specs(row: dict) -> list[dict]:
    """The constraint specs of a row's rubric."""
    return [item["check"] for item in row["rubric"]]


def generate_instructions(seed: int = INSTRUCTIONS_SEED) -> dict[str, list[dict]]:
    """Generate `bundled:instructions`: {"train": rows, "test": rows}, rows {question, answer, kind, rubric}.

    Deterministic for a seed; questions are unique across both splits; every row's constraints can all be met.

    >>> generate_instructions()["test"][0]["rubric"][0].keys()
    dict_keys(['id', 'criterion', 'description', 'weight', 'check'])
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for kind, (template, fillers) in TASKS.items():
        rows = []
        while len(rows) < ROWS_PER_KIND:
            task = template.format(fillers[_randint(rng, 0, len(fillers) - 1)])
            row = make_row(kind, task, _draw_constraints(rng))
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
        splits["test"] += rows[:TEST_PER_KIND]
        splits["train"] += rows[TEST_PER_KIND:]
    splits = {name: stable_shuffle(rows, seed + i) for i, (name, rows) in enumerate(splits.items())}
    for rows in splits.values():
        for row in rows:
            specs = row_specs(row)
            example = constraints.witness(specs)
            assert all(constraints.check(s, example) for s in specs), (row, example)
    return splits


def type_counts(rows: list[dict]) -> dict[str, int]:
    """How many ROWS carry each constraint type, in registry order."""
    present = [item["id"] for row in rows for item in row["rubric"]]
    return {t: present.count(t) for t in constraints.CONSTRAINT_TYPES}
