"""What cannot be had offline fails fast with one clear line, exit code 1, and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from grpo_llm_eval.testing.teacher_server import TeacherServer
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    res = subprocess.run([sys.executable, "-m", "grpo_llm_eval.cli", *args], capture_output=True, text=True,
                         timeout=timeout, env=env)
    return res, time.time() - start


def error_lines(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("error")]


class TestOffline:
    def test_example_config_without_dry_run_fails_fast_with_a_clear_message(self, tmp_path):
        res, took = run_cli("--config", str(ROOT / "configs/example.yaml"), "--set", f"output_dir={tmp_path}")
        assert res.returncode == 1
        assert "Traceback" not in res.stderr
        [line] = error_lines(res)
        assert "open-r1/OpenR1-Math-220k" in line or "teacher" in line
        assert took < 90

    def test_a_student_that_cannot_be_had_offline_names_it_and_the_way_out(self, tmp_path):
        with TeacherServer(mode="scripted") as server:
            sets = tiny_overrides("some-org/not-a-cached-model", tmp_path, openai_base_url=server.base_url)
            res, _ = run_cli(*[a for s in sets for a in ("--set", s)])
        assert res.returncode == 1 and "Traceback" not in res.stderr
        [line] = error_lines(res)
        assert "some-org/not-a-cached-model" in line and "bundled:smollm2-135m-instruct" in line

    def test_an_unknown_bundled_model_lists_the_bundled_ones(self, tmp_path):
        with TeacherServer(mode="scripted") as server:
            sets = tiny_overrides("bundled:gpt-5", tmp_path, openai_base_url=server.base_url)
            res, _ = run_cli(*[a for s in sets for a in ("--set", s)])
        assert res.returncode == 1
        [line] = error_lines(res)
        assert "bundled:gpt-5" in line and "bundled:smollm2-135m-instruct" in line
