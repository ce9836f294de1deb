"""End-to-end training on a tiny model against a real teacher server on loopback."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.train import TrainingAborted, train
from tests.conftest import tiny_overrides

RECORD_KEYS = {"step", "prompt", "completion", "ground_truth", "group", "scores", "feedback", "judge_status", "reward",
               "advantage"}


def run(tiny_model, tmp_path, server, **extra):
    cfg = load_config(None, tiny_overrides(tiny_model, tmp_path, openai_base_url=server.base_url, **extra))
    return cfg, train(cfg)


class TestTwoStepRun:
    def test_run_folder_holds_config_records_metrics_checkpoints_and_final(self, tiny_model, tmp_path, monkeypatch):
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret-9f3a")
        with TeacherServer(mode="scripted") as server:
            cfg, result = run(tiny_model, tmp_path, server)
        out = result.run_dir
        assert result.global_step == 2
        assert {p.name for p in out.iterdir()} >= {"config.yaml", "rollouts.jsonl", "metrics.jsonl", "checkpoint-1",
                                                     "checkpoint-2", "final"}
        assert not (out / "final.partial").exists() and not (out / "final.old").exists()
        saved = yaml.safe_load((out / "config.yaml").read_text())
        assert saved["total_steps"] == 2
        for path in out.rglob("*"):
            if path.is_file():
                assert b"sk-test-secret-9f3a" not in path.read_bytes(), path
        rows = read_jsonl(out / "rollouts.jsonl")
        per_step = cfg.prompts_per_step * cfg.num_return_sequences
        assert len(rows) == 2 * per_step and [r["step"] for r in rows] == [1] * per_step + [2] * per_step
        assert all(RECORD_KEYS <= set(r) for r in rows)
        assert [r["group"] for r in rows[:per_step]] == [i // cfg.num_return_sequences for i in range(per_step)]
        assert all(r["judge_status"] == "ok" and r["reward"] is not None for r in rows)
        assert all(set(r["scores"]) == {"thought_process", "answer", "format"} for r in rows)
        # one group's completions share their prompt and ground truth
        assert len({(r["ground_truth"], json.dumps(r["prompt"])) for r in rows[: cfg.num_return_sequences]}) == 1
        metrics = read_jsonl(out / "metrics.jsonl")
        logged = [m for m in metrics if "loss" in m]
        assert [m["step"] for m in logged] == [1, 2]
        for key in ("reward", "reward_std", "judge/failure_rate", "criteria/answer/mean", "time/judge_s",
                    "time/generate_s", "step_time"):
            assert key in logged[0], key

    def test_final_model_loads_with_from_pretrained(self, tiny_model, tmp_path):
        from transformers import AutoModelForCausalLM

        with TeacherServer(mode="scripted") as server:
            _, result = run(tiny_model, tmp_path, server, total_steps=1)
        model = AutoModelForCausalLM.from_pretrained(result.final_dir)
        assert model.config.num_hidden_layers == 2

    def test_lora_run_saves_the_adapter_and_a_merged_copy(self, tiny_model, tmp_path):
        from transformers import AutoModelForCausalLM

        with TeacherServer(mode="scripted") as server:
            _, result = run(tiny_model, tmp_path, server, total_steps=1,
                            lora={"enabled": True, "r": 4, "alpha": 8, "merge_on_save": True})
        assert (result.final_dir / "adapter_config.json").is_file()
        merged = AutoModelForCausalLM.from_pretrained(result.final_dir / "merged")
        assert not hasattr(merged, "peft_config")


class TestFaultyTeacher:
    def test_thirty_percent_faults_are_retried_then_masked_and_no_nan_reaches_the_loss(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted", fault_rate=0.3, seed=1, hang_s=3, retry_after_s=0) as server:
            _, result = run(tiny_model, tmp_path, server, total_steps=3, teacher_timeout_s=1, teacher_max_retries=1)
            stats = server.stats()
        rows = read_jsonl(result.run_dir / "rollouts.jsonl")
        assert result.global_step == 3 and len(rows) == 3 * 8
        assert sum(stats["faults"].values()) > 0
        for r in rows:
            if r["judge_status"] == "ok":
                assert r["reward"] is not None
            else:  # masked, never a made-up score
                assert r["reward"] is None and r["advantage"] is None and all(v is None for v in r["scores"].values())
        for m in read_jsonl(result.run_dir / "metrics.jsonl"):
            if "loss" in m:
                assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])

    def test_run_stops_with_a_checkpoint_after_consecutive_failed_steps(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted", fault_rate=1.0, faults=("500",)) as server:
            with pytest.raises(TrainingAborted, match="every grade failed for 2 steps"):
                run(tiny_model, tmp_path, server, total_steps=6, teacher_max_retries=0,
                    max_consecutive_failed_steps=2, save_steps=100)
        out = tmp_path / "run"
        assert (out / "checkpoint-2").is_dir()
        rows = read_jsonl(out / "rollouts.jsonl")
        assert {r["judge_status"] for r in rows} == {"http_error"} and all(r["reward"] is None for r in rows)
