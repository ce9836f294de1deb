"""Cost of one grade by the offline default's local teacher: forced-key logprob scores against grammar decoding.

Both arms grade the same verifier-labelled responses (bench/teacher_ok_share.py's, grouped by question as a
GRPO batch is) with the bundled SmolLM2-135M-Instruct in-process, one after the other in this process:

    grammar   the previous offline default: the seed's prompt, JSON-schema grammar, compact grade
              (teacher_structured_output: true, teacher_logprob_scores: false, 64 feedback tokens)
    forced    the offline default now: its task prompt (per-grade text last), forced JSON keys and scores
              read from digit probabilities, 8 tokens of explanation (teacher/backends/local_scores.py)

Prints seconds per grade (model load not counted), the ratio, and each arm's answer ROC AUC.

    python bench/local_grading.py --questions 8 --threads 2
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from teacher_ok_share import responses, roc_auc  # noqa: E402


def grade(cfg, items, threads: int) -> tuple[float, list]:
    from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher
    from grpo_llm_eval.teacher.grading.rubric import Rubric
    from grpo_llm_eval.teacher.types import JudgeRequest

    teacher = LocalTeacher(cfg, Rubric.from_config(cfg), n_threads=threads)

    async def go():
        try:
            await teacher.health_check()
            start = time.perf_counter()
            out = await teacher.judge([JudgeRequest(q, r, t) for _, q, r, t in items])
            return time.perf_counter() - start, out
        finally:
            await teacher.aclose()

    return asyncio.run(go())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = p.parse_args()

    from grpo_llm_eval.config import SEED_EVALUATION_PROMPT
    from grpo_llm_eval.config.load import load_config
    from grpo_llm_eval.data.bundled import read_bundled
    from grpo_llm_eval.verifiers import answer_correct

    base = load_config(None, ["teacher_cache=false"])
    rows = [r for r in read_bundled("arithmetic", "test") if r["answer"].lstrip("-").isdigit()][: args.questions]
    items = responses(rows)
    labels = [bool(answer_correct(r, t)) for _, _, r, t in items]
    arms = {
        "grammar": dataclasses.replace(base, evaluation_prompt=SEED_EVALUATION_PROMPT, teacher_structured_output=True,
                                       teacher_logprob_scores=False, max_feedback_new_tokens=64),
        "forced": base,
    }
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {len(items)} grades per arm, "
          f"{args.threads} llama.cpp threads")
    per_grade = {}
    for name, cfg in arms.items():
        wall, judgements = grade(cfg, items, args.threads)
        per_grade[name] = wall / len(items)
        ok = [(j.scores["answer"], y) for j, y in zip(judgements, labels, strict=True) if j.ok]
        auc = roc_auc([s for s, _ in ok], [y for _, y in ok])
        print(f"{name:8s} {per_grade[name]:.3f} s/grade  ok {len(ok)}/{len(items)}  answer AUC "
              f"{'n/a' if auc is None else f'{auc:.2f}'}")
    print(f"forced / grammar time per grade: {per_grade['forced'] / per_grade['grammar']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
