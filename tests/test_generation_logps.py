"""Sampling log-probs recorded during generation equal the forward pass judging ahead used to run for them."""

from __future__ import annotations

import pytest
import torch

from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.training import generation_logps, judge_ahead
from tests.conftest import tiny_overrides

# fp32 on CPU; incremental decoding with a KV cache and one full forward differ only in summation order.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def build(tiny_model, tmp_path, **sampling):
    from transformers import AutoTokenizer

    from grpo_llm_eval import data
    from grpo_llm_eval.training.train import grpo_args
    from grpo_llm_eval.training.trainer import TeacherGRPOTrainer

    cfg = load_config(None, tiny_overrides(tiny_model, tmp_path, max_new_tokens=12))
    dataset = data.build_prompts(data.load_rows(cfg, "train").dataset, cfg)
    args = grpo_args(cfg, tmp_path / "t")
    for key, value in sampling.items():
        setattr(args, key, value)
    trainer = TeacherGRPOTrainer(model=tiny_model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                                 args=args, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(tiny_model))
    prompts = [dataset[i]["prompt"] for i in range(2) for _ in range(cfg.num_return_sequences)]
    return trainer, prompts


def recorded_and_forward(trainer, prompts):
    torch.manual_seed(0)
    with generation_logps.recording(trainer) as recorder:
        generated = trainer._generate(prompts)
    width = judge_ahead.padded_width(generated[1], trainer.pad_to_multiple_of)
    return generated, recorder.result(generated[1], width), judge_ahead.sampling_logps(trainer, generated[0], generated[1])


@pytest.mark.parametrize("cache", [None, "static"])
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 0, 0.5)])
def test_recorded_log_probs_match_a_forward_pass(tiny_model, tmp_path, cache, temperature, top_k, top_p):
    """Top-k and top-p shape the sampling but not TRL's log-probs (its head sees the raw logits / temperature):
    a recorder that read the warped scores would give -inf or renormalised values here."""
    trainer, prompts = build(tiny_model, tmp_path, temperature=temperature, top_k=top_k, top_p=top_p,
                             cache_implementation=cache)
    assert generation_logps.unsupported(trainer) is None
    generated, got, want = recorded_and_forward(trainer, prompts)
    assert got is not None and got.shape == want.shape
    lengths = [len(c) for c in generated[1]]
    assert max(lengths) > 1
    mask = torch.zeros_like(want, dtype=torch.bool)
    for row, n in enumerate(lengths):
        mask[row, :n] = True
    torch.testing.assert_close(got[mask], want[mask], **TOLERANCE)
    assert torch.all(got[~mask] == 0)
    if top_k or top_p < 1:  # the warped distribution would have put more mass on each sampled token
        assert torch.all(got[mask] <= 0) and torch.isfinite(got[mask]).all()


def test_two_generate_calls_in_one_recording_fall_back(tiny_model, tmp_path):
    """A recording it cannot vouch for (here: two generate calls, as tool loops do) is refused, not guessed."""
    trainer, prompts = build(tiny_model, tmp_path)
    with generation_logps.recording(trainer) as recorder:
        trainer._generate(prompts)
        generated = trainer._generate(prompts)
    assert recorder.result(generated[1], judge_ahead.padded_width(generated[1], None)) is None
    assert "second prefill" in recorder.problem


def test_the_hook_is_removed_after_generation(tiny_model, tmp_path):
    trainer, prompts = build(tiny_model, tmp_path)
    model = generation_logps.generating_model(trainer)
    before = len(model._forward_hooks)
    with generation_logps.recording(trainer):
        assert len(model._forward_hooks) == before + 1
    assert len(model._forward_hooks) == before


def test_a_hook_that_never_fired_is_a_fallback_with_a_reason(tiny_model, tmp_path, caplog):
    """Old code returned None with no problem set, so the trainer logged "recorded from generation" while it
    ran the forward pass (here the batch comes back from the replay slot: no generation, no forward)."""
    trainer, prompts = build(tiny_model, tmp_path)
    generated = trainer._generate(prompts)
    trainer._replay = generated
    try:
        with generation_logps.recording(trainer) as recorder:
            trainer._generate(prompts)
    finally:
        trainer._replay = None
    assert recorder.result(generated[1], judge_ahead.padded_width(generated[1], None)) is None
    assert "never fired" in recorder.problem
    with caplog.at_level("INFO", logger="grpo_llm_eval.training.trainer"):
        trainer._log_logps_source(generation_logps.agree_fallback(trainer.accelerator, recorder.problem))
    assert "recorded from a forward pass (the forward hook never fired" in caplog.text
    assert "recorded from generation" not in caplog.text


def test_mean_abs_difference_counts_completion_tokens_only(tiny_model, tmp_path):
    trainer, prompts = build(tiny_model, tmp_path)
    generated, recorded, forward = recorded_and_forward(trainer, prompts)
    assert generation_logps.mean_abs_difference(recorded, forward, generated[1]) < 1e-4
    shifted = recorded.clone() + 0.5  # padding shifted too: it must not count
    assert generation_logps.mean_abs_difference(shifted, forward, generated[1]) == pytest.approx(0.5, abs=1e-4)
