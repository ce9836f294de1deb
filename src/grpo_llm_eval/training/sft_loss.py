"""The SFT term's loss, in bounded memory and with the same collectives on every process.

Memory. A forward pass over every SFT example of a micro-step with full-vocabulary logits (then a float copy
and a cross-entropy that keeps its log-softmax for the backward pass) costs examples x tokens x vocabulary:
tens of GB at 128k vocabulary, 4096 tokens and 8 examples. Here the examples go through the model a few at a
time (`EXAMPLES_PER_FORWARD`); the output layer is skipped during the forward pass (a pre-hook hands it one
position), and the loss is computed from the final hidden states at the target positions only, in chunks of
at most `rows_per_call` rows, each under activation checkpointing so no chunk's logits are kept for the
backward pass (they are recomputed there, one chunk at a time). The peak of logits memory is one chunk's,
whatever the number of examples.

Collectives. Each process has its own SFT examples: one may have none (all its grades failed) while another
has several. Under DDP every forward pass broadcasts buffers, under FSDP or ZeRO-3 it all-gathers weights, so
every process must run the same number of forward passes and output-layer calls or they hang. One small
all-reduce (max) agrees on both counts; a process with fewer runs zero-weighted dummy passes and calls.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

from grpo_llm_eval.training.sft import IGNORE, collate

EXAMPLES_PER_FORWARD = 4
LOGITS_BUDGET = 1 << 24  # elements of one output-layer call's logits (64 MiB in float32)

Example = tuple[list[int], list[int]]


def rows_for(vocab_size: int, budget: int = LOGITS_BUDGET) -> int:
    """Target positions per output-layer call so that its logits stay within BUDGET elements."""
    return max(1, budget // max(1, vocab_size))


def plan(examples: list[Example], rows_per_call: int, per_forward: int = EXAMPLES_PER_FORWARD):
    """Split EXAMPLES into forward passes; returns (batches, output-layer calls the busiest pass needs)."""
    batches = [examples[i:i + per_forward] for i in range(0, len(examples), per_forward)]
    targets = [sum(sum(1 for t in labels[1:] if t != IGNORE) for _, labels in b) for b in batches]
    return batches, max((math.ceil(n / rows_per_call) for n in targets), default=0)


def agree(counts: tuple[int, int], reduce_max: Callable[[torch.Tensor], torch.Tensor] | None, device) -> tuple[int, int]:
    """The largest (forward passes, output-layer calls) over all processes: one all-reduce of two numbers."""
    if reduce_max is None:
        return counts
    agreed = reduce_max(torch.tensor(counts, dtype=torch.long, device=device))
    return int(agreed[0]), int(agreed[1])


@contextmanager
def _capture_final_hidden(head: torch.nn.Module):
    """While active, the output layer sees one position; the full final hidden states land in the dict."""
    seen: dict[str, torch.Tensor] = {}

    def pre_hook(module, args):
        seen["hidden"] = args[0]
        return (args[0][..., -1:, :],)

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield seen
    finally:
        handle.remove()


def _check_logits_are_the_output_layers(logits: torch.Tensor, head: torch.nn.Module, hidden: torch.Tensor) -> None:
    """The loss computes logits as HEAD(hidden); a model that changes them afterwards (Gemma 2's final logit
    soft-capping, Cohere's logit scale) would be trained on the wrong distribution: refuse it."""
    with torch.no_grad():
        direct = head(hidden[..., -1:, :].detach())
    if logits.shape != direct.shape or not torch.allclose(logits.float(), direct.float(), rtol=1e-3, atol=1e-3):
        raise ValueError(
            "sft_beta > 0: this model changes its logits after "
            "the output layer (e.g. final logit soft-capping or a logit scale), which the SFT term's chunked loss "
            "does not reproduce; set sft_beta: 0 for this model.")


def _chunk_ce(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _dummy_batch(pad_id: int, device) -> dict[str, torch.Tensor]:
    return collate([([pad_id], [IGNORE])], pad_id, device)


def sft_loss(model, head: torch.nn.Module, batches: list[list[Example]], forwards: int, calls: int,
             rows_per_call: int, pad_id: int, device) -> tuple[torch.Tensor, int]:
    """Mean token cross-entropy over the target tokens of BATCHES, and how many target tokens there were.

    Runs exactly FORWARDS forward passes through MODEL with CALLS output-layer (HEAD) calls each, padding
    with zero-weighted dummies where this process has fewer (see the module doc). HEAD is MODEL's output
    layer (`get_output_embeddings()` of the unwrapped model).
    """
    total = None
    n_tokens = 0
    for i in range(forwards):
        real = i < len(batches)
        batch = collate(batches[i], pad_id, device) if real else _dummy_batch(pad_id, device)
        with _capture_final_hidden(head) as seen:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if "hidden" not in seen:
            raise ValueError("sft_beta > 0: this model's forward pass never calls its output layer "
                             "(get_output_embeddings()), so the SFT term cannot take its hidden states; set sft_beta: 0.")
        if i == 0:  # the same pass on every process, so an extra output-layer call here stays matched
            _check_logits_are_the_output_layers(out.logits, head, seen["hidden"])
        hidden = seen["hidden"][:, :-1, :]
        labels = batch["labels"][:, 1:]
        keep = labels != IGNORE
        rows, targets = hidden[keep], labels[keep]  # (N, hidden), (N,): the target positions only
        n_tokens += int(targets.numel())
        part = hidden.sum() * 0.0  # keeps a dummy pass in the graph, so every process's backward matches
        for c in range(calls):
            chunk, chunk_targets = rows[c * rows_per_call:(c + 1) * rows_per_call], targets[c * rows_per_call:(c + 1) * rows_per_call]
            weight = 1.0
            if chunk.size(0) == 0:  # a dummy call: one zero-weighted row, so the output layer runs as often
                chunk, chunk_targets, weight = seen["hidden"][:1, -1, :], torch.zeros(1, dtype=torch.long, device=device), 0.0
            call = functools.partial(_chunk_ce, head)
            part = part + weight * checkpoint(call, chunk, chunk_targets, use_reentrant=False)
        total = part if total is None else total + part
    if total is None:
        return torch.zeros((), device=device), 0
    return total / max(1, n_tokens), n_tokens
