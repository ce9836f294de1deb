"""Helpers of the reliability tests: the CLI in a subprocess, a closed port, a tiny in-process run."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from grpo_llm_eval.config import Config
from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CliResult:
    rc: int
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict | None = None, cwd: str | Path | None = None, timeout: float = 300) -> CliResult:
    """`grpo_llm_eval ARGS` in a fresh interpreter, as a user runs it."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "grpo_llm_eval.cli", *args], capture_output=True, text=True,
                          env=env or cli_env(), cwd=cwd or ROOT, timeout=timeout, errors="replace")
    return CliResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def sets(pairs: list[str]) -> list[str]:
    """--set KEY=VALUE arguments."""
    return [arg for pair in pairs for arg in ("--set", pair)]


def tiny_cfg(tiny_model: str, out: Path, url: str, **extra):
    """A tiny one-prompt, two-completion run against the teacher at URL."""
    settings = dict(prompts_per_step=1, num_return_sequences=2, max_new_tokens=4, save_steps=100,
                    teacher_cache=False, openai_base_url=url)
    settings.update(extra)
    return load_config(None, tiny_overrides(tiny_model, out, **settings))


def teacher_at(url: str, **overrides) -> OpenAITeacher:
    settings = {"teacher_timeout_s": 5.0, "teacher_max_retries": 0, **overrides}
    cfg = Config(teacher_backend="openai", teacher_model_name="teacher", openai_base_url=url, **settings)
    return OpenAITeacher(cfg, Rubric.from_config(cfg), backoff_base_s=0.05)


def run_async(teacher, coro_fn):
    """Run `coro_fn()` on a fresh loop and close the teacher's client there."""
    async def go():
        try:
            return await coro_fn()
        finally:
            await teacher.aclose()
    return asyncio.run(go())


def rows_by_step(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(r["step"], []).append(r)
    return out
