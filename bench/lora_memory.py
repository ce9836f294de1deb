"""Peak GPU memory of one GRPO-like LoRA training step: reference = the same model with the adapter off, vs a copy.

Same random-init ~0.47B Llama as bench/rollout_speed.py (bf16, SDPA, tied embeddings), LoRA as the project's
`lora:` section (r 16, alpha 32, dropout 0.05, all-linear), gradient checkpointing on (TRL's default), AdamW on
the trainable parameters. One step, as TRL's GRPOTrainer does it with beta > 0 (no trl needed):
  1. reference per-token log-probs under no_grad: `with model.disable_adapter():` (ours) or a second full
     bf16 copy of the model (the seed's way);
  2. policy per-token log-probs with grad (logits_to_keep = completion + 1; log_softmax row by row as TRL's
     selective_log_softmax does for bf16);
  3. clipped-ratio GRPO loss + beta x k3 KL to the reference, backward, optimizer step.
Modes: lora_adapter_off_ref (ours), lora_second_copy_ref (same LoRA, a second copy as reference: the ratio's
denominator), full_second_copy_ref (full fine-tuning with a second copy, for scale). Each mode starts from an
empty allocator; its peak is torch.cuda.max_memory_allocated over two steps (the second holds AdamW's states).
On CPU (no allocator statistics) the table shows the bytes held by weights, gradients and optimizer states.
Last line: ratio_vs_trl=<peak of ours / peak of lora_second_copy_ref> (lower is better).

    PYTHONPATH=src python bench/lora_memory.py --json lora_memory.json          # GPU: 32 x (64 + 256) tokens
    OMP_NUM_THREADS=1 taskset -c 0 python bench/lora_memory.py --device cpu --tiny    # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from rollout_speed import build_model, load_tokenizer

MODES = ("lora_adapter_off_ref", "lora_second_copy_ref", "full_second_copy_ref")


def token_logps(model, ids, mask, n_completion: int) -> torch.Tensor:
    """Per-token log-probs of the last n_completion tokens (TRL: logits_to_keep, then selective_log_softmax)."""
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=n_completion + 1).logits[:, :-1]
    target = ids[:, -n_completion:]
    rows = [F.log_softmax(lg, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)  # row loop: TRL's bf16 fallback
            for lg, t in zip(logits, target, strict=True)]
    return torch.stack(rows)


def held_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def run_mode(mode: str, tok, args, device: str, dtype: torch.dtype) -> dict:
    cuda = device.startswith("cuda")
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    model = build_model(tok, device, args.tiny, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    ref = None
    if mode.endswith("second_copy_ref"):
        ref = build_model(tok, device, args.tiny, dtype).eval().requires_grad_(False)
    if mode.startswith("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator(device="cpu").manual_seed(0)
    b, lp, lc = args.batch, args.prompt_len, args.completion_len
    ids = torch.randint(3, len(tok), (b, lp + lc), generator=g).to(device)
    mask = torch.ones_like(ids)
    adv = torch.randn(b, 1, generator=g).to(device)  # group-normalised rewards, one per sequence
    resident = torch.cuda.memory_allocated() - base_alloc if cuda else None
    times = []
    for _ in range(args.steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            with model.disable_adapter() if ref is None and mode.startswith("lora") else nullcontext():
                ref_lp = token_logps(ref if ref is not None else model, ids, mask, lc)
        logp = token_logps(model, ids, mask, lc)
        ratio = torch.exp(logp - logp.detach())  # num_iterations = 1: old log-probs = current, detached
        pg = -torch.min(ratio * adv, torch.clamp(ratio, 1 - args.eps, 1 + args.eps) * adv)
        delta = ref_lp - logp
        kl = torch.exp(delta) - delta - 1
        loss = (pg + args.beta * kl).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if not torch.isfinite(loss):
            raise RuntimeError(f"{mode}: loss is {loss.item()}")
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    rec = dict(mode=mode, trainable_params=sum(p.numel() for p in params),
               weights_bytes=held_bytes(model.parameters()) + (held_bytes(ref.parameters()) if ref else 0),
               optimizer_state_bytes=held_bytes(states), step_s=times, resident_bytes=resident,
               loss=float(loss.detach()))
    rec["peak_bytes"] = torch.cuda.max_memory_allocated() - base_alloc if cuda else None
    # CPU: no allocator statistics; weights + grads (freed: 0) + optimizer states is what the modes differ by
    rec["compared_bytes"] = rec["peak_bytes"] if cuda else rec["weights_bytes"] + rec["optimizer_state_bytes"]
    del model, ref, opt, params, states, ids, mask, adv, ref_lp, logp, ratio, pg, delta, kl, loss
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer model, 4 x (8 + 8) tokens (CPU smoke test)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 32; tiny 4)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 64; tiny 8")
    p.add_argument("--completion-len", type=int, default=None, help="default 256; tiny 8")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (the reference only matters if > 0)")
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.batch = args.batch or (4 if args.tiny else 32)
    args.prompt_len = args.prompt_len or (8 if args.tiny else 64)
    args.completion_len = args.completion_len or (8 if args.tiny else 256)
    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    import peft
    import transformers

    tok = load_tokenizer()
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    print(f"device={gpu} torch={torch.__version__} transformers={transformers.__version__} peft={peft.__version__} "
          f"batch={args.batch} x ({args.prompt_len} + {args.completion_len}) beta={args.beta}", flush=True)
    res = dict(device=gpu, torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
               batch=args.batch, prompt_len=args.prompt_len, completion_len=args.completion_len, beta=args.beta,
               dtype=str(dtype), metric="peak_bytes" if cuda else "weights+optimizer bytes (cpu)", results=[])
    if cuda:  # cuBLAS workspace and CUDA context into every mode's baseline, not the first mode's peak
        w = torch.randn(256, 256, device=device, dtype=dtype, requires_grad=True)
        (w @ w).float().sum().backward()
        del w
    for mode in args.modes.split(","):
        try:
            rec = run_mode(mode, tok, args, device, dtype)
        except Exception as exc:  # e.g. OOM in one mode: report it, keep the others
            rec = dict(mode=mode, na=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}")
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
        res["results"].append(rec)
        print(f"  {mode}: " + (rec.get("na") or f"{rec['compared_bytes'] / 2**30:.3f} GiB, "
              f"step {min(rec['step_s']):.2f}s"), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    gib = 2**30
    print(f"\n{'mode':<24}{'peak GiB' if cuda else 'held GiB':>10}{'weights':>9}{'opt.state':>10}"
          f"{'trainable':>12}{'step s':>8}{'vs copy':>9}")
    by = {r["mode"]: r for r in res["results"]}
    denom = by.get("lora_second_copy_ref", {}).get("compared_bytes")
    for r in res["results"]:
        if "na" in r:
            print(f"{r['mode']:<24}  n/a: {r['na']}")
            continue
        vs = f"{r['compared_bytes'] / denom:.3f}" if denom else "-"
        print(f"{r['mode']:<24}{r['compared_bytes'] / gib:>10.3f}{r['weights_bytes'] / gib:>9.3f}"
              f"{r['optimizer_state_bytes'] / gib:>10.3f}{r['trainable_params'] / 1e6:>11.1f}M"
              f"{min(r['step_s']):>8.2f}{vs:>9}")
    ours = by.get("lora_adapter_off_ref", {}).get("compared_bytes")
    res["ratio_vs_trl"] = ours / denom if ours and denom else None
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(f"ratio_vs_trl={res['ratio_vs_trl']:.4f}" if res["ratio_vs_trl"] else "ratio_vs_trl=nan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
