"""Settings under which a documented guarantee would silently not hold are refused with a config error that
names the key, the value and the fix: judging ahead's exactness. The seed's `use_unsloth` warns instead."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from grpo_llm_eval.config.load import ConfigError, validate

ROOT = Path(__file__).resolve().parents[1]


def problems_of(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate({"judge_ahead_steps": 1, **data})
    return info.value.problems


class TestJudgeAheadIsExactOrRefused:
    def test_several_iterations_per_batch_are_refused(self):
        """Old code accepted it: with num_iterations 2 the lag was 2d updates, not d, and a checkpoint between
        a batch's two updates made the resumed run sample already-queued prompts again."""
        [p] = problems_of({"trl": {"num_iterations": 2}})
        assert p.startswith("trl.num_iterations: 2") and "judge_ahead_steps: 0" in p

    def test_a_generation_batch_spanning_several_updates_is_refused(self):
        """Old code accepted steps_per_generation != accumulation steps: a generation batch then served
        several updates, so the lag and the resume point were off."""
        [p] = problems_of({"trl": {"steps_per_generation": 2}})
        assert p.startswith("trl.steps_per_generation: 2") and "accumulation steps (1)" in p
        [p] = problems_of({"trl": {"generation_batch_size": 64}})
        assert p.startswith("trl.generation_batch_size: 64")

    def test_steps_per_generation_equal_to_the_accumulation_steps_is_fine(self):
        assert validate({"accumulation_steps": 2, "trl": {"steps_per_generation": 2}, "judge_ahead_steps": 1})
        [p] = problems_of({"trl": {"gradient_accumulation_steps": 4, "steps_per_generation": 2}})
        assert "accumulation steps (4)" in p  # the trl section's value is the one TRL uses

    def test_lora_dropout_is_refused_when_our_sampling_log_probs_are_used(self):
        """Old code accepted it (and 0.05 was the default): the log-probs kept at sampling and those at
        training used different dropout masks, so the importance ratio was noise even with no lag."""
        [p] = problems_of({"lora": {"enabled": True, "dropout": 0.05}})
        assert p.startswith("lora.dropout: 0.05") and "lora.dropout: 0" in p
        assert validate({"lora": {"enabled": True}}).lora.dropout == 0.0  # the default LoRA config is fine

    def test_with_vllm_rollouts_lora_dropout_is_trls_concern_and_allowed(self):
        cfg = validate({"lora": {"enabled": True, "dropout": 0.05}, "trl": {"use_vllm": True}})
        assert cfg.lora.dropout == 0.05

    def test_vllm_without_its_importance_sampling_correction_is_refused(self):
        """Old code accepted it: with vLLM, TRL recomputes the old log-probs under the current weights (ratio 1), so
        a lagged batch trained with no off-policy correction at all."""
        [p] = problems_of({"trl": {"use_vllm": True, "vllm_importance_sampling_correction": False}})
        assert p.startswith("trl.vllm_importance_sampling_correction: false") and "judge_ahead_steps: 0" in p
        assert validate({"judge_ahead_steps": 1, "trl": {"use_vllm": True}})  # TRL's default correction: fine
        assert validate({"judge_ahead_steps": 0, "trl": {"use_vllm": True, "vllm_importance_sampling_correction": False}})

    @pytest.mark.parametrize("data", [{"judge_ahead_steps": 0}, {"judge_ahead_steps": "auto"}, {},
                                      {"teacher_weight": 0.0, "verifier_answer_weight": 1.0}])
    def test_without_a_fixed_lag_every_combination_is_allowed(self, data):
        """auto (the default) is not refused: the trainer keeps its lag at 0 there, with a warning."""
        validate({**data, "trl": {"num_iterations": 2, "steps_per_generation": 2},
                  "lora": {"enabled": True, "dropout": 0.1}})

    @pytest.mark.parametrize("value", ["sometimes", -1, True, 1.5])
    def test_a_lag_that_is_neither_auto_nor_a_count_is_refused(self, value):
        with pytest.raises(ConfigError) as info:
            validate({"judge_ahead_steps": value})
        [p] = info.value.problems
        assert p.startswith("judge_ahead_steps:")

    def test_shipped_recipes_and_example_pass(self):
        for path in [ROOT / "configs/example.yaml", *sorted((ROOT / "configs/recipes").glob("*.yaml"))]:
            validate(yaml.safe_load(path.read_text()))


class TestUnsloth:
    def test_the_seeds_example_passes_dry_run_with_one_unsloth_warning_line(self, caplog, capsys):
        """The seed's example sets use_unsloth: true and load_in_4bit: true. Old code exited 2 on it (a config
        error); a user from the seed must get one warning line naming what is used instead and why."""
        import logging

        from grpo_llm_eval import cli, models

        example = yaml.safe_load((ROOT / "configs/example.yaml").read_text())
        assert example["use_unsloth"] is True and example["load_in_4bit"] is True
        models._unsloth_warned = False
        with caplog.at_level(logging.WARNING):
            code = cli.main(["--config", str(ROOT / "configs/example.yaml"), "--dry-run"])
        assert code == 0, capsys.readouterr().err
        assert yaml.safe_load(capsys.readouterr().out)["use_unsloth"] is True
        lines = [r.getMessage() for r in caplog.records if "unsloth" in r.getMessage()]
        assert len(lines) == 1 and "\n" not in lines[0], lines
        assert "instead" in lines[0] and "transformers" in lines[0]
        assert "trl<=1.15.0" in lines[0] and "transformers<=5.17.0" in lines[0]  # today's trl 1.16 is outside it

    def test_it_warns_once_per_process(self, caplog):
        import logging

        from grpo_llm_eval import models

        models._unsloth_warned = False
        with caplog.at_level(logging.WARNING):
            validate({"use_unsloth": True})
            validate({"use_unsloth": True})
        assert sum("use_unsloth" in r.getMessage() for r in caplog.records) == 1

    def test_the_seed_key_still_loads_when_false(self, caplog):
        assert validate({"use_unsloth": False}).use_unsloth is False
        assert not [r for r in caplog.records if "unsloth" in r.getMessage()]


class TestFourBit:
    def test_a_4_bit_load_bitsandbytes_cannot_do_falls_back_to_full_precision_with_one_line(self, tiny_model, caplog):
        """The seed's example asks for load_in_4bit; where bitsandbytes is missing or broken (its CUDA build, this
        GPU) the student still loads, in full precision, after one warning line."""
        import importlib.util
        import logging

        import torch
        from transformers import BitsAndBytesConfig

        from grpo_llm_eval import models

        if importlib.util.find_spec("bitsandbytes") is not None and torch.cuda.is_available():
            pytest.skip("bitsandbytes works here: there is nothing to fall back from")
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        with caplog.at_level(logging.WARNING):
            model = models._load_model(tiny_model, {"dtype": torch.float32, "quantization_config": quant})
        assert not getattr(model, "is_loaded_in_4bit", False)
        [line] = [r.getMessage() for r in caplog.records if "load_in_4bit" in r.getMessage()]
        assert "full precision" in line and "\n" not in line


class TestTrainerRefusesWhatConfigWouldHave:
    """The same guarantees for library users who build the trainer's GRPOConfig themselves."""

    @pytest.fixture(scope="class")
    def lora_model(self, tiny_model):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.1, target_modules="all-linear"))

    def _args(self, tmp_path, **kw):
        from trl import GRPOConfig

        return GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=4, num_generations=4,
                          report_to="none", **kw)

    def test_several_iterations_a_long_generation_batch_and_dropout_are_each_named(self, tmp_path, lora_model):
        from grpo_llm_eval.training import judge_ahead

        with pytest.raises(ValueError) as info:
            judge_ahead.check_exact(self._args(tmp_path, num_iterations=2, steps_per_generation=2), lora_model)
        message = str(info.value)
        assert "num_iterations is 2" in message and "steps_per_generation (2)" in message
        assert "dropout (p = 0.1)" in message and "judge_ahead_steps: 0" in message

    def test_vllm_without_its_correction_is_named(self, tmp_path, tiny_model):
        from transformers import AutoModelForCausalLM

        from grpo_llm_eval.training import judge_ahead

        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        with pytest.raises(ValueError, match="vllm_importance_sampling_correction false"):
            judge_ahead.check_exact(self._args(tmp_path, use_vllm=True, vllm_importance_sampling_correction=False),
                                    model)
        judge_ahead.check_exact(self._args(tmp_path, use_vllm=True), model)

    def test_plain_settings_pass(self, tmp_path, tiny_model):
        from transformers import AutoModelForCausalLM

        from grpo_llm_eval.training import judge_ahead

        judge_ahead.check_exact(self._args(tmp_path), AutoModelForCausalLM.from_pretrained(tiny_model))
