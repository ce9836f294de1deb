"""A step whose grades all failed leaves the weights, the optimizer state and the learning rate as they were."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from grpo_llm_eval.testing.teacher_server import TeacherServer
from tests.test_sft import make_trainer


class Snapshots(TrainerCallback):
    """Weights, AdamW's step counts and the learning rate at the end of every step (observation only)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.steps: list[dict] = []

    def _weights(self):
        return {n: p.detach().clone() for n, p in self.trainer.model.named_parameters()}

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps.append({"weights": self._weights()})

    def on_step_end(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        counts = [float(s["step"]) for s in optimizer.optimizer.state.values() if "step" in s]
        self.steps.append({"weights": self._weights(), "lr": lr_scheduler.get_last_lr()[0], "adam_steps": counts,
                           "failed": self.trainer.all_grades_failed})


class TestSkippedUpdate:
    # accumulation 2: one generation batch of 4 prompts (16 calls) serves the step's two micro-steps
    @pytest.mark.parametrize(("accumulation", "calls_per_step"), [(1, 8), (2, 16)])
    def test_weights_are_bit_identical_across_a_step_whose_grades_all_failed(self, tiny_model, tmp_path, accumulation,
                                                                             calls_per_step):
        """Old code returned `loss * 0.0` and let AdamW step anyway: weight decay and the first step's momentum
        moved every weight, and the linear schedule advanced, on a step that had nothing to learn from."""
        # Step 1 is graded (2 prompts x 4 completions per micro-step); then the teacher dies, so step 2's grades
        # all fail.
        with TeacherServer(mode="scripted", die_after=calls_per_step) as server:
            _, trainer = make_trainer(tiny_model, tmp_path, server, total_steps=2, judge_ahead_steps=0,
                                      accumulation_steps=accumulation,
                                      sft_beta=1.0,  # scripted grades of random text are 0: SFT makes step 1 move
                                      teacher_max_retries=0, save_steps=100, trl={"weight_decay": 0.1})
            snaps = Snapshots(trainer)
            trainer.add_callback(snaps)
            trainer.train()
        begin, first, second = snaps.steps
        assert not first["failed"] and second["failed"]
        moved = [n for n in begin["weights"] if not torch.equal(begin["weights"][n], first["weights"][n])]
        assert moved, "the graded step should have updated the weights (momentum is nonzero after it)"
        changed = [n for n in first["weights"] if not torch.equal(first["weights"][n], second["weights"][n])]
        assert changed == []
        assert second["adam_steps"] == first["adam_steps"] and set(first["adam_steps"]) == {1.0}
        assert second["lr"] == first["lr"] > 0  # the schedule did not advance (it would have reached 0)
        assert trainer.skip_updates.skipped == 1
        assert trainer.state.global_step == 2
