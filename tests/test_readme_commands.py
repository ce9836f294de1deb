"""The README's commands run as written (read from the README itself, so the text and the test cannot drift)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_llm_eval.teacher.backends.local_backend import usable_cores

ROOT = Path(__file__).resolve().parents[1]


def readme_command(starts_with: str) -> str:
    """The README's shell command that starts with STARTS_WITH, continuation lines joined."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(starts_with):
            command = []
            while True:
                text = lines[i].split("  #")[0].strip()
                command.append(text.rstrip("\\").strip())
                if not text.endswith("\\"):
                    return " ".join(command)
                i += 1
    raise AssertionError(f"the README has no command starting with {starts_with!r}")


@pytest.mark.slow
class TestTwoProcessCpuCommand:
    def test_the_readmes_two_process_cpu_command_finishes_with_each_process_on_its_share_of_the_cores(self, tmp_path):
        """Before: each process's local teacher took every core (2 llama.cpp threads each on 2 cores, beside
        torch) and both spun at OpenMP barriers: no step written after 8 minutes. Now each takes its share."""
        command = readme_command("ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/cpu_2proc")
        (tmp_path / "configs").symlink_to(ROOT / "configs")  # the command's paths are the repository's
        env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])}
        env.pop("OMP_NUM_THREADS", None)  # as a user's shell has it: torchrun decides
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1200)
        assert proc.returncode == 0, proc.stderr[-4000:]
        threads = [int(n) for n in re.findall(r"Local teacher\b[^\n]*?(\d+) llama\.cpp threads", proc.stderr)]
        assert threads == [max(1, usable_cores() // 2)] * 2, proc.stderr[-4000:]
        (run,) = (tmp_path / "runs").iterdir()
        assert (run / "final" / "config.json").is_file()
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if '"step"' in line]
        assert 1 in steps
