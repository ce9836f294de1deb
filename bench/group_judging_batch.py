"""Pointwise vs group judging on the same training batches: teacher calls, tokens, wall time, ok share, answer AUC.

A batch is what one offline-default training step grades: 4 bundled arithmetic prompts (train split) x 8
completions sampled from the bundled student (SmolLM2-135M-Instruct, the offline default's sampling settings).
The batches are sampled once and saved (--batches-file); later runs reuse them, so every arm grades the same text.
Four arms grade each batch:

    api pointwise / api group      the OpenAI backend against our test server on loopback in `scripted` mode (a
                                   correct teacher), plain XML grades: what the API costs in calls and tokens
    local pointwise / local group  the in-process bundled 135M teacher with the offline default's settings
                                   (configs/offline.yaml: forced-key logprob scores, 8 explanation tokens)

Per arm and batch: calls, prompt and completion tokens (the server's usage; the model's tokenizer locally), the
wall time of `judge` (the health check is not timed), the share of ok grades, and the ROC AUC of the teacher's
answer score against the verifier (math-verify; 0.5 is chance). Then the group / pointwise ratios.

    python bench/group_judging_batch.py                 # 1 batch (samples it the first time)
    python bench/group_judging_batch.py --batches 3 --threads 1
    python bench/group_judging_batch.py --labelled 16 --arms local   # balanced right/wrong answers, groups of 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from grpo_llm_eval.config import SEED_EVALUATION_PROMPT
from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.evaluation.stats import auc_bootstrap_ci, roc_auc
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.verifiers import answer_correct

sys.path.insert(0, str(Path(__file__).resolve().parent))
PROMPTS, COMPLETIONS = 4, 8
DEFAULT_FILE = Path(__file__).resolve().parent / "assets" / "group_judging_batches.jsonl"


def sample_batches(path: Path, batches: int) -> list[list[dict]]:
    """BATCHES x PROMPTS prompts x COMPLETIONS completions of the bundled student, saved to PATH (reused if there)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    if len({r["batch"] for r in rows}) < batches:
        from grpo_llm_eval.evaluation.calibrate import sample_responses

        cfg = load_config(None)
        start = time.perf_counter()
        sampled = sample_responses(cfg, cfg.student_model_name, "train", PROMPTS * batches, COMPLETIONS, 16)
        print(f"sampled {len(sampled)} completions in {time.perf_counter() - start:.0f} s", flush=True)
        rows = [{"batch": r["prompt_index"] // PROMPTS, **r} for r in sampled]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [[r for r in rows if r["batch"] == b] for b in range(batches)]


def arm_config(arm: str, mode: str, url: str | None):
    common = [f"judge_mode={mode}", f"num_return_sequences={COMPLETIONS}", "teacher_cache=false"]
    if arm == "api":
        return load_config(None, [*common, "teacher_backend=openai", "teacher_model_name=teacher",
                                  f"openai_base_url={url}", "teacher_structured_output=false",
                                  "teacher_logprob_scores=false", "max_feedback_new_tokens=512",
                                  f"evaluation_prompt={SEED_EVALUATION_PROMPT}"])
    return load_config(None, common)  # the offline default's local teacher


def grade(cfg, batch: list[dict], threads: int) -> dict:
    rubric = Rubric.from_config(cfg)
    teacher = build_teacher(cfg, rubric)
    backend = getattr(teacher, "backend", teacher)
    if hasattr(backend, "n_threads"):
        backend.n_threads = threads
    requests = [JudgeRequest(r["question"], r["response"], r["ground_truth"]) for r in batch]

    async def go():
        try:
            await teacher.health_check()
            before = teacher.usage.usage
            start = time.perf_counter()
            out = await teacher.judge(requests)
            return out, time.perf_counter() - start, teacher.usage.usage - before
        finally:
            await teacher.aclose()

    judgements, wall, used = asyncio.run(go())
    right = [answer_correct(r["response"], r["ground_truth"], cfg.think_close_string) for r in batch]
    pairs = [(j.scores["answer"], y, r["prompt_index"]) for j, y, r in zip(judgements, right, batch, strict=True)
             if j.ok and y is not None]
    return {"calls": used.calls, "prompt_tokens": used.prompt_tokens, "completion_tokens": used.completion_tokens,
            "wall_s": wall, "ok": sum(j.ok for j in judgements) / len(judgements),
            "auc": roc_auc([p[0] for p in pairs], [p[1] for p in pairs]), "right": sum(bool(y) for y in right),
            "pairs": pairs}


def pooled_auc(results: list[dict]) -> str:
    """The answer AUC over every batch's ok grades, with a 95% interval resampling prompts."""
    pairs = [p for r in results for p in r["pairs"]]
    auc = roc_auc([p[0] for p in pairs], [p[1] for p in pairs])
    if auc is None:
        return "n/a"
    by_prompt: dict[int, list] = {}
    for score, right, prompt in pairs:
        by_prompt.setdefault(prompt, []).append((score, right))
    ci = auc_bootstrap_ci(list(by_prompt.values()))
    right = sum(p[1] for p in pairs)
    return f"{auc:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "") + f" ({right} right, {len(pairs) - right} wrong)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--batches-file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads of the local teacher")
    parser.add_argument("--arms", default="api,local")
    parser.add_argument("--labelled", type=int, default=0,
                        help="instead of the student's batches: N bundled test problems x 2 right and 2 wrong answers "
                             "(bench/teacher_ok_share.py's), one group of 4 each, as one batch: a balanced AUC")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"machine: {cpu}, {os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    if args.labelled:
        from grpo_llm_eval.data.bundled import read_bundled
        from teacher_ok_share import responses

        items = responses(read_bundled("arithmetic", "test")[:args.labelled])
        batches = [[{"question": q, "response": t, "ground_truth": a, "prompt_index": g} for g, q, t, a in items]]
    else:
        batches = sample_batches(args.batches_file, args.batches)
    results: dict[tuple[str, str], list[dict]] = {}
    with TeacherServer(mode="scripted") as server:
        for b, batch in enumerate(batches):
            for arm in args.arms.split(","):
                for mode in ("pointwise", "group"):
                    r = grade(arm_config(arm, mode, server.base_url), batch, args.threads)
                    results.setdefault((arm, mode), []).append(r)
                    auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f}"
                    print(f"batch {b} {arm} {mode}: {r['calls']} calls, {r['prompt_tokens']} prompt + "
                          f"{r['completion_tokens']} completion tokens, {r['wall_s']:.2f} s, ok {r['ok']:.0%}, "
                          f"answer AUC {auc} ({r['right']} of {len(batch)} right)", flush=True)
    print("\nmeans over batches; ratio = group / pointwise")
    keys = ("calls", "prompt_tokens", "completion_tokens", "wall_s", "ok", "auc")
    for arm in args.arms.split(","):
        means = {mode: {k: statistics.fmean(v for r in results[(arm, mode)] if (v := r[k]) is not None)
                        if any(r[k] is not None for r in results[(arm, mode)]) else None for k in keys}
                 for mode in ("pointwise", "group")}
        for mode in ("pointwise", "group"):
            m = means[mode]
            print(f"{arm:5s} {mode:9s} " + "  ".join(f"{k} {m[k]:.3f}" if m[k] is not None else f"{k} n/a" for k in keys))
        ratios = {k: means["group"][k] / means["pointwise"][k] for k in keys[:4] if means["pointwise"][k]}
        print(f"{arm:5s} ratio     " + "  ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        for mode in ("pointwise", "group"):
            print(f"{arm:5s} {mode:9s} answer AUC over all batches {pooled_auc(results[(arm, mode)])}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
