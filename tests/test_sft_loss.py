"""The SFT term in bounded memory: logits never grow with the number of examples, the loss and gradient equal
the plain full-vocabulary cross-entropy, and every process can be made to run the same passes."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training import sft, sft_loss
from tests.test_sft import full_logits_sft_loss, make_trainer


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def examples(tokenizer, n: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for i in range(n):
        chat = sft.feedback_messages([{"role": "user", "content": f"What is {i} + 1?"}], f"{i}", "Let's recheck",
                                     f"Wrong: {i} + 1 = {i + 1}. " + "Add one to the number. " * 4)
        out.append(sft.tokenize_example(tokenizer, chat, max_len=4096))
    return out


@contextmanager
def logits_memory(head: torch.nn.Module, vocab: int):
    """Largest output-layer result (elements) and bytes of vocabulary-wide tensors kept for the backward pass."""
    seen = {"max_logits": 0, "saved_bytes": 0}
    storages = set()  # the output layer's weight is saved (transposed) by every call: count each storage once

    def on_output(module, args, output):
        seen["max_logits"] = max(seen["max_logits"], output.numel())

    def pack(t):
        if t.dim() >= 2 and t.size(-1) == vocab and t.untyped_storage().data_ptr() not in storages:
            storages.add(t.untyped_storage().data_ptr())
            seen["saved_bytes"] += t.untyped_storage().nbytes()
        return t

    handle = head.register_forward_hook(on_output)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield seen
    finally:
        handle.remove()


class TestBoundedMemory:
    def test_peak_logits_and_saved_logits_do_not_grow_with_the_number_of_sft_examples(self, tiny_model, tmp_path, tokenizer):
        """Old code put every SFT example of a micro-step through one forward pass with full-vocabulary logits,
        then a float copy and a cross-entropy that kept its log-softmax: at 8x the examples it materialised and
        kept 8x the vocabulary-wide tensors (tens of GB at 128k vocabulary, 4096 tokens, 8 examples)."""
        with TeacherServer(mode="scripted") as server:
            _, trainer = make_trainer(tiny_model, tmp_path, server, sft_beta=1.0, judge_ahead_steps=0)
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = 1
            inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        model = trainer.model
        head = model.get_output_embeddings()
        vocab = head.out_features
        measured = {}
        for n in (4, 32):
            trainer.sft_chunks = [examples(tokenizer, 1) * n]
            with logits_memory(head, vocab) as seen:
                loss = trainer.compute_loss(model, inputs)
            loss.backward()
            model.zero_grad()
            measured[n] = seen
        tokens = [m for m in trainer._metrics["train"]["sft_tokens"]][-2:]
        assert tokens[1] == 8 * tokens[0] > 0  # the SFT term really saw 8x the target tokens
        assert measured[32]["max_logits"] == measured[4]["max_logits"] <= sft_loss.rows_for(vocab) * vocab
        assert measured[32]["saved_bytes"] == measured[4]["saved_bytes"]


class TestChunkedLoss:
    @pytest.fixture(scope="class")
    def model(self, tiny_model):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_pretrained(tiny_model).train()

    def test_loss_and_gradient_equal_the_full_vocabulary_cross_entropy(self, model, tokenizer):
        batch_examples = examples(tokenizer, 6)
        head = model.get_output_embeddings()
        rows = 7  # many output-layer calls per pass
        batches, calls = sft_loss.plan(batch_examples, rows, per_forward=4)
        assert len(batches) == 2 and calls > 1
        params = [p for p in model.parameters() if p.requires_grad]
        got, n = sft_loss.sft_loss(model, head, batches, len(batches) + 1, calls + 2, rows,  # padded with dummies
                                   tokenizer.pad_token_id, "cpu")
        want, n_want = full_logits_sft_loss(model, sft.collate(batch_examples, tokenizer.pad_token_id, "cpu"))
        assert n == n_want > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params), strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)

    def test_a_process_without_examples_runs_the_agreed_passes_and_calls_with_zero_weight(self, model, tokenizer):
        head = model.get_output_embeddings()
        counts = {"forward": 0, "head": 0}
        hooks = [model.register_forward_hook(lambda *a: counts.__setitem__("forward", counts["forward"] + 1)),
                 head.register_forward_hook(lambda *a: counts.__setitem__("head", counts["head"] + 1))]
        try:
            loss, n = sft_loss.sft_loss(model, head, [], 3, 2, 16, tokenizer.pad_token_id, "cpu")
        finally:
            for h in hooks:
                h.remove()
        # each pass: its own 1-position call, then 2 chunks; plus the first pass's check of the model's logits
        assert counts == {"forward": 3, "head": 3 * (1 + 2) + 1}
        assert n == 0 and loss.item() == 0.0
        loss.backward()  # the dummies are in the graph: the backward pass runs as on the other processes
        assert all(p.grad is None or not p.grad.abs().any() for p in model.parameters())


class TestModelsThatChangeTheirLogits:
    def test_a_model_with_final_logit_softcapping_is_refused_not_trained_on_the_wrong_distribution(self, tokenizer):
        """The chunked loss computes logits as output_layer(hidden); Gemma 2 soft-caps them afterwards."""
        from transformers import Gemma2Config, Gemma2ForCausalLM

        cfg = Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5,
                           pad_token_id=tokenizer.pad_token_id)
        model = Gemma2ForCausalLM(cfg).train()
        batches, calls = sft_loss.plan(examples(tokenizer, 1), 64)
        with pytest.raises(ValueError, match="changes its logits after the output layer"):
            sft_loss.sft_loss(model, model.get_output_embeddings(), batches, 1, calls, 64, tokenizer.pad_token_id, "cpu")

    def test_a_lora_model_passes_the_check_and_trains_its_adapter(self, tiny_model, tokenizer):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                               LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)).train()
        batches, calls = sft_loss.plan(examples(tokenizer, 2), 16)
        loss, n = sft_loss.sft_loss(model, model.get_output_embeddings(), batches, 1, calls, 16,
                                    tokenizer.pad_token_id, "cpu")
        want, _ = full_logits_sft_loss(model, sft.collate(examples(tokenizer, 2), tokenizer.pad_token_id, "cpu"))
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n_, p in model.named_parameters() if "lora_" in n_)
