"""Trainer callbacks: write records and metrics when a step ends, stop on failed grades, plain progress lines,
and per-process weight digests for multi-process checks."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from grpo_llm_eval.training.records import JsonlWriter

logger = logging.getLogger(__name__)


class RecordsCallback(TrainerCallback):
    """Flushes rollouts when each step ends and appends every log to metrics.jsonl (main process only)."""

    def __init__(self, recorder, run_dir: Path, is_main: bool):
        self.recorder = recorder
        self.metrics = JsonlWriter(Path(run_dir) / "metrics.jsonl") if is_main else None
        self._t0 = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        self.recorder.flush()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.metrics is None or not logs:
            return
        row = {"step": state.global_step, "time": round(time.time() - self._t0, 3)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str)) or v is None})
        self.metrics.write_many([row])
        self.metrics.sync()

    def write_event(self, row: dict) -> None:
        """An event row (a judge alarm, say) in metrics.jsonl, written at once."""
        if self.metrics is not None:
            self.metrics.write_many([{**row, "time": round(time.time() - self._t0, 3)}])
            self.metrics.sync()

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.flush()
        if self.metrics is not None:
            self.metrics.sync()


class StepTimer(TrainerCallback):
    """Where each step's time went, as metrics: time/{generate,old_logps,judge,judge_wait,judge_overlap,sft,train,step}_s.

    judge_s is the judging of the batch this step trained, start to finish; judge_wait_s the part of it the
    step waited for; judge_overlap_s the rest, hidden behind other work. train_s is the step minus generation
    and scoring (forward, backward and optimizer; the SFT term's forward is also counted in sft_s).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self._t0 = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        times = self.trainer.times
        step = time.perf_counter() - self._t0
        out = {f"time/{k}": v for k, v in times.items() if k != "prepare_s"}
        out["time/judge_overlap_s"] = max(0.0, times.get("judge_s", 0.0) - times.get("judge_wait_s", 0.0))
        out["time/train_s"] = max(0.0, step - times.get("prepare_s", 0.0))
        out["time/step_s"] = step
        for name, value in out.items():
            self.trainer._metric(name, value)
        self.trainer.observe_step(step, times)
        times.clear()


class TimeBudget(TrainerCallback):
    """Stop after MINUTES of training, counted from the start of the first step, with a checkpoint.

    Each process has its own clock; AGREE (training/agreement.py, one all-reduce at every step end) makes the
    first process whose budget is spent stop every process at the same step, or one would go to save while
    another went on to the next step's collectives.
    """

    def __init__(self, minutes: float, agree=None):
        self.seconds = minutes * 60
        self.agree = agree
        self._t0: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        spent = int(self._t0 is not None and time.perf_counter() - self._t0 >= self.seconds)
        if self.agree is not None:
            spent = self.agree([spent])[0]
        if spent and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            logger.info("Time budget of %.1f minutes spent: stopping after step %d.", self.seconds / 60, state.global_step)


class FailedGradesGuard(TrainerCallback):
    """After max_consecutive_failed_steps steps whose grades all failed: save a checkpoint and stop."""

    def __init__(self, trainer, limit: int):
        self.trainer = trainer
        self.limit = limit
        self.tripped = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.consecutive_failed >= self.limit:
            self.tripped = True
            control.should_save = True
            control.should_training_stop = True


PROGRESS_KEYS = (("loss", "loss"), ("reward", "reward"), ("judge/failure_rate", "judge_fail"),
                 ("step_time", "step_s"))


def _progress_fields(logs: dict) -> dict[str, str]:
    out = {}
    for key, label in PROGRESS_KEYS:
        value = logs.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[label] = f"{value:.4g}"
    return out


class ProgressLines(TrainerCallback):
    """One plain log line per logged step, for when output is not a terminal (no progress bar there)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:  # one line per step, not per process
            return
        fields = " ".join(f"{k}={v}" for k, v in _progress_fields(logs).items())
        logger.info("step %d/%d %s", state.global_step, state.max_steps, fields)


class ProgressBar(TrainerCallback):
    """A terminal progress bar showing step, loss, reward and step time (replaces Trainer's dict printing)."""

    def __init__(self):
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs:
            self.bar.set_postfix(_progress_fields(logs), refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop. A second signal interrupts at once.

    A signal often reaches one process only (a preempted node). AGREE (training/agreement.py, one all-reduce at
    every step end) makes every process stop at the same step end, save the same checkpoint together and exit
    with the same code. `stopped_at` is the step where the agreed stop took effect; a signal received after the
    last step end stops nothing (the run is over; the final model is saved as usual).
    """

    def __init__(self, agree=None):
        self.agree = agree
        self.signal_number: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        import signal

        if self.signal_number is not None:  # asked twice: stop now
            self.uninstall()
            signal.raise_signal(signum)
            return
        self.signal_number = signum
        logger.warning("Received %s: stopping after this step with a checkpoint (send it again to stop at once).",
                       signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        import signal

        local = self.signal_number or 0
        agreed = self.agree([local])[0] if self.agree is not None else local
        if not agreed:
            return
        if self.signal_number is None:
            self.signal_number = agreed
            logger.warning("Another process received %s: stopping after this step with a checkpoint.",
                           signal.Signals(agreed).name)
        self.stopped_at = state.global_step
        control.should_save = True
        control.should_training_stop = True


DUMP_WEIGHTS_ENV = "GRPO_LLM_EVAL_DUMP_WEIGHTS_DIR"


def weights_digest(model) -> str:
    """sha256 over every parameter's name and float32 bytes, in name order: equal exactly when the weights are."""
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(param.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class WeightDigestCallback(TrainerCallback):
    """Each process writes its own weights' digest when training begins and ends, to DIR/rank-<i>.json.

    A check for data-parallel runs (tests/test_multiprocess.py): every process must start and end with the
    same weights. Checkpoints cannot show that, as only the main process writes them. Off unless the
    environment variable GRPO_LLM_EVAL_DUMP_WEIGHTS_DIR names a folder (see `from_env`). Needs whole
    parameters on each process (one process, DDP, DeepSpeed ZeRO-1/2), not sharded ones (ZeRO-3, FSDP).
    """

    def __init__(self, out_dir: str | Path, process_index: int):
        self.path = Path(out_dir) / f"rank-{process_index}.json"
        self.begin: str | None = None

    @classmethod
    def from_env(cls, process_index: int) -> WeightDigestCallback | None:
        """The callback when GRPO_LLM_EVAL_DUMP_WEIGHTS_DIR is set, else None."""
        out_dir = os.environ.get(DUMP_WEIGHTS_ENV)
        return cls(out_dir, process_index) if out_dir else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.begin = weights_digest(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"begin": self.begin, "end": weights_digest(model), "global_step": state.global_step}
        self.path.write_text(json.dumps(payload), encoding="utf-8")
