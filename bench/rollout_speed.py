"""Rollout (generation) tokens/s of a ~0.5B random-init Llama, TRL's plain `generate` against faster paths.

Same model, prompts and batch for every path, all in one process (bf16, SDPA, SmolLM2 tokenizer from
bench/assets/smollm2-tokenizer; each prompt repeated --group times as in GRPO; min_new_tokens = max_new_tokens,
so every sequence is full length):
  trl             model.generate + GenerationConfig exactly as TRL 1.16 GRPOTrainer builds it without vLLM
                  (do_sample, temperature/top_p/top_k/min_p/repetition_penalty, disable_compile=True), dynamic cache
  static_compile  cache_implementation="static" + CompileConfig() (torch.compile of the decode step, CUDA graphs);
                  the first call (compile) is timed apart; 'amortized' counts it once per --run-rollouts rollouts
  generate_batch  transformers continuous batching as TRL's use_transformers_continuous_batching calls it
                  (ContinuousBatchingConfig(max_memory_percent=0.5); CUDA-graph warm-up on every call, as there)
  static          cache_implementation="static" without compile (what TRL gives for cache_implementation="static":
                  TRL always sets disable_compile=True)
Floor: weight bytes (params x 2) read once per decoding step over the bandwidth of a large device-to-device
copy; 'floor+kv' adds the mean KV-cache bytes read per step. Results go to --json after every measurement.
Last line: ratio_vs_trl=<fastest path's time per rollout / trl's time> for the first batch size (lower is better).

    PYTHONPATH=src python bench/rollout_speed.py --json rollout.json            # GPU: batches 32,128 x 256 tokens
    OMP_NUM_THREADS=1 taskset -c 0 python bench/rollout_speed.py --device cpu --tiny   # CPU smoke test
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "smollm2-tokenizer"
# ~0.47B with tied embeddings (Qwen2.5-0.5B-like depth/width on the SmolLM2 vocabulary); --tiny: 2 layers of 64.
DIMS = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
            intermediate_size=4864)
TINY_DIMS = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128)
QUESTIONS = ["What is {a} + {b}? Think step by step, then give the answer.",
             "A shop sells {a} apples on Monday and {b} on Tuesday. How many apples in total were sold?",
             "Compute {a} times {b} and explain each step of your reasoning briefly.",
             "If x = {a} and y = {b}, what is x - y?"]


def load_tokenizer():
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    except Exception as exc:  # TokenizersBackend is transformers 5.x; older builds read tokenizer.json directly
        print(f"AutoTokenizer failed ({type(exc).__name__}: {exc}); using PreTrainedTokenizerFast")
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"), bos_token="<|im_start|>",
                                      eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
        tok.chat_template = (TOKENIZER_DIR / "chat_template.jinja").read_text()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_model(tok, device: str, tiny: bool, dtype: torch.dtype, intermediate: int | None = None):
    """Random-init LlamaForCausalLM built straight on `device` in `dtype` (no fp32 copy on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(TINY_DIMS if tiny else DIMS)
    if intermediate:
        dims["intermediate_size"] = intermediate
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **dims)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model  # no .to(dtype): that would also cast the fp32 rotary inv_freq buffer


def make_prompts(tok, n_seq: int, group: int) -> list[list[int]]:
    """n_seq // group distinct chat prompts (varying lengths), each repeated `group` times, as GRPO does."""
    group = max(1, min(group, n_seq))
    ids = []
    for i in range(-(-n_seq // group)):
        text = QUESTIONS[i % len(QUESTIONS)].format(a=17 * i + 3, b=1000 + 37 * i)
        out = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
        out = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
        ids += [list(out)] * group
    return ids[:n_seq]


def left_pad(prompts: list[list[int]], pad_id: int, device: str):
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def gen_config(tok, args, new_tokens: int, *, static: bool = False, compile_: bool = False, eos: bool = True):
    """TRL 1.16 GRPOTrainer.__init__'s GenerationConfig (non-vLLM branch), plus min_new_tokens and the cache knobs."""
    from transformers import GenerationConfig

    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, pad_token_id=tok.pad_token_id,
              bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id] if eos else None,
              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=None, repetition_penalty=1.0,
              cache_implementation="static" if static else None, disable_compile=not compile_)
    if compile_:
        from transformers import CompileConfig

        kw["compile_config"] = CompileConfig()
    if not eos:  # continuous batching may drop min_new_tokens: with no EOS every sequence runs full length
        kw.pop("min_new_tokens")
    return GenerationConfig(**kw)


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, tiny: bool) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written (median of 10)."""
    n = (16 if tiny else 1024) * 2**20
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times[2:])


def run_generate(model, tok, prompts, args, gc, device) -> tuple[float, int]:
    ids, mask = left_pad(prompts, tok.pad_token_id, device)
    sync(device)
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    sync(device)
    dt = time.perf_counter() - t
    n_new = out.shape[1] - ids.shape[1]
    if n_new != gc.max_new_tokens:
        raise RuntimeError(f"generated {n_new} new tokens per sequence, expected {gc.max_new_tokens}")
    return dt, out.shape[0] * n_new


def run_generate_batch(model, tok, prompts, args, gc, device) -> tuple[float, int]:
    target = model if hasattr(model, "generate_batch") else model.get_base_model()
    kw = {}
    if "continuous_batching_config" in inspect.signature(target.generate_batch).parameters:
        from transformers.generation import ContinuousBatchingConfig

        # TRL 1.16's default for training (max_memory_percent=0.5); tiny: a small cache, the CPU zeroes it
        try:
            kw["continuous_batching_config"] = ContinuousBatchingConfig(
                max_memory_percent=0.5, **(dict(num_blocks=16, max_batch_tokens=256) if args.tiny else {}))
        except TypeError as exc:  # field names move between transformers 5.x releases
            print(f"ContinuousBatchingConfig: {exc}; using its defaults")
    sync(device)
    t = time.perf_counter()
    outs = target.generate_batch(prompts, generation_config=gc, progress_bar=False, **kw)
    sync(device)
    dt = time.perf_counter() - t
    n = sum(len(o.generated_tokens) for o in outs.values())
    if len(outs) != len(prompts) or n != len(prompts) * gc.max_new_tokens:
        raise RuntimeError(f"generate_batch returned {len(outs)} sequences / {n} tokens, expected "
                           f"{len(prompts)} / {len(prompts) * gc.max_new_tokens}")
    return dt, n


def measure(path: str, model, tok, prompts, args, device) -> dict:
    n = args.new_tokens
    rec: dict = {}
    if path == "generate_batch":
        if not hasattr(model, "generate_batch") and not hasattr(model.get_base_model(), "generate_batch"):
            raise NotImplementedError("model has no generate_batch in this transformers")
        fn, gc, warm = run_generate_batch, gen_config(tok, args, n, eos=False), None
    else:
        fn = run_generate
        gc = gen_config(tok, args, n, static=path.startswith("static"), compile_=path == "static_compile")
        warm = None if path == "static_compile" else gen_config(tok, args, min(16, n), static=path == "static")
    if warm is not None:  # kernels, cuBLAS handles, allocator: out of the numbers
        fn(model, tok, prompts, args, warm, device)
    first, tokens = fn(model, tok, prompts, args, gc, device)  # static_compile: this call compiles
    rec["first_call_s"] = first
    if path == "static_compile":
        rec["compiled"] = hasattr(model, "_compiled_call") or hasattr(getattr(model, "base_model", None),
                                                                       "_compiled_call")
    times = [fn(model, tok, prompts, args, gc, device)[0] for _ in range(args.repeats)]
    if path != "static_compile":  # after the warm-up the first call is a steady-state sample too
        times.insert(0, first)
    steady = statistics.median(times)
    rec.update(tokens=tokens, times_s=times, s_per_rollout=steady, tokens_per_s=tokens / steady)
    if path == "static_compile":
        r = args.run_rollouts
        rec["amortized_s_per_rollout"] = (first + (r - 1) * steady) / r
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="2-layer model, 4 sequences x 8 tokens (CPU smoke test)")
    p.add_argument("--batches", default=None, help="comma-separated sequences per rollout (default 32,128; tiny 4)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per sequence (default 256; tiny 8)")
    p.add_argument("--group", type=int, default=8, help="completions per prompt (GRPO num_generations)")
    p.add_argument("--paths", default="trl,static_compile,generate_batch,static")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per (path, batch) after the first")
    p.add_argument("--run-rollouts", type=int, default=100, help="rollouts per run for the amortized compile figure")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no new measurement after this many seconds")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4864: ~0.47B params)")
    p.add_argument("--lora", action="store_true", help="wrap in an unmerged peft LoRA (r16, all-linear) like TRL")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    device = args.device
    batches = [int(b) for b in (args.batches or ("4" if args.tiny else "32,128")).split(",")]
    args.new_tokens = args.new_tokens or (8 if args.tiny else 256)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    import transformers

    tok = load_tokenizer()
    model = build_model(tok, device, args.tiny, dtype, args.intermediate)
    n_params = sum(q.numel() for q in model.parameters())
    c = model.config
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()  # TRL generates with the model in training mode (dropout is 0 in the base model)
    bw = copy_bandwidth(device, args.tiny)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    head_dim = c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * dtype.itemsize
    weight_bytes = n_params * dtype.itemsize
    print(f"device={gpu} torch={torch.__version__} transformers={transformers.__version__} params={n_params / 1e6:.1f}M "
          f"dtype={dtype} copy_bw={bw / 1e9:.0f} GB/s lora={args.lora}", flush=True)
    res = dict(device=gpu, torch=torch.__version__, transformers=transformers.__version__, params=n_params,
               dims={k: getattr(c, k) for k in DIMS}, vocab=c.vocab_size, dtype=str(dtype), lora=args.lora,
               new_tokens=args.new_tokens, group=args.group, copy_bw_bytes_per_s=bw, run_rollouts=args.run_rollouts,
               results=[])

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    for b in batches:  # batch-major: under --budget-s the first batch gets every path
        prompts = make_prompts(tok, b, args.group)
        for path in args.paths.split(","):
            plen = max(map(len, prompts))
            kv_bytes = b * (plen + args.new_tokens / 2) * kv_per_token
            row = dict(path=path, batch=b, prompt_len=plen, floor_tokens_per_s=b * bw / weight_bytes,
                       floor_kv_tokens_per_s=b * bw / (weight_bytes + kv_bytes))
            if time.perf_counter() - t0 > args.budget_s:
                row["na"] = f"skipped: --budget-s {args.budget_s:.0f} spent"
            else:
                try:
                    with torch.no_grad() if path != "generate_batch" else nullcontext():
                        row.update(measure(path, model, tok, prompts, args, device))
                except Exception as exc:  # an API this transformers lacks, a compile failure, OOM: keep going
                    row["na"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc) else ''}"
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
            res["results"].append(row)
            print(f"  {path} batch={b}: " + (row.get("na") or f"{row['tokens_per_s']:.0f} tok/s "
                  f"(first call {row['first_call_s']:.1f}s)") + f" [{time.perf_counter() - t0:.0f}s]", flush=True)
            save()

    print(f"\n{'path':<36}{'batch':>6}{'tok/s':>10}{'s/rollout':>11}{'vs trl':>8}{'floor tok/s':>13}"
          f"{'floor+kv':>10}{'%floor+kv':>10}")
    ratios = {}
    for b in batches:
        rows = [r for r in res["results"] if r["batch"] == b]
        base = next((r.get("s_per_rollout") for r in rows if r["path"] == "trl"), None)
        cands = []
        for r in rows:
            name = r["path"] + ("[NOT compiled]" if r.get("compiled") is False else "")
            shown = [(name, r.get("s_per_rollout"))]
            if "amortized_s_per_rollout" in r:
                shown.append((f"{name}(amort.)", r["amortized_s_per_rollout"]))
            for name, s in shown:
                if s is None:
                    print(f"{name:<36}{b:>6}  n/a: {r['na']}")
                    continue
                tps = b * args.new_tokens / s
                vs = f"{base / s:.2f}x" if base else "-"
                print(f"{name:<36}{b:>6}{tps:>10.0f}{s:>11.3f}{vs:>8}{r['floor_tokens_per_s']:>13.0f}"
                      f"{r['floor_kv_tokens_per_s']:>10.0f}{100 * tps / r['floor_kv_tokens_per_s']:>9.0f}%")
            best = shown[-1][1]  # the compile path competes with its amortized time (compile paid once per run)
            if best is not None and r["path"] != "trl":
                cands.append((best, shown[-1][0]))
        if base and cands:
            best_s, best_name = min(cands)
            ratios[b] = dict(best=best_name, ratio=best_s / base) if best_s < base else dict(best="trl", ratio=1.0)
    res["ratio_vs_trl"] = ratios
    save()
    for b, r in ratios.items():
        print(f"batch {b}: fastest {r['best']} -> ours/trl time {r['ratio']:.3f}")
    first = ratios.get(batches[0])
    print(f"ratio_vs_trl={first['ratio']:.4f}" if first else "ratio_vs_trl=nan")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
