"""Config loading, overrides and validation: every bad-config case names the key, the value and the fix."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from grpo_llm_eval.config import SEED_EVALUATION_PROMPT, Config
from grpo_llm_eval.config.doc import END, START, config_table
from grpo_llm_eval.config.load import (
    ConfigError,
    apply_overrides,
    default_config_text,
    dump_yaml,
    load_config,
    validate,
)

ROOT = Path(__file__).resolve().parents[1]
SEED_KEYS = """openai_base_url student_model_name teacher_model_name dataset_name dataset_question_column
dataset_answer_column output_dir save_steps learning_rate max_new_tokens max_feedback_new_tokens num_return_sequences
accumulation_steps temperature top_p top_k repetition_penalty max_seq_length cache_dir warmup_steps total_steps seed
max_grad_norm grpo_beta sft_beta thought_process_weight answer_weight format_weight use_unsloth load_in_4bit
system_prompt evaluation_prompt think_open_string think_close_string""".split()


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(data)
    return info.value.problems


class TestSeedCompatibility:
    def test_every_seed_key_is_a_config_field(self):
        fields = set(Config.__dataclass_fields__)
        assert [k for k in SEED_KEYS if k not in fields] == []

    def test_example_yaml_carries_every_seed_key_and_validates(self):
        data = yaml.safe_load((ROOT / "configs/example.yaml").read_text())
        assert [k for k in SEED_KEYS if k not in data] == []
        cfg = validate(data)
        assert cfg.evaluation_prompt == SEED_EVALUATION_PROMPT
        assert cfg.learning_rate == 5e-7 and cfg.lora.enabled

    def test_offline_yaml_in_configs_is_the_embedded_default(self):
        assert (ROOT / "configs/offline.yaml").read_text() == default_config_text()
        validate(yaml.safe_load(default_config_text()))

    @pytest.mark.parametrize("recipe", sorted((ROOT / "configs/recipes").glob("*.yaml")), ids=lambda p: p.name)
    def test_every_recipe_validates_and_trains_a_lora_adapter_with_vllm_rollouts(self, recipe):
        cfg = validate(yaml.safe_load(recipe.read_text()))
        assert cfg.lora.enabled and cfg.trl.get("use_vllm") is True and cfg.teacher_backend == "openai"

    def test_float_written_as_5e_minus_7_is_read_as_a_number(self):
        # PyYAML reads 5e-7 (no dot) as a string; users write it that way.
        assert validate({"learning_rate": "5e-7"}).learning_rate == pytest.approx(5e-7)


class TestBadConfig:
    def test_unknown_key_suggests_the_nearest_valid_one(self):
        [p] = problems_of({"num_return_sequence": 4})
        assert "num_return_sequence" in p and "did you mean 'num_return_sequences'" in p

    def test_wrong_type_names_key_value_and_expected_type(self):
        [p] = problems_of({"total_steps": "many"})
        assert p.startswith("total_steps:") and "'many'" in p and "int" in p

    def test_bool_is_not_accepted_as_a_number(self):
        [p] = problems_of({"save_steps": True})
        assert p.startswith("save_steps:")

    def test_group_size_below_two_is_out_of_range(self):
        [p] = problems_of({"num_return_sequences": 1})
        assert "num_return_sequences" in p and "minimum 2" in p and ">= 2" in p

    def test_top_p_above_one_is_out_of_range(self):
        [p] = problems_of({"top_p": 1.5})
        assert "top_p" in p and "maximum" in p

    def test_evaluation_prompt_without_student_response_is_rejected(self):
        [p] = problems_of({"evaluation_prompt": "Grade this: {question}"})
        assert p.startswith("evaluation_prompt:") and "{student_response}" in p

    def test_sft_on_feedback_needs_the_local_teacher_to_write_an_explanation(self):
        forced = {"teacher_backend": "local", "teacher_logprob_scores": True, "max_feedback_new_tokens": 0}
        [p] = problems_of({**forced, "sft_beta": 0.1})
        assert p.startswith("max_feedback_new_tokens: 0") and "sft_target: best_response" in p
        assert validate({**forced, "sft_beta": 0.1, "sft_target": "best_response"}).max_feedback_new_tokens == 0

    def test_micro_batches_must_slice_the_update_into_equal_parts(self):
        [p] = problems_of({"prompts_per_step": 4, "num_return_sequences": 8, "micro_batch_size": 5})
        assert p.startswith("micro_batch_size: 5 does not divide") and "32" in p
        [p] = problems_of({"micro_batch_size": 8, "trl": {"loss_type": "bnpo"}})
        assert "loss_type: bnpo" in p
        [p] = problems_of({"micro_batch_size": 8, "trl": {"gradient_accumulation_steps": 2}})
        assert "trl.gradient_accumulation_steps" in p
        assert validate({"prompts_per_step": 1, "num_return_sequences": 4, "micro_batch_size": 8}).micro_batch_size == 8

    def test_bad_choice_lists_the_choices(self):
        [p] = problems_of({"teacher_backend": "grpc"})
        assert "'grpc'" in p and "openai" in p and "local" in p

    def test_every_problem_is_reported_at_once(self):
        assert len(problems_of({"total_steps": 0, "top_k": -1, "bogus": 1})) == 3

    def test_unknown_trl_field_suggests_the_nearest(self):
        [p] = problems_of({"trl": {"loss_typ": "dr_grpo"}})
        assert "trl.loss_typ" in p and "trl.loss_type" in p

    def test_valid_trl_field_passes(self):
        assert validate({"trl": {"loss_type": "dr_grpo"}}).trl == {"loss_type": "dr_grpo"}

    def test_unknown_lora_key_is_named_with_its_section(self):
        [p] = problems_of({"lora": {"rank": 8}})
        assert p.startswith("lora.rank:")

    def test_criteria_need_identifier_names_and_min_below_max(self):
        probs = problems_of({"criteria": [{"name": "bad name", "weight": 1}, {"name": "x", "min": 5, "max": 1}]})
        assert any("criteria[0].name" in p for p in probs) and any("criteria[1]" in p for p in probs)

    def test_a_sequence_limit_that_leaves_no_room_for_a_prompt_is_rejected(self):
        """Would have caught: with max_seq_length <= max_new_tokens training applied no prompt limit at all
        (the filter skipped itself), so prompts of any length went to the trainer."""
        [problem] = problems_of({"max_seq_length": 256, "max_new_tokens": 256})
        assert problem.startswith("max_seq_length: 256") and "max_new_tokens 256" in problem and "raise" in problem
        validate({"max_seq_length": 257, "max_new_tokens": 256})

    def test_max_seq_length_help_says_what_training_does_with_long_prompts(self):
        """Would have caught: the help said long prompts are cut from the left; training drops them."""
        text = Config.__dataclass_fields__["max_seq_length"].metadata["help"]
        assert "training skips" in text and "max_seq_length - max_new_tokens" in text

    def test_a_grade_limit_no_grade_fits_in_is_rejected_where_grades_are_decoded(self):
        """Would have caught: the offline default's max_feedback_new_tokens 8 (right for the local forced-key
        scorer) carried over to the openai backend, and every grade was cut off mid-JSON."""
        offline = yaml.safe_load(default_config_text())
        served = {**offline, "teacher_backend": "openai", "openai_base_url": "http://127.0.0.1:8/v1",
                  "teacher_structured_output": True}
        [problem] = problems_of(served)
        assert problem.startswith("max_feedback_new_tokens: 0") and "openai" in problem and "512" in problem
        [problem] = problems_of({**offline, "teacher_logprob_scores": False})  # local, decoding its grades
        assert problem.startswith("max_feedback_new_tokens: 0") and "local" in problem
        assert validate(offline).max_feedback_new_tokens == 0  # forced keys: only an explanation would be decoded
        unreadable = [{"name": n, "weight": 1.0, "description": "?", "min": 0, "max": 0.5}
                      for n in ("thought_process", "answer", "format")]
        [problem] = problems_of({**offline, "criteria": unreadable})  # no forced keys: grammar decoding
        assert problem.startswith("max_feedback_new_tokens: 0")
        validate({**served, "max_feedback_new_tokens": 256})

    def test_all_reward_weights_zero_is_rejected(self):
        [p] = problems_of({"teacher_weight": 0, "verifier_answer_weight": 0, "verifier_format_weight": 0})
        assert "nothing is rewarded" in p


class TestOverrides:
    def test_values_are_parsed_as_yaml(self):
        out = apply_overrides({}, ["total_steps=2", "lora.enabled=true", "system_prompt=hello world"])
        assert out == {"total_steps": 2, "lora": {"enabled": True}, "system_prompt": "hello world"}

    def test_dotted_key_reaches_the_trl_section(self):
        cfg = load_config(None, ["trl.loss_type=dr_grpo", "total_steps=3"])
        assert cfg.trl["loss_type"] == "dr_grpo" and cfg.total_steps == 3

    def test_missing_equals_sign_is_an_error(self):
        with pytest.raises(ConfigError, match="KEY=VALUE"):
            apply_overrides({}, ["total_steps"])


class TestRedaction:
    def test_credentials_in_the_base_url_are_redacted(self):
        cfg = validate({"openai_base_url": "https://user:s3cr3t@example.test/v1"})
        text = dump_yaml(cfg)
        assert "s3cr3t" not in text and "example.test" in text


class TestCli:
    def run(self, *args, env=None):
        return subprocess.run([sys.executable, "-m", "grpo_llm_eval.cli", *args], capture_output=True, text=True,
                              timeout=120, env=env)

    def test_dry_run_prints_the_resolved_config_and_exits_zero(self):
        res = self.run("--dry-run", "--set", "total_steps=2")
        assert res.returncode == 0, res.stderr
        assert yaml.safe_load(res.stdout)["total_steps"] == 2

    def test_example_config_dry_run_works_offline(self):
        res = self.run("--config", str(ROOT / "configs/example.yaml"), "--dry-run")
        assert res.returncode == 0, res.stderr
        assert "mkurman/Qwen2.5-14B-DeepSeek-R1-1M" in res.stdout

    def test_bad_config_exits_2_with_one_line_per_problem_and_no_traceback(self, tmp_path):
        bad = tmp_path / "bad.yaml"
        bad.write_text("num_return_sequences: 1\nlerning_rate: 0.1\n")
        res = self.run("--config", str(bad), "--dry-run")
        assert res.returncode == 2
        lines = [line for line in res.stderr.splitlines() if line.startswith("config error:")]
        assert len(lines) == 2 and "Traceback" not in res.stderr

    def test_missing_config_file_is_a_clear_error(self, tmp_path):
        res = self.run("--config", str(tmp_path / "nope.yaml"), "--dry-run")
        assert res.returncode == 2 and "no such file" in res.stderr

    def test_invalid_yaml_names_the_line(self, tmp_path):
        bad = tmp_path / "bad.yaml"
        bad.write_text("total_steps: 2\n  oops: [\n")
        res = self.run("--config", str(bad), "--dry-run")
        assert res.returncode == 2 and "invalid YAML at line" in res.stderr


class TestReadmeTable:
    def test_readme_configuration_table_matches_the_dataclasses(self):
        text = (ROOT / "README.md").read_text()
        block = text.split(START, 1)[1].split(END, 1)[0].strip()
        assert block == config_table(), "README drifted: run `python -m grpo_llm_eval.config.doc README.md`"


class TestScalingDoc:
    def test_the_step_shape_matches_the_default_judge_ahead(self):
        """Would have caught: docs/scaling.md said generation, judging and update never overlap, while the
        default judge_ahead_steps (then 1, now auto) grades each batch during the next update and sampling."""
        text = (ROOT / "docs/scaling.md").read_text()
        start = text.index("## The shape of one step")
        section = text[start: text.index("\n## ", start + 1)]
        assert f"`judge_ahead_steps: {Config().judge_ahead_steps}` (the library default)" in section
        for paragraph in re.split(r"\n\n|\n- ", section):
            if "do not overlap" in paragraph:
                assert "`judge_ahead_steps: 0`" in paragraph, paragraph



class TestMicroBatches:
    def test_an_update_in_micro_batches_keeps_its_generation_batch_and_its_update_count(self, tmp_path):
        """micro_batch_size slices the update through TRL's accumulation: same completions generated per update."""
        from grpo_llm_eval.training.train import grpo_args

        whole = grpo_args(load_config(None, ["micro_batch_size=0"]), tmp_path)
        sliced = grpo_args(load_config(None), tmp_path)  # the offline default: 8 at a time
        assert (whole.per_device_train_batch_size, whole.gradient_accumulation_steps) == (32, 1)
        assert (sliced.per_device_train_batch_size, sliced.gradient_accumulation_steps) == (8, 4)
        for args in (whole, sliced):
            assert args.per_device_train_batch_size * args.steps_per_generation == 32  # TRL's generation batch
            assert args.steps_per_generation == args.gradient_accumulation_steps  # one update per generation batch
        twice = grpo_args(load_config(None, ["accumulation_steps=2"]), tmp_path)
        assert (twice.per_device_train_batch_size, twice.gradient_accumulation_steps) == (8, 8)
