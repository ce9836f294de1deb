"""Spec of the programmatic constraint checks (data/constraints.py) and of the checklist reward helpers."""

from __future__ import annotations

import pytest

from grpo_llm_eval.data import constraints
from grpo_llm_eval.data.constraints import CONSTRAINT_TYPES, check, conflict, validate_spec, witness
from grpo_llm_eval.verifiers import checklist_results, checklist_score

# (spec, responses that meet it, responses that do not)
CASES = [
    ({"type": "max_words", "n": 5},
     ["One two three four five.", "It's well-known: fine!", "<think>a b c d e f g h</think>short one"],
     ["one two three four five six", "a, b, c, d, e, f"]),
    ({"type": "min_words", "n": 3},
     ["one two three", '{"answer": "two words"}'],
     ["one, two!", "<think>lots of words in here</think>too short", "..."]),
    ({"type": "lowercase"},
     ["all small here, 42 times.", "42", "<think>Thinking In Caps</think>fine"],
     ["Capital start", "inner Capital", "ÉCOLE"]),
    ({"type": "ends_with_question"},
     ["Is it?", 'He asked "why?"', "What now?**", "Really?\n\n"],
     ["No question.", "Why? Because.", "? then words"]),
    ({"type": "no_commas"},
     ["No commas here. None at all!", "<think>a, b</think>clean"],
     ["one, two", "full width，comma"]),
    ({"type": "must_include", "word": "friend"},
     ["A FRIEND indeed.", "my friend's dog", "friend", "a friend-like cat"],
     ["friends only", "befriend them", "fri end"]),
    ({"type": "must_exclude", "word": "very"},
     ["Everyday things.", "Every view is fine."],
     ["Very nice.", "it is very", "<think>x</think>oh very good"]),
    ({"type": "starts_with", "word": "Imagine"},
     ["Imagine a world.", "imagine that", "**Imagine** this", '"Imagine," she said', "  Imagine"],
     ["I imagine so.", "Imagined things", "Sure! Imagine this"]),
    ({"type": "sentence_count", "n": 2},
     ["One here. Two there.", "It costs 3.5 dollars! Is that fine?", "First one... and then", "Yes. no"],
     ["Only one.", "One. Two. Three.", "One. Two. Three"]),
    ({"type": "valid_json"},
     ['{"answer": "yes"}', '```json\n{"a": [1, 2]}\n```', '  {"x": "y"}  '],
     ['Here it is: {"a": 1}', '["just", "a", "list"]', '"a string"', "{'single': 'quotes'}", '{"a": 1']),
]


class TestEachConstraintType:
    @pytest.mark.parametrize(("spec", "good", "bad"), CASES, ids=[c[0]["type"] for c in CASES])
    def test_meets_and_misses_on_hand_written_answers(self, spec, good, bad):
        for response in good:
            assert check(spec, response), (spec, response)
        for response in bad:
            assert not check(spec, response), (spec, response)

    def test_every_registered_type_has_hand_written_cases(self):
        assert [c[0]["type"] for c in CASES] == list(CONSTRAINT_TYPES)

    @pytest.mark.parametrize("kind", list(CONSTRAINT_TYPES))
    def test_an_answer_without_words_meets_no_constraint(self, kind):
        """Else silence would meet every constraint that forbids something, and a student could learn it."""
        spec = {"type": kind, **CONSTRAINT_TYPES[kind].draw(lambda lo, hi: lo)}
        for response in ["", "   ", "<think>I will say nothing</think>", "?!", "{}"]:
            assert not check(spec, response), (spec, response)

    def test_only_the_text_after_the_last_think_tag_is_checked(self):
        spec = {"type": "starts_with", "word": "Yes"}
        assert check(spec, "<think>No</think><think>Maybe</think>Yes indeed")
        assert not check(spec, "Yes<think>x</think>No")
        assert check({"type": "lowercase"}, "ANSWER: <reasoning>x", think_close="ANSWER:")


class TestSpecs:
    def test_keys_whose_value_is_none_are_ignored(self):
        """Arrow unifies the check structs of a column, so each spec arrives with every type's arguments."""
        assert check({"type": "lowercase", "n": None, "word": None}, "fine")
        assert check({"type": "max_words", "n": 2, "word": None}, "two words")
        assert check({"type": "must_include", "n": None, "word": "cat"}, "a cat")

    def test_an_unknown_type_names_itself_and_the_known_types(self):
        with pytest.raises(ValueError, match=r"unknown constraint type 'shout'.*max_words"):
            check({"type": "shout"}, "HELLO")
        assert "unknown constraint type None" in validate_spec({"n": 3})
        assert "unknown constraint type" in validate_spec({"type": ["lowercase"]})

    def test_a_missing_or_bad_argument_names_the_type_and_argument(self):
        with pytest.raises(ValueError, match=r"'max_words' needs the argument 'n'"):
            check({"type": "max_words", "n": None}, "hi")
        assert "'must_include' needs the argument 'word'" in validate_spec({"type": "must_include"})
        assert "whole number >= 1" in validate_spec({"type": "min_words", "n": "5"})
        assert "whole number >= 1" in validate_spec({"type": "sentence_count", "n": True})
        assert "one word" in validate_spec({"type": "starts_with", "word": "two words"})
        assert "not 'word'" in validate_spec({"type": "lowercase", "word": "x"})
        assert "mapping" in validate_spec(["lowercase"])

    def test_valid_specs_pass_validation(self):
        assert validate_spec({"type": "max_words", "n": 20.0, "word": None}) is None
        assert check({"type": "max_words", "n": 2.0}, "two words")
        for kind, spec_type in CONSTRAINT_TYPES.items():
            assert validate_spec({"type": kind, **spec_type.draw(lambda lo, hi: hi)}) is None

    def test_instruction_and_description_state_the_arguments(self):
        spec = {"type": "sentence_count", "n": 1}
        assert constraints.instruction(spec) == "Write exactly 1 sentence."
        assert constraints.description({"type": "max_words", "n": 20}) == "The response is at most 20 words long."
        item = constraints.rubric_item({"type": "must_exclude", "word": "very", "n": None})
        assert item == {"id": "must_exclude", "criterion": "must_exclude", "weight": 1.0,
                        "description": 'The response does not use the word "very".',
                        "check": {"type": "must_exclude", "word": "very"}}


class TestConflicts:
    @pytest.mark.parametrize("specs", [
        [{"type": "lowercase"}, {"type": "starts_with", "word": "Yes"}],
        [{"type": "valid_json"}, {"type": "ends_with_question"}],
        [{"type": "valid_json"}, {"type": "sentence_count", "n": 1}],
        [{"type": "max_words", "n": 10}, {"type": "min_words", "n": 6}],
        [{"type": "must_include", "word": "Very"}, {"type": "must_exclude", "word": "very"}],
        [{"type": "max_words", "n": 2}, {"type": "sentence_count", "n": 3}],
        [{"type": "no_commas"}, {"type": "no_commas"}],
    ])
    def test_sets_that_cannot_be_met_are_refused(self, specs):
        assert conflict(specs)
        with pytest.raises(ValueError, match="cannot all be met"):
            witness(specs)

    def test_the_witness_meets_a_compatible_set(self):
        specs = [{"type": "max_words", "n": 10}, {"type": "min_words", "n": 5}, {"type": "lowercase"},
                 {"type": "must_include", "word": "Bright"}, {"type": "must_exclude", "word": "note"},
                 {"type": "sentence_count", "n": 3}, {"type": "ends_with_question"}, {"type": "no_commas"}]
        assert conflict(specs) is None
        response = witness(specs)
        assert all(check(s, response) for s in specs), response


class TestChecklistScore:
    ITEMS = [
        {"id": "lowercase", "criterion": "lowercase", "description": "d", "weight": 1.0,
         "check": {"type": "lowercase", "n": None, "word": None}},
        {"id": "max_words", "criterion": "max_words", "description": "d", "weight": 1.0,
         "check": {"type": "max_words", "n": 4, "word": None}},
        {"id": "tone", "criterion": "tone", "description": "Friendly.", "weight": 5.0, "check": None},
    ]

    def test_the_share_of_checkable_items_met(self):
        assert checklist_score(self.ITEMS, "all small") == 1.0
        assert checklist_score(self.ITEMS, "Not small") == 0.5
        assert checklist_score(self.ITEMS, "Not small and far too long") == 0.0
        assert checklist_results(self.ITEMS, "Not small") == {"lowercase": False, "max_words": True}

    def test_weights_count_and_a_met_pitfall_subtracts_clipped_at_zero(self):
        items = [{**self.ITEMS[0], "weight": 3.0}, self.ITEMS[1],
                 {"id": "shout", "weight": -2.0, "check": {"type": "must_include", "word": "hey"}}]
        assert checklist_score(items, "calm and quiet") == 1.0  # the pitfall's weight is not in the denominator
        assert checklist_score(items, "Calm and quiet") == 0.25
        assert checklist_score(items, "hey there") == pytest.approx(0.5)  # (3 + 1 - 2) / 4
        assert checklist_score(items, "Hey you there, hey") == 0.0  # 1 - 2 < 0, clipped

    def test_no_checkable_item_is_none_not_zero(self):
        assert checklist_score([self.ITEMS[2]], "anything") is None
        assert checklist_score([], "anything") is None
        assert checklist_score([{"id": "x", "check": {"type": None, "n": None, "word": None}}], "a") is None
        assert checklist_score([{"id": "p", "weight": -1.0, "check": {"type": "lowercase"}}], "a") is None
        assert checklist_results([self.ITEMS[2]], "anything") == {}

    def test_a_missing_weight_is_one_and_items_without_id_are_named_by_criterion(self):
        items = [{"criterion": "lowercase", "check": {"type": "lowercase"}},
                 {"check": {"type": "no_commas"}, "weight": None}]
        assert checklist_results(items, "a, b") == {"lowercase": True, "1": False}
        assert checklist_score(items, "a, b") == 0.5

    def test_a_bad_check_raises_naming_the_type(self):
        with pytest.raises(ValueError, match="'max_words' needs the argument 'n'"):
            checklist_score([{"id": "m", "check": {"type": "max_words"}}], "a")

    def test_only_the_answer_part_is_checked_with_the_configured_think_tag(self):
        items = [{"id": "lowercase", "check": {"type": "lowercase"}}]
        assert checklist_score(items, "<think>Upper</think>lower") == 1.0
        assert checklist_score(items, "<reason>x</reason>lower", think_close="</reason>") == 1.0
        assert checklist_results(items, "<reason>Upper</reason>lower") == {"lowercase": False}
