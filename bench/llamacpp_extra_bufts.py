"""What the portable llama.cpp load costs: the offline default's local grading with ggml's extra buffer types
(AMX, weight repacking; llama.cpp's default) against without them (this project's default since they crashed
a VM whose CPU reports AMX; teacher/backends/llamacpp.py).

Both teachers are loaded side by side in this process on the bundled SmolLM2-135M-Instruct and grade the
same responses (bench/teacher_ok_share.py's, 4 per question as a GRPO group) in rounds, each arm first in every
other round, so machine noise and order fall on both alike. Prints seconds per grade for each (mean and best
round: the best round is the one least disturbed by other work on the machine), the ratios, and whether the
scores agree. The model's buffers are logged by llama.cpp with --verbose.
On a CPU that reports AMX the "llama.cpp default" arm may crash the process: that is the bug, run it elsewhere.

    python bench/llamacpp_extra_bufts.py --questions 8 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from teacher_ok_share import responses  # noqa: E402


def cpu_flags() -> str:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    model = re.search(r"model name\s*:\s*(.*)", text)
    amx = sorted(set(re.findall(r"\bamx\w*", text)))
    return f"{model.group(1) if model else 'unknown CPU'}; AMX flags: {' '.join(amx) or 'none'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    p.add_argument("--verbose", action="store_true", help="llama.cpp's load log (buffer types and sizes)")
    args = p.parse_args()

    from grpo_llm_eval.config.load import load_config
    from grpo_llm_eval.data.bundled import read_bundled
    from grpo_llm_eval.teacher.backends.llamacpp import ENV_EXTRA_BUFTS
    from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher
    from grpo_llm_eval.teacher.grading.rubric import Rubric
    from grpo_llm_eval.teacher.types import JudgeRequest

    cfg = load_config(None, ["teacher_cache=false"])
    rubric = Rubric.from_config(cfg)
    rows = [r for r in read_bundled("arithmetic", "test") if r["answer"].lstrip("-").isdigit()][: args.questions]
    requests = [JudgeRequest(q, r, t) for _, q, r, t in responses(rows)]

    # The default arm first: with the variable set, loading does not install the portable defaults.
    os.environ[ENV_EXTRA_BUFTS] = "1"
    default = LocalTeacher(cfg, rubric, n_threads=args.threads, verbose=args.verbose)
    llm_default = default.load()
    del os.environ[ENV_EXTRA_BUFTS]
    portable = LocalTeacher(cfg, rubric, n_threads=args.threads, verbose=args.verbose)
    llm_portable = portable.load()
    teachers = {"llama.cpp default (extra bufts on)": default, "portable (extra bufts off)": portable}
    assert llm_default.model_params.use_extra_bufts and not llm_portable.model_params.use_extra_bufts

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {cpu_flags()}")
    print(f"{len(requests)} grades per round, {args.rounds} rounds, {args.threads} llama.cpp threads, "
          f"offline default's forced-key grading")
    rounds = {name: [] for name in teachers}
    scores = {}
    names = list(teachers)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # each arm goes first in every other round
            teacher = teachers[name]
            start = time.perf_counter()
            judgements = teacher.grade_now(requests)
            rounds[name].append((time.perf_counter() - start) / len(requests))
            scores[name] = [j.scores.get("answer") for j in judgements]
    mean = {name: sum(v) / len(v) for name, v in rounds.items()}
    best = {name: min(v) for name, v in rounds.items()}
    for name in teachers:
        print(f"{name:36s} mean {mean[name]:.3f} s/grade, best round {best[name]:.3f} s/grade")
    on, off = mean.values()
    best_on, best_off = best.values()
    print(f"portable / default time per grade: mean {off / on:.2f}, best round {best_off / best_on:.2f}")
    a, b = scores.values()
    diff = max(abs(x - y) for x, y in zip(a, b, strict=True) if x is not None and y is not None)
    print(f"largest difference of an answer score between the arms: {diff:.4f}")
    for teacher in teachers.values():
        teacher.close_now()
    return 0


if __name__ == "__main__":
    sys.exit(main())
