"""Two data-parallel CPU processes (gloo) where a stop reaches one process only: SIGTERM to rank 1 alone, as a
preempted node gets. Both processes must stop at the same step, save one checkpoint together and end with the
same weights (issue 26 item 1)."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time

import pytest

from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training import checkpoints
from grpo_llm_eval.training.records import read_jsonl
from tests.conftest import tiny_overrides
from tests.test_multiprocess import ROOT, cpu_launch

STEPS, GROUP = 30, 4  # far more steps than the test waits for: the stop, not the end, must finish the run
TIMEOUT_S = 300  # start-up about 30 s on 2 busy cores, then a step of about 1 s; the stop takes one step


def _worker(launcher, rank: int, deadline: float):
    """The worker process of RANK under the launcher (found by the RANK torchrun gives it)."""
    import psutil

    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "grpo_llm_eval.cli" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no worker of rank {rank} appeared")


def _kill_tree(proc) -> None:
    import psutil

    try:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.Error:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass


@pytest.fixture(scope="module")
def stopped(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess-stop")
    out, digests = base / "runs", base / "digests"
    run = out / "run"
    # Latency: a step waits about 1 s for its grades, so the signal lands while the run is well under way.
    with TeacherServer(mode="scripted", latency_s=0.5) as server:
        overrides = tiny_overrides(tiny_model, out, openai_base_url=server.base_url, total_steps=STEPS,
                                   prompts_per_step=1, num_return_sequences=GROUP, save_steps=1000,
                                   teacher_max_retries=0, teacher_timeout_s=30, sft_beta=1.0, judge_ahead_steps=0)
        cmd, env = cpu_launch(overrides, digests, 2)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
        reader.start()
        start = time.monotonic()
        try:
            rank1 = _worker(proc, 1, start + TIMEOUT_S)
            metrics = run / "metrics.jsonl"
            while not (metrics.is_file() and any("loss" in m for m in read_jsonl(metrics))):
                assert proc.poll() is None and time.monotonic() - start < TIMEOUT_S, "".join(output)[-4000:]
                time.sleep(0.2)
            rank1.send_signal(signal.SIGTERM)  # rank 1 alone
            signalled = time.monotonic()
            try:
                rc = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = None
            ended_s = time.monotonic() - signalled
        finally:
            _kill_tree(proc)
            proc.wait()
            reader.join(timeout=10)
    return {"rc": rc, "output": "".join(output), "run": run, "digests": digests, "ended_s": ended_s}


class TestStopOnOneProcess:
    def test_sigterm_to_one_rank_stops_both_at_one_step_with_a_checkpoint_and_equal_weights(self, stopped):
        """Old code: rank 1 stopped and went to save while rank 0 went on to the next step; gloo failed with a
        collective mismatch, rank 1 aborted, the launcher killed rank 0, and no checkpoint was written."""
        out = stopped["output"]
        assert stopped["rc"] is not None, f"no exit within {TIMEOUT_S} s of the signal (hung):\n{out[-4000:]}"
        assert stopped["ended_s"] < 120, f"took {stopped['ended_s']:.0f} s to stop"
        assert "collective mismatch" not in out and "SIGABRT" not in out, out[-4000:]
        assert "Another process received SIGTERM" in out, out[-4000:]  # rank 0 learnt of rank 1's signal
        assert "stopped by SIGTERM" in out, out[-4000:]
        saved = checkpoints.checkpoints(stopped["run"])
        assert len(saved) == 1, saved  # save_steps is far away: only the stop saved
        step = checkpoints.step_of(saved[0])
        assert 1 <= step < STEPS
        assert checkpoints.read_state(saved[0])["global_step"] == step
        digests = [json.loads((stopped["digests"] / f"rank-{i}.json").read_text()) for i in range(2)]
        assert [d["global_step"] for d in digests] == [step, step]
        assert len({d["end"] for d in digests}) == 1, "the processes' weights diverged"
        assert digests[0]["end"] != digests[0]["begin"]
