"""`grpo_llm_eval evaluate`: models of a real tiny run graded by a real teacher server; the summary's numbers
checked against the rollout file, by the same functions with the same seed and by independent arithmetic."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from collections import defaultdict

import pytest

from grpo_llm_eval.cli import main
from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.evaluation import stats
from grpo_llm_eval.evaluation.evaluate import (
    PROPORTIONS,
    evaluate,
    generate_responses,
    load_eval_model,
    resolve_eval_model,
    summarize,
)
from grpo_llm_eval.models import ModelError
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.train import train
from tests.conftest import CACHE_DIR, tiny_overrides

CRITERIA = ("thought_process", "answer", "format")
METRICS = ("teacher_reward", *(f"criteria/{c}" for c in CRITERIA), "reward", *PROPORTIONS)
ROW_KEYS = {"model", "prompt_index", "sample_index", "question", "ground_truth", "response", "scores", "feedback",
            "judge_status", "teacher_reward", "answer_correct", "format_correct", "reward"}
LIMIT = 8
Z95 = 1.959963984540054


EVAL_LIMIT = 3


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """(run folder, teacher server stats) of a real 2-step run of the tiny model with eval_steps=1:
    checkpoint-1, checkpoint-2 and final/."""
    with TeacherServer(mode="scripted") as server:
        cfg = load_config(None, tiny_overrides(tiny_model, tmp_path_factory.mktemp("eval-train"),
                                               openai_base_url=server.base_url, eval_steps=1, eval_limit=EVAL_LIMIT))
        return train(cfg).run_dir, server.stats()


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained[0]


@pytest.fixture(scope="module")
def faulty_teacher():
    """A scripted teacher that answers garbage a third of the time: grades fail on some prompts only."""
    with TeacherServer(mode="scripted", fault_rate=0.35, faults=("garbage",), seed=7) as server:
        yield server


def overrides(tiny_model, out, server) -> list[str]:
    return tiny_overrides(tiny_model, out, openai_base_url=server.base_url, teacher_max_retries=0)


@pytest.fixture(scope="module")
def greedy_eval(run_dir, tiny_model, faulty_teacher, tmp_path_factory):
    """The CLI evaluating checkpoint-1 and run:DIR, one greedy response per prompt: (output folder, stdout)."""
    out = tmp_path_factory.mktemp("eval-greedy")
    argv = ["evaluate", *sum((["--set", o] for o in overrides(tiny_model, out, faulty_teacher)), []),
            "--model", str(run_dir / "checkpoint-1"), "--model", f"run:{run_dir}", "--limit", str(LIMIT),
            "--output", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(argv) == 0
    return out, stdout.getvalue()


@pytest.fixture(scope="module")
def sampled_eval(run_dir, tiny_model, faulty_teacher, tmp_path_factory):
    """The library call with 2 sampled responses per prompt (the cluster bootstrap path)."""
    out = tmp_path_factory.mktemp("eval-sampled")
    cfg = load_config(None, overrides(tiny_model, out, faulty_teacher))
    evaluate(cfg, [str(run_dir / "checkpoint-1"), f"run:{run_dir}"], out, limit=LIMIT, samples=2)
    return out, cfg


def load(out):
    return json.loads((out / "eval_summary.json").read_text()), read_jsonl(out / "eval_rollouts.jsonl")


# ---- independent arithmetic (no project code) ----------------------------------------------------------------


def value_of(row: dict, metric: str) -> float | None:
    ok = row["judge_status"] == "ok"
    if metric == "answer_accuracy":
        return None if row["answer_correct"] is None else (1.0 if row["answer_correct"] else 0.0)
    if metric == "format_rate":
        return 1.0 if row["format_correct"] else 0.0
    if metric == "judge_failure_rate":
        return 0.0 if ok else 1.0
    if metric.startswith("criteria/"):
        return row["scores"][metric[len("criteria/"):]] if ok else None
    return row[metric]


def per_prompt(rows: list[dict], model: str, metric: str) -> list[list[float | None]]:
    by = defaultdict(list)
    for r in rows:
        if r["model"] == model:
            by[r["prompt_index"]].append(value_of(r, metric))
    return [by[p] for p in sorted(by)]


def plain_mean(clusters) -> float | None:
    flat = [v for c in clusters for v in c if v is not None]
    return sum(flat) / len(flat) if flat else None


def wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 / (1 + Z95**2 / n) * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2))
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_p(diffs: list[float]) -> float:
    up, down = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = up + down
    return 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(min(up, down) + 1)) / 2**n)


# ---- tests ---------------------------------------------------------------------------------------------------


class TestEvaluationDuringTraining:
    def test_eval_metrics_are_logged_at_every_eval_step(self, run_dir):
        logged = [m for m in read_jsonl(run_dir / "metrics.jsonl") if "eval/answer_accuracy" in m]
        assert [m["step"] for m in logged] == [1, 2]
        for m in logged:
            assert 0 <= m["eval/answer_accuracy"] <= 1 and 0 <= m["eval/format_rate"] <= 1
            assert m["eval/judge_failure_rate"] == 0 and m["eval/teacher_reward"] is not None
            assert "loss" in m  # in the same log row as the step's training metrics

    def test_eval_answers_are_graded_by_the_run_teacher(self, trained):
        run, server_stats = trained
        training_calls = sum(1 for r in read_jsonl(run / "rollouts.jsonl") if not r["cached"])
        assert server_stats["chat_requests"] > training_calls  # the rest graded the eval answers


class TestGreedyEvaluation:
    def test_rollout_file_has_one_row_per_model_and_prompt(self, greedy_eval, run_dir):
        summary, rows = load(greedy_eval[0])
        models = [str(run_dir / "checkpoint-1"), f"run:{run_dir}"]
        assert len(rows) == 2 * LIMIT and all(ROW_KEYS <= set(r) for r in rows)
        assert [(r["model"], r["prompt_index"], r["sample_index"]) for r in rows] == \
            [(m, p, 0) for m in models for p in range(LIMIT)]
        assert [m["model"] for m in summary["models"]] == models
        assert (greedy_eval[0] / "judgements.sqlite").is_file()

    def test_failed_grades_are_counted_and_never_scored(self, greedy_eval):
        _, rows = load(greedy_eval[0])
        failed = [r for r in rows if r["judge_status"] != "ok"]
        assert 0 < len(failed) < len(rows)  # the faulty teacher failed on some prompts only
        assert all(r["teacher_reward"] is None and r["reward"] is None for r in failed)
        assert all(r["teacher_reward"] is not None for r in rows if r["judge_status"] == "ok")

    def test_summary_schema(self, greedy_eval):
        summary, _ = load(greedy_eval[0])
        assert summary["samples"] == 1 and summary["n_prompts"] == LIMIT and summary["split"] == "test"
        assert summary["confidence"] == 0.95 and summary["seed"] == 0
        for model in summary["models"]:
            assert model["n"] == LIMIT and set(model["metrics"]) == set(METRICS)
            for entry in model["metrics"].values():
                assert {"mean", "ci_low", "ci_high", "n", "n_prompts", "method"} <= set(entry)
                if entry["mean"] is not None:
                    assert entry["ci_low"] <= entry["mean"] <= entry["ci_high"]
        [comparison] = summary["comparisons"]
        assert comparison["baseline"] == summary["models"][0]["model"]
        assert comparison["model"] == summary["models"][1]["model"]
        assert set(comparison["metrics"]) == set(METRICS)

    def test_means_match_plain_arithmetic_on_the_rollout_file(self, greedy_eval):
        summary, rows = load(greedy_eval[0])
        for model in summary["models"]:
            for metric, entry in model["metrics"].items():
                clusters = per_prompt(rows, model["model"], metric)
                assert entry["mean"] == pytest.approx(plain_mean(clusters)), metric
                assert entry["n"] == sum(v is not None for c in clusters for v in c)

    def test_proportions_use_wilson_by_formula(self, greedy_eval):
        summary, rows = load(greedy_eval[0])
        for model in summary["models"]:
            for metric in PROPORTIONS:
                flat = [v for c in per_prompt(rows, model["model"], metric) for v in c if v is not None]
                entry = model["metrics"][metric]
                assert entry["method"] == "wilson"
                assert (entry["ci_low"], entry["ci_high"]) == pytest.approx(wilson(int(sum(flat)), len(flat)))

    def test_score_intervals_are_the_seeded_bootstrap_over_prompts(self, greedy_eval):
        summary, rows = load(greedy_eval[0])
        for model in summary["models"]:
            for metric in ("teacher_reward", "reward", "criteria/answer"):
                entry = model["metrics"][metric]
                expected = stats.cluster_bootstrap_ci(per_prompt(rows, model["model"], metric), seed=summary["seed"])
                assert entry["method"] == "bootstrap-percentile"
                assert (entry["ci_low"], entry["ci_high"]) == pytest.approx(expected)

    def test_paired_comparison_on_common_prompts(self, greedy_eval):
        summary, rows = load(greedy_eval[0])
        [comparison] = summary["comparisons"]
        for metric, entry in comparison["metrics"].items():
            base = per_prompt(rows, comparison["baseline"], metric)
            other = per_prompt(rows, comparison["model"], metric)
            diffs = [plain_mean([b]) - plain_mean([a]) for a, b in zip(base, other, strict=True)
                     if plain_mean([a]) is not None and plain_mean([b]) is not None]
            assert entry["n_prompts"] == len(diffs)
            assert entry["diff"] == pytest.approx(sum(diffs) / len(diffs)), metric
            expected = stats.paired_bootstrap(diffs, seed=summary["seed"])
            assert (entry["ci_low"], entry["ci_high"]) == pytest.approx((expected.low, expected.high))
            if metric in PROPORTIONS:
                assert entry["test"] == "exact-sign-test" and entry["p_value"] == pytest.approx(sign_p(diffs))
            else:
                assert entry["test"] == "paired-bootstrap" and entry["p_value"] == pytest.approx(expected.p_value)

    def test_summary_is_reproducible_from_the_rollout_file(self, greedy_eval):
        summary, rows = load(greedy_eval[0])
        again = summarize(rows, [m["model"] for m in summary["models"]], list(CRITERIA), 1, summary["seed"])
        assert again["models"] == summary["models"] and again["comparisons"] == summary["comparisons"]

    def test_cli_prints_a_comparison_table(self, greedy_eval, run_dir):
        table = greedy_eval[1]
        assert table.splitlines()[0].split() == ["metric", str(run_dir / "checkpoint-1"), f"run:{run_dir}"]
        assert "judge_failure_rate" in table and "(paired over prompts)" in table and "p=" in table


class TestSampledEvaluation:
    def test_k_samples_per_prompt_are_drawn_and_differ(self, sampled_eval):
        summary, rows = load(sampled_eval[0])
        assert summary["samples"] == 2 and len(rows) == 2 * LIMIT * 2
        first = [r for r in rows if r["model"] == summary["models"][0]["model"]]
        assert [r["sample_index"] for r in first[:4]] == [0, 1, 0, 1]
        assert any(a["response"] != b["response"] for a, b in zip(first[::2], first[1::2], strict=True))

    def test_every_interval_is_a_cluster_bootstrap_over_prompts(self, sampled_eval):
        summary, rows = load(sampled_eval[0])
        for model in summary["models"]:
            for metric, entry in model["metrics"].items():
                clusters = per_prompt(rows, model["model"], metric)
                assert entry["method"] == "cluster-bootstrap-percentile"
                assert entry["mean"] == pytest.approx(plain_mean(clusters))
                expected = stats.cluster_bootstrap_ci(clusters, seed=summary["seed"])
                assert (entry["ci_low"], entry["ci_high"]) == pytest.approx(expected), metric


@pytest.fixture(scope="module")
def varied_model(tmp_path_factory, tiny_model):
    """A tiny model whose greedy answers depend on the prompt (untied, large init), unlike the shared fixture's."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("varied")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False, initializer_range=0.5)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


CONVERSATIONS = [[{"role": "user", "content": q}] for q in
                 ("What is 2 + 3?", "Compute 17 * 23, then explain every step in detail.", "Hi",
                  "What is the derivative of x^2 with respect to x?")]


class TestGeneration:
    def test_left_padded_batches_give_the_same_greedy_answers_as_one_by_one(self, varied_model):
        model, tok = load_eval_model(resolve_eval_model(varied_model, CACHE_DIR))
        batched = generate_responses(model, tok, CONVERSATIONS, max_new_tokens=10, max_prompt_tokens=512, batch_size=4)
        single = generate_responses(model, tok, CONVERSATIONS, max_new_tokens=10, max_prompt_tokens=512, batch_size=1)
        assert batched == single
        assert len({r[0] for r in batched}) == len(CONVERSATIONS)  # the answers do depend on the prompt

    def test_sampling_is_seeded(self, varied_model):
        model, tok = load_eval_model(resolve_eval_model(varied_model, CACHE_DIR))
        kw = dict(max_new_tokens=8, max_prompt_tokens=512, samples=3, temperature=1.0, top_p=1.0, top_k=0)
        first = generate_responses(model, tok, CONVERSATIONS, seed=1, **kw)
        assert first == generate_responses(model, tok, CONVERSATIONS, seed=1, **kw)
        assert first != generate_responses(model, tok, CONVERSATIONS, seed=2, **kw)
        assert all(len(r) == 3 for r in first) and len(set(first[0])) > 1


class TestModelSpecs:
    def test_a_lora_adapter_is_applied_on_the_base_its_config_names(self, varied_model, tmp_path):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(varied_model)
        peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=8, target_modules="all-linear",
                                                     init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / "adapter")
        resolved = resolve_eval_model(str(tmp_path / "adapter"), CACHE_DIR)
        assert resolved.adapter == str(tmp_path / "adapter") and resolved.path == varied_model
        loaded, _ = load_eval_model(resolved)
        plain, _ = load_eval_model(resolve_eval_model(varied_model, CACHE_DIR))
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            expected = peft_model.eval()(ids).logits
            assert torch.allclose(loaded(ids).logits, expected, atol=1e-4)
            assert not torch.allclose(plain(ids).logits, expected, atol=1e-2)

    def test_run_dir_means_its_final_model_and_prefers_a_merged_copy(self, tmp_path, varied_model):
        run = tmp_path / "run"
        shutil.copytree(varied_model, run / "final")
        assert resolve_eval_model(f"run:{run}", CACHE_DIR).path == str(run / "final")
        shutil.copytree(varied_model, run / "final" / "merged")
        assert resolve_eval_model(f"run:{run}", CACHE_DIR).path == str(run / "final" / "merged")

    def test_a_run_without_final_names_a_checkpoint_to_use(self, tmp_path):
        (tmp_path / "run" / "checkpoint-3").mkdir(parents=True)
        with pytest.raises(ModelError, match=r"no final/ model.*checkpoint-3"):
            resolve_eval_model(f"run:{tmp_path / 'run'}", CACHE_DIR)
        with pytest.raises(ModelError, match="no run folder"):
            resolve_eval_model(f"run:{tmp_path / 'missing'}", CACHE_DIR)

    def test_a_folder_without_a_model_is_a_clear_error(self, tmp_path):
        with pytest.raises(ModelError, match="no config.json"):
            resolve_eval_model(str(tmp_path), CACHE_DIR)

    def test_cli_reports_a_bad_model_in_one_line_and_exits_1(self, tmp_path, capsys, tiny_model):
        with TeacherServer(mode="scripted") as server:
            code = main(["evaluate", *sum((["--set", o] for o in overrides(tiny_model, tmp_path, server)), []),
                         "--model", f"run:{tmp_path / 'nope'}", "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and err[-1].startswith("error: run:") and "no run folder" in err[-1]
