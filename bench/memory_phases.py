"""Peak resident memory of the offline default, per phase: what `/usr/bin/time -v` reports as one number, split.

Runs ``grpo_llm_eval --set total_steps=N`` (any further --set too) as a child in a scratch folder and samples
the resident memory (VmRSS, /proc) of it and of each process under it every 0.1 s. Phases are the log lines
the run writes (data, teacher check, teacher loaded, student loaded, each step, saved); a sample belongs to the
phase whose line came last. Prints, per phase, the peak of the main process and of the largest other process
(the teacher check and the answer-check worker are children), and the main process's VmHWM at the end (the peak
`/usr/bin/time -v` gives). Linux only.

    PYTHONPATH=src python bench/memory_phases.py                   # total_steps=2, ~2-3 min on 2 cores
    PYTHONPATH=src python bench/memory_phases.py --set max_feedback_new_tokens=8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PHASES = [  # (what runs after a log line, the line's pattern): the first match of each, in order
    ("teacher check in a child, teacher load", r"grpo_llm_eval\.data: "),
    ("student load, trainer build, step 1", r"Local teacher\b.*threads"),
    ("step 2", r"step 1/"),
    ("step 3 on, saving", r"step 2/"),
    ("after training", r"Teacher spend|Done:"),
]


def status_kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) if m else 0


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = []
        for task in Path(f"/proc/{p}/task").glob("*"):  # a child started from a worker thread is listed under it
            try:
                kids += (task / "children").read_text().split()
            except OSError:
                continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--set", action="append", default=[], dest="sets", help="more --set KEY=VALUE for the run")
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="memory_phases_"))
    cmd = [shutil.which("grpo_llm_eval") or "grpo_llm_eval", "--set", f"total_steps={args.steps}"]
    for s in args.sets:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, cwd=scratch, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    phase = ["imports, config, data"]
    peaks: dict[str, list[int]] = {phase[0]: [0, 0]}
    order = [phase[0]]
    timeline: list[tuple[float, int]] = []  # (time, main RSS kB)
    step_ends: dict[int, float] = {}
    step_lines: list[str] = []
    hwm = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            main_kb = status_kb(proc.pid, "VmRSS")
            hwm[0] = max(hwm[0], status_kb(proc.pid, "VmHWM"))
            other = max((status_kb(k, "VmRSS") for k in descendants(proc.pid)), default=0)
            timeline.append((time.monotonic(), main_kb))
            peak = peaks[phase[0]]
            peak[0], peak[1] = max(peak[0], main_kb), max(peak[1], other)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    pending = list(PHASES)
    for line in proc.stderr:
        step = re.search(r"step (\d+)/\d+ ", line)
        if step:
            step_ends[int(step.group(1))] = time.monotonic()
            step_lines.append(line.strip())
        for i, (name, pattern) in enumerate(pending):
            if re.search(pattern, line):
                phase[0] = name
                peaks.setdefault(name, [0, 0])
                order.append(name)
                del pending[: i + 1]
                break
    rc = proc.wait()
    done.set()
    sampler.join()
    metrics = sorted(scratch.glob("runs/*/metrics.jsonl"))
    rows = [json.loads(x) for x in metrics[0].read_text().splitlines()] if metrics else []
    shutil.rmtree(scratch, ignore_errors=True)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; run: {' '.join(cmd[1:])}; exit {rc}")
    print("phase (after its first log line)          main peak MB   largest child MB")
    for name in order:
        main_kb, other = peaks[name]
        print(f"{name:41s} {main_kb / 1024:12.0f}   {other / 1024:16.0f}")
    # Within a step, by its timings in metrics.jsonl (generate, then judge, then the update; no judging ahead).
    for row in rows:
        k, end = row.get("step"), step_ends.get(row.get("step"))
        if end is None or "time/step_s" not in row:
            continue
        t = end - row["time/step_s"]
        for part, key in (("generate", "time/generate_s"), ("judge", "time/judge_wait_s"), ("update", None)):
            until = end if key is None else t + row.get(key, 0.0)
            got = [kb for when, kb in timeline if t <= when < until]
            if got:
                print(f"  step {k} {part:9s} ({until - t:5.1f} s)             {max(got) / 1024:12.0f}")
            t = until
    print("\n".join(step_lines))
    print(f"main process VmHWM (the peak /usr/bin/time -v reports): {hwm[0] / 1024:.0f} MB")
    return rc


if __name__ == "__main__":
    sys.exit(main())
