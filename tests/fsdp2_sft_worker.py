"""One process of tests/test_fsdp2_cpu.py: the SFT term on an FSDP2-sharded tiny Llama (gloo, CPU).

Shards as configs/accelerate/fsdp2.yaml does (each decoder layer a unit, the root the rest); rank 0 has three
SFT examples, rank 1 none. After one backward pass and an SGD step, rank 0 compares the gathered weights with
the same step on an unsharded copy (gradients averaged over the two processes: rank 1's are zero) and writes
the result as JSON to argv[2]/rank-<i>.json.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_llm_eval.training import sft, sft_loss

LR = 0.5


def _examples(tokenizer, rank: int):
    if rank != 0:
        return []
    chats = [sft.feedback_messages([{"role": "user", "content": f"What is {i} + 1?"}], str(i), "Recheck",
                                   f"Wrong: {i} + 1 = {i + 1}. " * (i + 1)) for i in range(3)]
    return [sft.tokenize_example(tokenizer, c, 4096) for c in chats]


def _loss(model, tokenizer, examples, reduce_max):
    head = model.get_output_embeddings()
    rows = 8  # several output-layer calls per pass
    batches, calls = sft_loss.plan(examples, rows, per_forward=2)
    forwards, calls = sft_loss.agree((len(batches), calls), reduce_max, "cpu")
    return sft_loss.sft_loss(model, head, batches, forwards, calls, rows, tokenizer.pad_token_id, "cpu"), forwards


def main(path: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).train()
    reference = AutoModelForCausalLM.from_pretrained(path).train() if rank == 0 else None
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)

    def reduce_max(t):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    examples = _examples(tokenizer, rank)
    (loss, n_tokens), forwards = _loss(model, tokenizer, examples, reduce_max)
    loss.backward()  # FSDP2 reduce-scatters the gradients, averaged over the processes
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    full = {n: p.full_tensor() for n, p in model.named_parameters()}
    result = {"rank": rank, "forwards": forwards, "n_tokens": n_tokens, "loss": loss.item()}
    if rank == 0:
        (ref_loss, _), _ = _loss(reference, tokenizer, examples, None)
        ref_loss.backward()
        worst = 0.0
        with torch.no_grad():
            for n, p in reference.named_parameters():
                want = p - LR * p.grad / 2  # the other process contributed a zero gradient
                worst = max(worst, (full[n] - want).abs().max().item())
        result.update(reference_loss=ref_loss.item(), max_weight_diff=worst,
                      moved=max((full[n] - p).abs().max().item() for n, p in reference.named_parameters()))
    with open(f"{out}/rank-{rank}.json", "w", encoding="utf-8") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
