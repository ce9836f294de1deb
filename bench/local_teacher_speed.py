"""The offline default's local teacher before and after issue 27, side by side in one process on the same grades.

Arms, each its own in-process bundled SmolLM2-135M-Instruct (llama.cpp), run in turn question by question
(the arm order rotates each question), so that a noisy shared machine slows them alike:

    today      the forced-key scorer as committed at --baseline (git show), with the offline default of then:
               8 explanation tokens; the "1" of "10" read in a one-token llama.cpp decode of its own
    explained  the scorer now, with the same 8 explanation tokens: a criterion in one decode
    now        the offline default now: the scorer now, no explanation (max_feedback_new_tokens: 0)

The grades: for each of --questions bundled arithmetic test problems, two right and two wrong answers
(bench/teacher_ok_share.py's, labelled by the verifier), graded pointwise, as a GRPO group is. Prints seconds
per grade (model load not counted) and each arm's ratio to today, how far its scores are from today's (max
absolute difference, and the share of grades whose written integers are today's), whether `now` and
`explained` give identical scores (they differ only in the explanation), and each arm's answer ROC AUC.

    PYTHONPATH=src python bench/local_teacher_speed.py --questions 8 --threads 1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from teacher_ok_share import responses, roc_auc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCORER = "src/grpo_llm_eval/teacher/backends/local_scores.py"
BASELINE = "c4b5ca1"  # the branch point of issue 27 (main when it was rebased)


def scorer_module_at(rev: str):
    """local_scores.py as committed at REV, imported as a module of its own."""
    text = subprocess.run(["git", "show", f"{rev}:{SCORER}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_local_scores.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("baseline_local_scores", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def teachers(threads: int, baseline: str) -> dict:
    from grpo_llm_eval.config.load import load_config
    from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher
    from grpo_llm_eval.teacher.grading.rubric import Rubric

    now = load_config(None, ["teacher_cache=false"])
    explained = load_config(None, ["teacher_cache=false", "max_feedback_new_tokens=8"])
    arms = {name: LocalTeacher(cfg, Rubric.from_config(cfg), n_threads=threads)
            for name, cfg in (("today", explained), ("explained", explained), ("now", now))}
    for teacher in arms.values():
        teacher.load()
    old = scorer_module_at(baseline)
    today = arms["today"]
    today._scorer = old.ForcedScorer(today._llm, today.rubric, today.cfg.max_feedback_new_tokens)
    return arms


def written(raw: str) -> tuple:
    return tuple(v for k, v in json.loads(raw).items() if k != "explanation")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="llama.cpp threads per arm")
    p.add_argument("--baseline", default=BASELINE, help="git revision of today's scorer")
    args = p.parse_args()

    from grpo_llm_eval.data.bundled import read_bundled
    from grpo_llm_eval.teacher.types import JudgeRequest
    from grpo_llm_eval.verifiers import answer_correct

    rows = [r for r in read_bundled("arithmetic", "test") if r["answer"].lstrip("-").isdigit()][: args.questions]
    items = responses(rows)
    labels = [bool(answer_correct(r, t)) for _, _, r, t in items]
    arms = teachers(args.threads, args.baseline)
    names = list(arms)
    wall = dict.fromkeys(names, 0.0)
    grades: dict[str, list] = {n: [] for n in names}
    for g in range(len(rows)):
        group = [JudgeRequest(q, r, t) for i, q, r, t in items if i == g]
        for name in names[g % len(names):] + names[: g % len(names)]:
            start = time.perf_counter()
            grades[name].extend(arms[name].grade_now(group))
            wall[name] += time.perf_counter() - start
    for teacher in arms.values():
        teacher.close_now()

    n = len(items)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (1/5/15 min) at the end; {n} grades per arm, "
          f"{args.threads} llama.cpp thread(s) per arm; baseline {args.baseline}")
    base = grades["today"]
    print("arm        s/grade  x today  max|score-today|  integers as today  ok   answer AUC")
    for name in names:
        js = grades[name]
        ok = [(j.scores["answer"], y) for j, y in zip(js, labels, strict=True) if j.ok]
        auc = roc_auc([s for s, _ in ok], [y for _, y in ok])
        both = [(j, b) for j, b in zip(js, base, strict=True) if j.ok and b.ok]
        diff = max((abs(j.scores[k] - b.scores[k]) for j, b in both for k in j.scores), default=float("nan"))
        same = sum(written(j.raw) == written(b.raw) for j, b in both) / max(1, len(both))
        print(f"{name:10s} {wall[name] / n:7.3f}  {wall[name] / wall['today']:7.2f}  {diff:16.4f}  {same:17.0%}  "
              f"{len(ok)}/{n}  {'n/a' if auc is None else f'{auc:.3f}'}")
    identical = all(a.scores == b.scores for a, b in zip(grades["now"], grades["explained"], strict=True))
    print(f"now vs explained: scores identical: {identical}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
