"""Capacity numbers for docs/scaling.md: teacher grades/s against concurrency, and student rollout tokens/s.

Teacher: the loopback test server (`TeacherServer`, each answer delayed by --latency-s, as a busy remote
server is), or your own server (--base-url), graded through the real `OpenAITeacher` at several
`teacher_max_concurrency` values. With enough calls in flight, a judging round takes about one latency,
not n x latency.

Student: plain `generate` (sampling) of a batch of chat prompts, the rollout half of a step.

    python bench/teacher_throughput.py                                      # teacher table, latency 2 s
    python bench/teacher_throughput.py --latency-s 0 --concurrency 1,8,32 --min-requests 64  # client ceiling
    python bench/teacher_throughput.py --base-url http://teacher:8001/v1 --model Qwen/Qwen2.5-14B-Instruct \\
        --feedback-tokens 4096 --concurrency 8,32,64,128                     # your own teacher server
    python bench/teacher_throughput.py --skip-teacher --threads 1 --student tiny \\
        --student bundled:smollm2-135m-instruct

`--student tiny` is the tests' 2-layer random Llama (built on the fly); any Hub id or folder works too.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---- teacher ----------------------------------------------------------------------------------------------

def _teacher(base_url: str, model: str, concurrency: int, feedback_tokens: int):
    from grpo_llm_eval.config.load import load_config
    from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher
    from grpo_llm_eval.teacher.grading.rubric import Rubric

    cfg = load_config(None, ["teacher_backend=openai", f"teacher_model_name={model}", f"openai_base_url={base_url}",
                             f"teacher_max_concurrency={concurrency}", "teacher_max_retries=0", "teacher_timeout_s=600",
                             "teacher_structured_output=false", f"max_feedback_new_tokens={feedback_tokens}"])
    return OpenAITeacher(cfg, Rubric.from_config(cfg), num_processes=1)


def teacher_table(latency_s: float, levels: list[int], min_requests: int, base_url: str | None = None,
                  model: str = "teacher", feedback_tokens: int = 512) -> list[dict]:
    """Grades/s at each concurrency: max(min_requests, 2 x concurrency) distinct requests, judged as one batch.

    Against the loopback TeacherServer, or against your own server with BASE_URL and MODEL.
    """
    from grpo_llm_eval.teacher.types import JudgeRequest
    from grpo_llm_eval.testing.teacher_server import TeacherServer

    rows = []
    with nullcontext() if base_url else TeacherServer(mode="scripted", latency_s=latency_s) as server:
        for level in levels:
            n = max(min_requests, 2 * level)
            requests = [JudgeRequest(f"What is {i} + {level}?", f"<think>{i}+{level}</think>{i + level}",
                                     str(i + level)) for i in range(n)]
            teacher = _teacher(base_url or server.base_url, model, level, feedback_tokens)

            async def run(teacher=teacher, requests=requests):
                try:
                    return await teacher.judge(requests)
                finally:
                    await teacher.aclose()

            if server is not None:
                server.reset_stats()
            start = time.perf_counter()
            judgements = asyncio.run(run())
            wall = time.perf_counter() - start
            ok = sum(j.ok for j in judgements)
            tokens = teacher.stats["completion_tokens"]
            rows.append({"concurrency": level, "requests": n, "ok": ok, "wall_s": wall, "grades_per_s": ok / wall,
                         "ideal_per_s": level / latency_s if latency_s > 0 and not base_url else math.nan,
                         "round_s": wall / math.ceil(n / level),
                         "max_in_flight": server.stats()["max_in_flight"] if server is not None else None,
                         "out_tokens_per_grade": tokens / max(1, ok), "out_tokens_per_s": tokens / wall})
    return rows


def print_teacher(rows: list[dict], source: str) -> None:
    print(f"\nTeacher: {source} through OpenAITeacher; this machine has {os.cpu_count()} CPU cores")
    print("| concurrency | requests | wall s | s per round of `concurrency` calls | grades/s | ideal c/latency "
          "| max in flight | output tokens/s | 64-grade step at this cap, s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ideal = "-" if math.isnan(r["ideal_per_s"]) else f"{r['ideal_per_s']:.1f}"
        seen = "-" if r["max_in_flight"] is None else r["max_in_flight"]
        print(f"| {r['concurrency']} | {r['requests']} | {r['wall_s']:.2f} | {r['round_s']:.2f} "
              f"| {r['grades_per_s']:.1f} | {ideal} | {seen} | {r['out_tokens_per_s']:.0f} "
              f"| ~{math.ceil(64 / r['concurrency']) * r['round_s']:.0f} |")
    if rows:
        print(f"(~{rows[-1]['out_tokens_per_grade']:.0f} output tokens per grade; ok grades: "
              f"{sum(r['ok'] for r in rows)} of {sum(r['requests'] for r in rows)})")


# ---- student ----------------------------------------------------------------------------------------------

def _student_path(name: str, cache_dir: str, scratch: str) -> str:
    if name == "tiny":
        sys.path.insert(0, str(ROOT))
        from tests.conftest import build_tiny_model

        return str(build_tiny_model(Path(scratch) / "tiny-model"))
    if name.startswith("bundled:"):
        from grpo_llm_eval.models import convert_bundled

        return str(convert_bundled(name.removeprefix("bundled:"), cache_dir))
    return name


def _load(name: str, cache_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        path = _student_path(name, cache_dir, scratch)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # in memory: scratch may go
    tok.padding_side = "left"
    return tok, model


def student_rate(name: str, batch: int, new_tokens: int, cache_dir: str, repeats: int = 2) -> dict:
    """Generated tokens/s of `generate` on a batch of chat prompts, sampling exactly new_tokens each (best of repeats)."""
    import torch

    tok, model = _load(name, cache_dir)
    chats = [[{"role": "user", "content": f"What is {i} + {2 * i + 3}? Think, then answer."}] for i in range(batch)]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tok(texts, return_tensors="pt", padding=True)
    best = math.inf
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=2, do_sample=True, pad_token_id=tok.pad_token_id)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                 temperature=1.0, top_k=0, pad_token_id=tok.pad_token_id)
            best = min(best, time.perf_counter() - start)
    generated = (out.shape[1] - enc["input_ids"].shape[1]) * batch
    return {"student": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
            "new_tokens": new_tokens, "prompt_tokens": enc["input_ids"].shape[1], "wall_s": best,
            "tokens_per_s": generated / best}


def print_students(rows: list[dict]) -> None:
    import torch

    print(f"\nStudent: plain generate (sampling), float32, torch threads {torch.get_num_threads()}")
    print("| student | params (M) | batch x new tokens | prompt tokens | wall s | generated tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['student']} | {r['params_m']:.1f} | {r['batch']} x {r['new_tokens']} | {r['prompt_tokens']} "
              f"| {r['wall_s']:.2f} | {r['tokens_per_s']:.0f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-s", type=float, default=2.0, help="loopback teacher server's delay per call")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma list of teacher_max_concurrency values")
    p.add_argument("--min-requests", type=int, default=4, help="requests per level: max(this, 2 x concurrency)")
    p.add_argument("--base-url", help="measure your own OpenAI-compatible teacher instead (key: OPENAI_API_KEY)")
    p.add_argument("--model", default="teacher", help="with --base-url: the served teacher model")
    p.add_argument("--feedback-tokens", type=int, default=512, help="max_feedback_new_tokens of each grade")
    p.add_argument("--skip-teacher", action="store_true")
    p.add_argument("--student", action="append", default=[], help="tiny, bundled:NAME, a Hub id or a folder; repeat")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads for the student (0: torch's default); on a "
                   "shared machine 1 avoids OpenMP threads spinning against other processes")
    p.add_argument("--cache-dir", default=os.environ.get("GRPO_TEST_CACHE", str(Path.home() / ".cache" / "grpo_llm_eval")))
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not a.skip_teacher:
        levels = [int(x) for x in a.concurrency.split(",") if x]
        rows = teacher_table(a.latency_s, levels, a.min_requests, a.base_url, a.model, a.feedback_tokens)
        print_teacher(rows, f"{a.model} at {a.base_url}" if a.base_url
                      else f"loopback TeacherServer (latency {a.latency_s:g} s per call)")
    if a.student:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        print_students([student_rate(s, a.batch, a.new_tokens, a.cache_dir) for s in a.student])


if __name__ == "__main__":
    main()
