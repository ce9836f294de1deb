"""Run records: rollouts.jsonl (one object per completion) and metrics.jsonl (one per logged step).

Records are appended, flushed and fsynced when their step ends. Only the main process writes; the other
processes' completions reach it through accelerate's gather, so the file still holds every completion.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

logger = logging.getLogger(__name__)


def _clean(value):
    """JSON-safe value: NaN/inf become null; text keeps valid UTF-8 (lone surrogates replaced)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def dumps(obj: dict) -> str:
    """One JSONL line; ensure_ascii keeps control characters and odd bytes escaped, so a line is always valid."""
    return json.dumps(_clean(obj), ensure_ascii=True, allow_nan=False)


class JsonlWriter:
    """Append-only JSONL file, flushed and fsynced on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run

    def write_many(self, rows: list[dict]) -> None:
        if rows:
            self._fh.write("".join(dumps(r) + "\n" for r in rows))

    def sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        if not self._fh.closed:
            self.sync()
            self._fh.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file, skipping a torn (unparseable) line such as the last one after a crash."""
    rows = []
    p = Path(path)
    if not p.exists():
        return rows
    # newline="\n": a row ends at "\n" only, not at a raw "\r" that JSON allows inside a string.
    with open(p, encoding="utf-8", errors="replace", newline="\n") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line, strict=False))  # raw control characters in strings are fine
            except json.JSONDecodeError:
                logger.warning("%s: skipping unreadable line %d (torn write?)", p, number)
    return rows


class RolloutRecorder:
    """Collects each generation batch's completions with their grades; writes them when the step ends."""

    def __init__(self, run_dir: Path, num_generations: int, is_main: bool = True):
        self.num_generations = num_generations
        self.is_main = is_main
        self.writer = JsonlWriter(Path(run_dir) / "rollouts.jsonl") if is_main else None
        self._local: list[dict] = []
        self._ready: list[dict] = []
        self.last_batch: list[dict] = []  # this process's records of the last generation batch (SFT reads it)

    def add_local(self, prompts, questions, texts, truths, judgements, rows) -> None:
        """Called by the reward function with this process's completions, in TRL's order."""
        for prompt, q, text, truth, j, row in zip(prompts, questions, texts, truths, judgements, rows, strict=True):
            self._local.append({
                "prompt": prompt, "question": q, "completion": text, "ground_truth": truth,
                "scores": None if j is None else j.scores, "feedback": None if j is None else j.feedback,
                "judge_status": None if j is None else j.status,
                "judge_latency_s": None if j is None else j.latency_s,
                "judge_attempts": None if j is None else j.attempts, "cached": None if j is None else j.cached,
                # the teacher call's tokens attributed to this completion; a cached grade cost nothing
                "judge_usage": None if j is None or j.cached else j.extra.get("usage"),
                # the teacher call that graded it (judge_mode group: shared by its group; "a+b" with two passes)
                "judge_call_id": None if j is None else j.extra.get("call_id"),
                **row,
            })

    def finish_batch(self, advantages: list[float], step: int, gather=None) -> None:
        """Attach advantages (this process's slice), gather every process's records, queue them for STEP."""
        local = self._local
        self._local = []
        for rec, adv in zip(local, advantages, strict=True):
            rec["advantage"] = None if rec["reward"] is None else float(adv)
        self.last_batch = local
        everything = gather(local) if gather is not None else local
        for i, rec in enumerate(everything):
            rec["step"] = step
            rec["group"] = i // self.num_generations
            rec["index"] = i
        if self.is_main:
            self._ready.extend(everything)

    def flush(self) -> int:
        """Write the queued records and fsync; returns how many were written."""
        if not self.is_main or not self._ready:
            return 0
        rows, self._ready = self._ready, []
        order = ("step", "group", "index", "prompt", "question", "completion", "ground_truth", "scores", "feedback",
                 "judge_status", "reward", "advantage")
        self.writer.write_many([{k: r.get(k) for k in order} | r for r in rows])
        self.writer.sync()
        return len(rows)

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.close()
