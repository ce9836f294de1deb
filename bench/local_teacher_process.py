"""The offline default's local teacher beside torch: in the trainer's process (before) against a process of its own
(now, teacher/backends/local_worker.py), side by side in one process, on the student's own batches.

The process imports torch and keeps its OpenMP threads working between batches, as the trainer does between two
steps' grading (a forward and backward pass of a small MLP, for --torch-seconds). Each batch (4 prompts x 8 of the
bundled student's completions, bench/assets/group_judging_batches.jsonl) is graded by both arms in turn, the order
alternating batch by batch, through the backend's async `judge` as the reward function calls it:

    thread   LocalTeacher(..., process=False): the model in this process, grading in a worker thread (as before)
    process  LocalTeacher(..., process=True): the model in a child process (what build_teacher now makes)

Prints seconds per grade per arm, the ratio, and whether the two arms gave identical scores. Model loads are not
timed. Both arms use the offline default's threads (all cores: the teacher grades while torch waits).

    PYTHONPATH=src python bench/local_teacher_process.py                 # 3 batches x 2 rounds, ~2 min on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

ASSET = Path(__file__).resolve().parent / "assets" / "group_judging_batches.jsonl"


def torch_work(seconds: float) -> None:
    """Keep torch's OpenMP threads busy for about SECONDS, as a training step does."""
    import torch

    net = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(), torch.nn.Linear(4096, 1024))
    x = torch.randn(256, 1024)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        net(x).square().mean().backward()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=3, help="batches of 32 completions from the asset file (at most 3)")
    p.add_argument("--rounds", type=int, default=2, help="times each batch is graded by each arm")
    p.add_argument("--torch-seconds", type=float, default=2.0)
    a = p.parse_args()

    import torch

    from grpo_llm_eval.config.load import load_config
    from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher
    from grpo_llm_eval.teacher.grading.rubric import Rubric
    from grpo_llm_eval.teacher.types import JudgeRequest

    rows = [json.loads(line) for line in ASSET.read_text().splitlines()]
    batches = [[JudgeRequest(r["question"], r["response"], r["ground_truth"]) for r in rows if r["batch"] == b]
               for b in range(a.batches)]
    cfg = load_config(None, ["teacher_cache=false"])
    arms = {"thread": LocalTeacher(cfg, Rubric.from_config(cfg)),
            "process": LocalTeacher(cfg, Rubric.from_config(cfg), process=True)}
    arms["thread"].check_first_in_child = False
    seconds = dict.fromkeys(arms, 0.0)
    grades = dict.fromkeys(arms, 0)
    scores: dict[str, list] = {name: [] for name in arms}

    async def go():
        for teacher in arms.values():
            await teacher.health_check()
        torch_work(a.torch_seconds)
        for r in range(a.rounds):
            for b, batch in enumerate(batches):
                order = list(arms) if (r + b) % 2 == 0 else list(reversed(arms))
                for name in order:
                    torch_work(a.torch_seconds)
                    start = time.perf_counter()
                    judged = await arms[name].judge(batch)
                    seconds[name] += time.perf_counter() - start
                    grades[name] += len(judged)
                    if r == 0:
                        scores[name].extend(j.scores for j in judged)
        for teacher in arms.values():
            await teacher.aclose()

    asyncio.run(go())
    per = {name: seconds[name] / grades[name] for name in arms}
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads "
                                 f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}",
                      "grades_per_arm": grades["thread"], "s_per_grade": {k: round(v, 3) for k, v in per.items()},
                      "process_vs_thread": round(per["process"] / per["thread"], 3),
                      "identical_scores": scores["thread"] == scores["process"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
