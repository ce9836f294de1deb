"""Spec of `bundled:instructions`: writing tasks with constraints, shipped as JSONL, every row satisfiable."""

from __future__ import annotations

import re

import datasets
import pytest

from grpo_llm_eval.data import bundled, constraints
from grpo_llm_eval.data.instructions import TASKS, generate_instructions, row_specs, type_counts

SPLITS = ("train", "test")


def rows(split: str) -> list[dict]:
    return bundled.read_bundled("instructions", split)


def all_rows() -> list[dict]:
    return rows("train") + rows("test")


# A response that breaks the constraint, one per type (the words below are in none of the generator's lists).
VIOLATE = {
    "max_words": lambda a: " ".join(["word"] * (a["n"] + 1)),
    "min_words": lambda a: " ".join(["word"] * (a["n"] - 1)),
    "lowercase": lambda a: "Word",
    "ends_with_question": lambda a: "word.",
    "no_commas": lambda a: "word, word",
    "must_include": lambda a: "word",
    "must_exclude": lambda a: f"word {a['word'].lower()}",
    "starts_with": lambda a: f"word {a['word']}",
    "sentence_count": lambda a: " ".join(["word."] * (a["n"] + 1)),
    "valid_json": lambda a: 'word {"answer": "word"}',
}


class TestShippedFiles:
    def test_shipped_files_equal_a_fresh_generation(self):
        fresh = generate_instructions()
        assert set(fresh) == set(SPLITS) == set(bundled.BUNDLED_DATASETS["instructions"].splits)
        for split in SPLITS:
            assert rows(split) == fresh[split], f"assets drifted for {split}"

    def test_the_drift_check_covers_the_instructions_files(self, tmp_path):
        assert bundled.main(["--out", str(tmp_path)]) == 0
        target = tmp_path / "instructions_train.jsonl"
        assert target.read_text(encoding="utf-8") == bundled.to_jsonl(rows("train"))
        target.write_text(target.read_text(encoding="utf-8").replace("at most", "at least", 1), encoding="utf-8")
        assert bundled.main(["--check", "--out", str(tmp_path)]) == 1

    def test_generation_is_deterministic_and_depends_on_the_seed(self):
        assert generate_instructions(7) == generate_instructions(7)
        assert generate_instructions(7) != generate_instructions(8)


class TestRows:
    def test_sizes_and_disjoint_splits(self):
        train = [r["question"] for r in rows("train")]
        test = [r["question"] for r in rows("test")]
        assert (len(train), len(test)) == (340, 60)
        assert len(set(train)) == len(train) and len(set(test)) == len(test)
        assert set(train).isdisjoint(test)
        for split in SPLITS:
            assert {r["kind"] for r in rows(split)} == set(TASKS), split

    def test_row_format(self):
        for row in all_rows():
            assert list(row) == ["question", "answer", "kind", "rubric"]
            assert row["answer"] == "" and row["kind"] in TASKS
            task = TASKS[row["kind"]][0].split("{}")[0]
            assert row["question"].startswith(task), row
            assert 2 <= len(row["rubric"]) <= 4, row
            ids = [item["id"] for item in row["rubric"]]
            assert len(set(ids)) == len(ids), row
            for item in row["rubric"]:
                assert list(item) == ["id", "criterion", "description", "weight", "check"]
                assert item["id"] == item["criterion"] == item["check"]["type"] in constraints.CONSTRAINT_TYPES
                assert item["weight"] == 1.0
                assert constraints.validate_spec(item["check"]) is None
                assert item["description"] == constraints.description(item["check"])
                assert row["question"].endswith(constraints.instruction(item["check"])) or \
                    constraints.instruction(item["check"]) + " " in row["question"], (row, item)

    def test_no_row_draws_a_conflicting_set(self):
        for row in all_rows():
            assert constraints.conflict(row_specs(row)) is None, row

    def test_word_limits_are_reachable_for_a_small_student(self):
        for row in all_rows():
            for spec in row_specs(row):
                if spec["type"] == "max_words":
                    assert 10 <= spec["n"] <= 40
                if spec["type"] == "min_words":
                    assert 5 <= spec["n"] <= 15
                if spec["type"] == "sentence_count":
                    assert 1 <= spec["n"] <= 3


class TestEveryRowIsSatisfiable:
    @pytest.mark.parametrize("split", SPLITS)
    def test_a_constructed_response_meets_all_and_a_broken_one_misses_each(self, split):
        for row in rows(split):
            specs = row_specs(row)
            response = constraints.witness(specs)
            assert all(constraints.check(spec, response) for spec in specs), (row["question"], response)
            for spec in specs:
                args = {k: v for k, v in spec.items() if k != "type"}
                assert not constraints.check(spec, VIOLATE[spec["type"]](args)), (spec, row["question"])

    def test_the_violations_meet_other_constraints_so_they_test_their_own(self):
        """Each broken response still has words, so it fails its constraint for the constraint's own reason."""
        assert constraints.check({"type": "no_commas"}, VIOLATE["lowercase"]({}))
        assert constraints.check({"type": "lowercase"}, VIOLATE["no_commas"]({}))
        assert constraints.check({"type": "max_words", "n": 1}, VIOLATE["must_include"]({}))

    def test_specs_survive_arrow_which_fills_other_types_arguments_with_none(self):
        table = datasets.Dataset.from_list(rows("test"))
        for original, loaded in zip(rows("test"), table, strict=True):
            loaded_specs = [item["check"] for item in loaded["rubric"]]
            assert any(None in spec.values() for spec in loaded_specs)
            response = constraints.witness(row_specs(original))
            assert [constraints.check(s, response) for s in loaded_specs] == [True] * len(loaded_specs)


class TestDescription:
    def test_the_description_states_the_true_counts(self):
        description = bundled.BUNDLED_DATASETS["instructions"].description
        types = "|".join(constraints.CONSTRAINT_TYPES)
        stated = dict(re.findall(rf"\b({types}) (\d+)", description.split("Rows with each type:")[1]))
        assert {k: int(v) for k, v in stated.items()} == type_counts(all_rows())
        assert f"{len(all_rows())} short writing tasks ({len(TASKS)} templates" in description
        assert f"Train {len(rows('train'))}, held-out test {len(rows('test'))}." in description

    def test_the_types_a_small_model_can_learn_are_well_represented(self):
        counts, total = type_counts(all_rows()), len(all_rows())
        for kind in ("max_words", "lowercase", "no_commas", "ends_with_question", "starts_with"):
            assert counts[kind] / total >= 0.25, (kind, counts[kind])
        assert all(count > 0 for count in counts.values()), counts
