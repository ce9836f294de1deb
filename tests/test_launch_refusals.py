"""Launches that cannot do what their accelerate config says are refused before anything is loaded or written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.test_multiprocess import ACCELERATE_CONFIGS, ROOT, _free_port


@pytest.mark.parametrize("use_cpu", ["", "1"])
def test_fsdp2_config_without_gpus_is_refused_in_one_line(tmp_path, use_cpu):
    """Old code: without ACCELERATE_USE_CPU, two independent single-process runs (`rank 0 of 1`, twice) trained
    into one run folder; with it, plain DDP, though FSDP was asked for."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "fsdp2.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
           "-m", "grpo_llm_eval.cli", "train", "--set", f"output_dir={out}", "--set", "run_name=run",
           "--set", f"student_model_name={tmp_path / 'no-such-model'}", "--set", "teacher_weight=0",
           "--set", "verifier_answer_weight=1.0"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": use_cpu}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("config error:")]
    assert errors and all("FSDP" in e and "cpu_2proc.yaml" in e for e in errors), output[-3000:]
    assert "no-such-model" not in output  # refused before the student was looked for
    assert not (out / "run").exists()
