"""Shared fixtures: a tiny random-init Llama with the bundled SmolLM2 tokenizer (fast CPU training), and
config helpers. Nothing here touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from grpo_llm_eval.config import SEED_EVALUATION_PROMPT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: on a shared 2-core machine two torch threads made tiny steps several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

CACHE_DIR = os.environ.get("GRPO_TEST_CACHE", str(Path.home() / ".cache" / "grpo_llm_eval"))


def build_tiny_model(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) sharing the bundled SmolLM2 tokenizer and chat template, saved at PATH."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grpo_llm_eval.models import convert_bundled

    bundled = convert_bundled("smollm2-135m-instruct", CACHE_DIR)
    tok = AutoTokenizer.from_pretrained(bundled)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of the tiny model (built once per test session)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


def judge_once(teacher, requests):
    """Grade REQUESTS with TEACHER in a fresh event loop, then close the teacher."""
    import asyncio

    async def go():
        try:
            return await teacher.judge(requests)
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def tiny_overrides(model: str, out: Path, **extra) -> list[str]:
    """--set style overrides for a fast run of the tiny model; extra keys override these."""
    base = {
        "student_model_name": model, "output_dir": str(out), "run_name": "run", "cache_dir": CACHE_DIR,
        "total_steps": 2, "save_steps": 1, "prompts_per_step": 2, "num_return_sequences": 4, "max_new_tokens": 8,
        "learning_rate": 1e-3, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "system_prompt": "", "seed": 0,
        "teacher_backend": "openai", "teacher_model_name": "teacher", "teacher_timeout_s": 5,
        "teacher_max_retries": 1, "verifier_answer_weight": 0.0, "teacher_structured_output": False,
        "max_feedback_new_tokens": 512, "teacher_weight": 1.0,
        # The offline default's local-teacher choices, back to the library defaults for a served teacher.
        "teacher_logprob_scores": False, "judge_ahead_steps": 1, "evaluation_prompt": SEED_EVALUATION_PROMPT,
    }
    base.update(extra)
    import json

    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def build_digit_model(path: Path, digits: tuple[str, ...] = ("1", "2"), seed: int = 0) -> Path:
    """A tiny Llama that answers with one of DIGITS at random: right and wrong answers in every batch, as the
    judge monitors and calibration need, at the tiny model's cost.

    The residual stream gets a large constant feature (one embedding column), the final norm passes only that
    feature, and the (untied) output head turns it into a high logit for the digits and a low one for every
    other token: the next token is one of the digits with near-equal odds, whatever the prompt.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from grpo_llm_eval.models import convert_bundled

    tok = AutoTokenizer.from_pretrained(convert_bundled("smollm2-135m-instruct", CACHE_DIR))
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    ids = [tok.convert_tokens_to_ids(d) for d in digits]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 20.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = -3.0
        model.lm_head.weight[ids, 0] = 3.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def digit_model(tmp_path_factory) -> str:
    """Path of the tiny model that answers "1" or "2" (built once per test session)."""
    return str(build_digit_model(tmp_path_factory.mktemp("digit-model")))
