"""Skip the optimizer update of a step whose grades all failed, for real.

A zero loss gives zero gradients, but AdamW would still step: its momentum and weight decay move the weights,
and the learning-rate schedule would advance. So when no micro-step of an optimizer step trained on a graded
batch, the prepared optimizer's `step` does nothing and reports itself skipped through accelerate's own flag
(`AcceleratedOptimizer.step_was_skipped`, which mixed precision uses for an overflowed step); Trainer and
accelerate's scheduler then leave the learning rate where it was.

Not under DeepSpeed: there the engine steps inside `backward`, before any of this runs (the zero loss still
zeroes the gradient; the optimizer's momentum and weight decay still apply).
"""

from __future__ import annotations

import functools
import logging

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class SkipUngradedUpdates(TrainerCallback):
    """Wraps the prepared optimizer's `step` when training begins; `graded()` marks a micro-step as graded."""

    def __init__(self):
        self._graded = False  # did any micro-step of the current optimizer step train on graded rollouts?
        self.skipped = 0

    def graded(self) -> None:
        self._graded = True

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None or getattr(optimizer, "_grpo_llm_eval_skip", False):
            return
        if not hasattr(optimizer, "step_was_skipped"):
            logger.warning("The optimizer is not accelerate's; steps whose grades all failed are not skipped.")
            return
        original = optimizer.step

        @functools.wraps(original)  # keeps the LR scheduler's marker on the step method
        def step(closure=None):
            graded, self._graded = self._graded, False
            if not graded:
                optimizer._is_overflow = True  # accelerate's "skipped" flag: the scheduler does not advance
                self.skipped += 1
                return None
            optimizer._is_overflow = False
            return original(closure)

        optimizer.step = step
        optimizer._grpo_llm_eval_skip = True
