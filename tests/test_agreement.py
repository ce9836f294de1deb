"""Decisions taken together by two real processes (gloo on CPU, through accelerate): the time budget, a save that
fails on one process only, the log-prob fallback. Each scenario runs in two spawned processes that must both end
within a bound; a process that waits for a partner that never comes is killed and the test fails."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
from pathlib import Path

END_WITHIN_S = 180  # start-up (torch, accelerate) on 2 busy cores is most of it; the scenarios take a second


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, scenario: str, out: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    result = SCENARIOS[scenario](accelerator, rank)
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    # Leave together: a process that exits while its partner still holds the gloo group can abort the partner's
    # teardown ("terminate called without an active exception", SIGABRT), which has nothing to do with the scenario.
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def run_two(scenario: str, tmp_path: Path) -> list[dict]:
    """SCENARIO on two processes; each one's result. Fails if either has not ended within END_WITHIN_S."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, scenario, str(tmp_path))) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + END_WITHIN_S
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"process(es) {hung} still waiting after {END_WITHIN_S} s (a collective without a partner)"
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]


# ---- scenarios (run inside each process) --------------------------------------------------------------

def _time_budget(accelerator, rank):
    from transformers import TrainerControl, TrainerState

    from grpo_llm_eval.training.agreement import agreed_max
    from grpo_llm_eval.training.callbacks import TimeBudget

    budget = TimeBudget(1.0, agreed_max(accelerator))
    state, control = TrainerState(global_step=3, max_steps=10), TrainerControl()
    budget.on_step_begin(None, state, control)
    if rank == 1:  # this process's clock started a minute earlier (a slow start, a busy node)
        budget._t0 -= 61
    budget.on_step_end(None, state, control)
    return {"stop": control.should_training_stop, "save": control.should_save}


def _signal_on_one(accelerator, rank):
    import signal

    from transformers import TrainerControl, TrainerState

    from grpo_llm_eval.training.agreement import agreed_max
    from grpo_llm_eval.training.callbacks import StopOnSignal

    stopper = StopOnSignal(agreed_max(accelerator))
    if rank == 1:
        stopper.signal_number = signal.SIGTERM  # as its handler records it
    state, control = TrainerState(global_step=3, max_steps=10), TrainerControl()
    stopper.on_step_end(None, state, control)
    return {"stop": control.should_training_stop, "save": control.should_save, "signal": stopper.signal_number,
            "at": stopper.stopped_at}


def _save_fails_on_one(accelerator, rank):
    from grpo_llm_eval.training.agreement import run_agreed
    from grpo_llm_eval.training.checkpoints import SaveError

    def body():
        if rank == 1:
            raise SaveError("writing checkpoint-3 failed: the disk is full")

    try:
        run_agreed(accelerator, body, SaveError, "writing checkpoint-3")
    except SaveError as exc:
        raised = str(exc)
    else:
        raised = None
    return {"raised": raised}


def _fallback_on_one(accelerator, rank):
    from grpo_llm_eval.training.generation_logps import agree_fallback

    reason = "the recorded batch does not match the returned completions" if rank == 1 else None
    return {"fallback": agree_fallback(accelerator, reason)}


SCENARIOS = {"time_budget": _time_budget, "signal_on_one": _signal_on_one, "save_fails_on_one": _save_fails_on_one,
             "fallback_on_one": _fallback_on_one}


class TestStopsAreAgreed:
    def test_a_time_budget_spent_on_one_process_stops_both_at_the_same_step(self, tmp_path):
        """Old code: each process read its own clock, so rank 1 stopped and saved while rank 0 went on."""
        results = run_two("time_budget", tmp_path)
        assert results == [{"stop": True, "save": True}] * 2

    def test_a_signal_on_one_process_stops_both_with_its_number(self, tmp_path):
        results = run_two("signal_on_one", tmp_path)
        assert results == [{"stop": True, "save": True, "signal": 15, "at": 3}] * 2


class TestSaveErrorOnOneProcess:
    def test_both_processes_raise_instead_of_waiting_for_the_failed_one(self, tmp_path):
        """Old code: the process whose write failed raised SaveError; the other went on to wait_for_everyone."""
        results = run_two("save_fails_on_one", tmp_path)
        assert results[1]["raised"].startswith("writing checkpoint-3 failed: the disk is full")
        assert "failed on process 1" in results[0]["raised"]


class TestLogpsFallbackIsAgreed:
    def test_a_fallback_on_one_process_is_taken_by_both(self, tmp_path):
        """Under ZeRO-3/FSDP the fallback's forward pass all-gathers weights: one process alone would hang."""
        results = run_two("fallback_on_one", tmp_path)
        assert [r["fallback"] for r in results] == [
            "another process's recording failed", "the recorded batch does not match the returned completions"]
