"""Step time with a slow teacher: ours (judging ahead) against plain TRL with a naive group-by-group judge.

Every arm runs in this one process on the same model, data, seeds and GRPO settings; the teacher is our
OpenAI-compatible test server on loopback answering each call after a fixed latency (unlimited parallelism).

    arm               what runs
    trl_instant       trl.GRPOTrainer, an instant reward (the exact-answer check): the floor
    trl_group@L       trl.GRPOTrainer, a hand-written judge that calls the teacher group by group, as the seed
    ours@L d=D        grpo_llm_eval's trainer and teacher client, judge_ahead_steps=D (a number, or auto: the
                      library default, and the arm run by default)

Step time is the median over the steady-state steps: not the first (load, warm-up), not those after a change
of the lag (the first step's fill included) until the batches sampled then have trained (their judging
started together, and a lowered lag trains from the queue without sampling), and not the last (it samples
nothing). The table is followed by `ratio_vs_trl=<ours@2s / trl_group@2s>` (lower is better).

Reproduce:
    python bench/step_time.py                 # CPU: bundled SmolLM2-135M, 2 prompts x 4 completions x 16 tokens
    python bench/step_time.py --gpu           # random-init ~0.5B Llama + bundled tokenizer, 4 x 8 x 256, bf16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformers import TrainerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENAI_API_KEY", "bench")


class StepClock(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


class GroupByGroupJudge:
    """The seed's way: grade one group's completions (concurrently), wait, then the next group."""

    __name__ = "group_judge"

    def __init__(self, base_url: str, group: int, prompt_template: str):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=120)
        self.group, self.template = group, prompt_template
        self.pool = ThreadPoolExecutor(group)

    def _grade(self, question: str, completion: str, answer: str) -> float:
        prompt = (self.template.replace("{question}", question).replace("{student_response}", completion)
                  .replace("{ground_truth}", str(answer)))
        reply = self.client.chat.completions.create(model="teacher", messages=[{"role": "user", "content": prompt}],
                                                    max_tokens=512, temperature=0.0)
        m = re.search(r"<answer>\s*<score>\s*(\d+)", reply.choices[0].message.content or "")
        return float(m.group(1)) / 10 if m else 0.0

    def __call__(self, prompts, completions, answer, question, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards: list[float] = []
        for g in range(0, len(texts), self.group):
            idx = range(g, min(g + self.group, len(texts)))
            rewards += list(self.pool.map(lambda i: self._grade(question[i], texts[i], answer[i]), idx))
        return rewards


def build_gpu_model(folder: Path) -> str:
    """The random-init ~0.5B Llama of rollout_speed.py with the bundled tokenizer (no Hub access), saved."""
    import torch

    from rollout_speed import build_model, load_tokenizer

    tok = load_tokenizer()
    model = build_model(tok, "cuda", False, torch.bfloat16)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters", flush=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return str(folder)


def base_config(args, model: str, out: Path, steps: int):
    from grpo_llm_eval.config.load import load_config

    sets = {"student_model_name": model, "output_dir": str(out), "save_steps": 10_000, "total_steps": steps,
            "prompts_per_step": args.prompts, "num_return_sequences": args.group, "max_new_tokens": args.tokens,
            "temperature": 1.0, "top_p": 1.0, "top_k": 0, "system_prompt": "", "seed": 0, "learning_rate": 1e-6,
            "teacher_backend": "openai", "teacher_model_name": "teacher", "teacher_weight": 1.0,
            "verifier_answer_weight": 1.0, "teacher_max_concurrency": 256, "teacher_timeout_s": 120,
            "teacher_cache": False, "max_feedback_new_tokens": 512,
            # The library defaults for a served teacher (the offline default's are for its local 135M judge):
            # plain-text grades, as the trl_group arm parses them; logprob scores and structured output
            # double our client's parsing per grade (bench/RESULTS.md section 1, overhead).
            "teacher_logprob_scores": False, "teacher_structured_output": False}
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def run_trl(cfg, out: Path, reward) -> list[float]:
    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from grpo_llm_eval import data
    from grpo_llm_eval.training.train import grpo_args

    dataset = data.build_prompts(data.load_rows(cfg, cfg.dataset_split).dataset, cfg)
    tok = AutoTokenizer.from_pretrained(cfg.student_model_name)
    clock = StepClock()
    trainer = GRPOTrainer(model=cfg.student_model_name, reward_funcs=[reward], args=grpo_args(cfg, out),
                          train_dataset=dataset, processing_class=tok, callbacks=[clock])
    trainer.train()
    return clock.times


def run_ours(cfg) -> tuple[list[float], list[dict]]:
    from grpo_llm_eval.training.records import read_jsonl
    from grpo_llm_eval.training.train import train

    result = train(cfg)
    rows = [r for r in read_jsonl(result.run_dir / "metrics.jsonl") if "time/step_s" in r]
    return [r["time/step_s"] for r in rows], rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="random-init ~0.5B Llama on CUDA, 256 tokens")
    parser.add_argument("--steps", type=int, default=0,
                        help="steps per arm (default 6 for plain TRL, 12 for ours: auto settles its lag first)")
    parser.add_argument("--latencies", default="", help="teacher latencies in s (default 2,10)")
    parser.add_argument("--arms", default="", help="comma list of arm names to run (default: all)")
    parser.add_argument("--json", default="", help="also write the results here")
    parser.add_argument("--keep-work", action="store_true",
                        help="keep the temporary folder of run outputs (several GB a run), removed by default")
    args = parser.parse_args()
    args.prompts, args.group = (4, 8) if args.gpu else (2, 4)
    args.tokens = 256 if args.gpu else 16
    latencies = [float(x) for x in (args.latencies or "2,10").split(",")]

    from grpo_llm_eval.models import convert_bundled

    work = Path(tempfile.mkdtemp(prefix="step-time-"))
    try:
        model = build_gpu_model(work / "model") if args.gpu else str(convert_bundled("smollm2-135m-instruct",
                                                                                      "~/.cache/grpo_llm_eval"))
        names = ["trl_instant"]
        for lat in latencies:
            names += [f"trl_group@{lat:g}s", f"ours@{lat:g}s d=auto"]
        arms = [parse_arm(n) for n in ([a for a in args.arms.split(",") if a] or names)]
        results = []
        for name, latency, how in arms:
            try:
                row = run_arm(args, model, work, name, latency, how)
            except Exception as exc:  # one broken arm must not lose the others' numbers
                print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
                continue
            results.append(row)
            print(f"{name:18s} step {row['step_s']:7.2f} s  (first {row['first_step_s']:.1f} s, "
                  f"{row['teacher_calls']} teacher calls)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"gpu": args.gpu, "results": results}, indent=1))
    finally:
        if args.keep_work:
            print(f"run outputs kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(results, latencies)
    return 0


def parse_arm(name: str) -> tuple[str, float, object]:
    """'trl_instant', 'trl_group@2s', 'ours@10s d=2', 'ours@10s d=auto' or 'ours@2s d=1 trl-gen' -> (name,
    latency, how); how is None, 'random', 'group' or (judge_ahead_steps, fast_generation) for ours."""
    if name in ("trl_instant", "trl_random"):
        return name, 0.0, None if name == "trl_instant" else "random"
    m = re.fullmatch(r"trl_group@([\d.]+)s", name)
    if m:
        return name, float(m.group(1)), "group"
    m = re.fullmatch(r"ours@([\d.]+)s d=(\d+|auto)( trl-gen)?", name)
    if not m:
        raise SystemExit(f"unknown arm {name!r}: trl_instant, trl_group@Ls, ours@Ls d=D|auto [trl-gen]")
    depth = m.group(2) if m.group(2) == "auto" else int(m.group(2))
    return name, float(m.group(1)), (depth, not m.group(3))


def run_arm(args, model: str, work: Path, name: str, latency: float, how) -> dict:
    from grpo_llm_eval import config as config_mod
    from grpo_llm_eval.testing.teacher_server import TeacherServer

    ours = isinstance(how, tuple)
    steps = args.steps or (12 if ours else 6)
    with TeacherServer(mode="scripted", latency_s=latency) as server:
        cfg = base_config(args, model, work / "runs", steps)
        cfg.openai_base_url = server.base_url
        cfg.run_name = re.sub(r"[^\w.-]", "_", name)
        started = time.perf_counter()
        if how is None:
            from plain_trl_arithmetic import exact_answer  # the same reward as the ablation's plain TRL arm

            times = run_trl(cfg, work / cfg.run_name, exact_answer)
        elif how == "random":  # varied rewards, so every step updates the weights
            times = run_trl(cfg, work / cfg.run_name, lambda completions, **_: [float(hash(str(c)) % 7) for c in completions])
        elif how == "group":
            times = run_trl(cfg, work / cfg.run_name,
                            GroupByGroupJudge(server.base_url, args.group, config_mod.SEED_EVALUATION_PROMPT))
        else:
            cfg.judge_ahead_steps, cfg.fast_generation = how
            times, rows = run_ours(cfg)
        requests = server.stats()["chat_requests"]
    depths = [int(r.get("judge_ahead/depth", 0)) for r in rows] if ours else [0] * len(times)
    skip = steady_start(depths)
    steady = times[skip:-1] or times[1:] or times
    row = {"arm": name, "latency_s": latency, "step_s": statistics.median(steady), "steps": len(times),
           "steady_steps": len(steady), "first_step_s": times[0], "teacher_calls": requests,
           "wall_s": time.perf_counter() - started}
    if ours:
        row["depths"] = depths
        for key in ("time/old_logps_s", "time/judge_wait_s", "time/generate_s"):
            values = [r.get(key, 0.0) for r in rows[skip:-1]]
            row[key] = statistics.median(values) if values else None
    return row


def steady_start(depths: list[int]) -> int:
    """Steps to skip: the first (load, warm-up), and after each change of the lag (the first step's fill
    included) as many steps as the larger lag, so the batches sampled together then (judged together from that
    moment) or a queue drained without sampling have all trained; the last step is dropped by the caller."""
    skip = 1
    for i, depth in enumerate(depths):
        before = depths[i - 1] if i else 0
        if i == 0 or depth != before:
            skip = max(skip, i + max(depth, before) + 1)
    return skip


def report(results: list[dict], latencies: list[float]) -> None:
    by = {r["arm"]: r for r in results}
    floor = by.get("trl_instant", {}).get("step_s")
    print("\n| arm | teacher latency | step s | vs trl_instant | vs trl_group same latency |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        lat = r["latency_s"]
        group = by.get(f"trl_group@{lat:g}s", {}).get("step_s")
        vs_floor = f"{r['step_s'] / floor:.2f}" if floor else "n/a"
        vs_group = f"{r['step_s'] / group:.2f}" if group and lat else "n/a"
        print(f"| {r['arm']} | {lat:g} s | {r['step_s']:.2f} | {vs_floor} | {vs_group} |")
    for r in results:
        if "depths" in r:
            print(f"{r['arm']}: lag by step {r['depths']}; steady medians: old_logps {r['time/old_logps_s']}, "
                  f"judge_wait {r['time/judge_wait_s']}, generate {r['time/generate_s']}")
    ours = by.get(f"ours@{latencies[0]:g}s d=auto", {}).get("step_s")
    trl = by.get(f"trl_group@{latencies[0]:g}s", {}).get("step_s")
    if ours and trl:
        print(f"ratio_vs_trl={ours / trl:.3f}")


if __name__ == "__main__":
    sys.exit(main())
