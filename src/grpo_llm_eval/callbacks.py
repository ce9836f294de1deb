"""Trainer callbacks: write records and metrics when a step ends, stop on failed grades, plain progress lines."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from grpo_llm_eval.records import JsonlWriter

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

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.flush()
        if self.metrics is not None:
            self.metrics.sync()


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


class ProgressLines(TrainerCallback):
    """One plain log line per logged step, for when output is not a terminal (no progress bar there)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, label in (("loss", "loss"), ("reward", "reward"), ("judge/failure_rate", "judge_fail"),
                           ("step_time", "step_time_s")):
            value = logs.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                parts.append(f"{label}={value:.4g}")
        logger.info(" ".join(parts))


class StopOnSignal(TrainerCallback):
    """SIGINT/SIGTERM: finish the current step, save a checkpoint, stop. A second signal interrupts at once."""

    def __init__(self):
        self.signal_number: int | None = None
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
        if self.signal_number is not None:
            control.should_save = True
            control.should_training_stop = True
