"""Pointwise vs group judging against llama.cpp's server on the bundled SmolLM2-135M (a real, weak teacher).

The responses of `bench/teacher_ok_share.py` (per bundled test problem: two right and two wrong answers, with and
without a think block: one group of 4), graded with structured output (the server takes the schema as
json_object; a grammar fixes a group's labels) in two arms through the real teacher: `judge_mode: pointwise` and
`judge_mode: group`. Printed per arm: calls, prompt and completion tokens (the server's usage, SmolLM2's
tokenizer), the share of `ok` grades, the wall time of grading, and the ROC AUC of the answer score against the
verifier's labels (0.5 is chance); then the group/pointwise ratios. The server grades one request at a time.

    python bench/group_llamacpp.py --questions 8
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from grpo_llm_eval.config import Config  # noqa: E402
from grpo_llm_eval.data.bundled import read_bundled  # noqa: E402
from grpo_llm_eval.teacher import build_teacher  # noqa: E402
from grpo_llm_eval.teacher.grading.rubric import Rubric  # noqa: E402
from grpo_llm_eval.teacher.types import JudgeRequest  # noqa: E402
from grpo_llm_eval.verifiers import answer_correct  # noqa: E402
from teacher_ok_share import responses, roc_auc  # noqa: E402
from teacher_queue import ALIAS, start_server  # noqa: E402


def arm(url: str, mode: str, requests: list[JudgeRequest], labels: list[bool], feedback_tokens: int) -> dict:
    cfg = Config(teacher_backend="openai", teacher_model_name=ALIAS, openai_base_url=url, judge_mode=mode,
                 num_return_sequences=4, teacher_structured_output=True, max_feedback_new_tokens=feedback_tokens,
                 teacher_timeout_s=600, teacher_max_retries=1, teacher_max_concurrency=4, teacher_cache=False)
    teacher = build_teacher(cfg, Rubric.from_config(cfg))

    async def go():
        try:
            await teacher.health_check()
            before = teacher.usage.usage
            start = time.perf_counter()
            judgements = await teacher.judge(requests)
            return judgements, time.perf_counter() - start, teacher.usage.usage - before
        finally:
            await teacher.aclose()

    judgements, wall, usage = asyncio.run(go())
    ok = [(j.scores["answer"], y) for j, y in zip(judgements, labels, strict=True) if j.ok]
    statuses = {}
    for j in judgements:
        statuses[j.status] = statuses.get(j.status, 0) + 1
    return {"calls": usage.calls, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "ok": len(ok) / len(judgements), "wall_s": wall, "statuses": statuses,
            "auc": roc_auc([s for s, _ in ok], [y for _, y in ok])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--feedback-tokens", type=int, default=192)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    items = responses(read_bundled("arithmetic", "test")[:a.questions])
    requests = [JudgeRequest(q, text, truth) for _, q, text, truth in items]
    labels = [bool(answer_correct(text, truth, "</think>")) for _, _, text, truth in items]
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp) / "server.log", a.threads)
        try:
            results = {mode: arm(url, mode, requests, labels, a.feedback_tokens) for mode in ("pointwise", "group")}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"batch: {len(requests)} responses of {a.questions} questions (groups of 4); structured output; "
          f"max_feedback_new_tokens {a.feedback_tokens}; llama.cpp threads {a.threads}")
    for mode, r in results.items():
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.2f}"
        print(f"{mode:9s} calls {r['calls']:3d}  prompt_tokens {r['prompt_tokens']:6d}  completion_tokens "
              f"{r['completion_tokens']:5d}  ok {r['ok']:.0%}  wall_s {r['wall_s']:.1f}  answer_auc {auc}  "
              f"statuses {r['statuses']}")
    g, pw = results["group"], results["pointwise"]
    for key in ("calls", "prompt_tokens", "completion_tokens", "wall_s"):
        print(f"ratio_group_vs_pointwise {key} {g[key] / max(1e-9, pw[key]):.3f}")


if __name__ == "__main__":
    main()
