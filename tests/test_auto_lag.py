"""judge_ahead_steps: auto against a live teacher whose latency changes mid-run: the lag rises when the teacher
gets slow and falls back to 0 when it gets fast, and the run stays exact (nothing sampled that no step trains)."""

from __future__ import annotations

import logging

import pytest
from transformers import TrainerCallback

from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from tests.test_sft import make_trainer

SLOW_S = 6.0  # a few steps of the tiny model, however loaded the machine
STEPS = 30


class LatencySchedule(TrainerCallback):
    """Fast teacher until the lag has fallen to 0, slow until it has risen to 2 or more, then fast again (the
    phases follow the lag, not step numbers, so a loaded machine's slower steps do not break the test)."""

    def __init__(self, server, trainer):
        self.server, self.trainer = server, trainer
        self.phase = "fast"
        self.depths: list[tuple[str, int]] = []

    def on_step_end(self, args, state, control, **kwargs):
        depth = self.trainer.rollouts.depth
        self.depths.append((self.phase, depth))
        if self.phase == "fast" and depth == 0:
            self.phase = "slow"
        elif self.phase == "slow" and depth >= 2:
            self.phase = "fast again"
        self.server.latency_s = SLOW_S if self.phase == "slow" else 0.0


@pytest.mark.slow
def test_the_lag_follows_the_teachers_latency(tiny_model, tmp_path, caplog):
    with TeacherServer(mode="scripted") as server:
        cfg, trainer = make_trainer(tiny_model, tmp_path, server, total_steps=STEPS, save_steps=100,
                                    judge_ahead_steps="auto", max_new_tokens=16, teacher_cache=False,
                                    teacher_timeout_s=60)
        schedule = LatencySchedule(server, trainer)
        trainer.add_callback(schedule)
        with caplog.at_level(logging.INFO, logger="grpo_llm_eval.training.trainer"):
            trainer.train()
        requests = server.stats()["chat_requests"]
    depths = schedule.depths
    history = f"(phase, lag) by step {depths}; {trainer.auto_depth.state()}"
    assert depths[0] == ("fast", 1), history  # the start, before anything is measured
    # an instant teacher is waited for (no staleness); a slow one is hidden behind steps; fast again: back to 0
    assert schedule.phase == "fast again" and depths[-1] == ("fast again", 0), history
    changes = [r.getMessage() for r in caplog.records if "Judging ahead: lag" in r.getMessage()]
    assert len(changes) >= 3, changes  # every change is logged
    # exact: every batch sampled was trained and graded once; the queue is empty at the end
    assert len(trainer.rollouts) == 0
    trainer.recorder.flush()
    rows = read_jsonl(tmp_path / "run" / "rollouts.jsonl")
    assert requests == len(rows) == STEPS * cfg.prompts_per_step * cfg.num_return_sequences
    assert {r["step"] for r in rows} == set(range(1, STEPS + 1))


def test_the_auto_state_is_saved_in_checkpoints_and_restored_on_resume(tiny_model, tmp_path):
    """Resume starts from the lag and measurements the uninterrupted run had at that checkpoint (later
    decisions follow measured times, so they are not reproduced to the step by either run)."""
    import json

    from grpo_llm_eval.config.load import load_config
    from grpo_llm_eval.training import checkpoints, judge_ahead
    from grpo_llm_eval.training.train import train
    from tests.conftest import tiny_overrides

    with TeacherServer(mode="scripted", latency_s=0.3) as server:
        cfg = load_config(None, tiny_overrides(tiny_model, tmp_path, openai_base_url=server.base_url, total_steps=3,
                                               save_steps=3, judge_ahead_steps="auto"))
        run = train(cfg).run_dir
        saved = json.loads((run / "checkpoint-3" / checkpoints.STATE_FILE).read_text())[judge_ahead.AUTO_STATE_KEY]
        # step 1 warms up and step 3 samples nothing (no step would train it): only step 2 measures a step
        assert len(saved["steps"]) == 1 and len(saved["latencies"]) == 3
        _, trainer = make_trainer(tiny_model, tmp_path / "again", server, judge_ahead_steps="auto")
        assert trainer.auto_depth.state() != saved
        trainer.restore_state(run / "checkpoint-3")
    assert trainer.auto_depth.state() == saved and trainer.rollouts.depth == saved["depth"]


def test_auto_stays_at_zero_where_judging_ahead_would_not_be_exact(tiny_model, tmp_path, caplog):
    """The config accepts auto with trl.num_iterations: 2 (it is the default, so refusing it would break such
    configs); the trainer then waits for the grades, and says why."""
    with TeacherServer(mode="scripted") as server, caplog.at_level(logging.WARNING):
        _, trainer = make_trainer(tiny_model, tmp_path, server, judge_ahead_steps="auto",
                                  **{"trl.num_iterations": 2})
    assert trainer.auto_depth is None and trainer.rollouts.depth == 0
    assert any("auto stays at 0" in r.getMessage() and "num_iterations is 2" in r.getMessage() for r in caplog.records)
