"""Judge ahead: the teacher grades batch k in the background while earlier batches train.

With `judge_ahead_steps = d > 0`, the rollouts sampled at generation call c are trained at call c + d. Their
judging runs on TRL's event-loop thread from the moment they are sampled, so it overlaps with d training
steps and d generations; a step waits only for whatever judging is still running when its batch comes up.

Sampled d updates earlier, a batch is slightly off-policy. Its per-token log-probs under the weights that
sampled it are recorded while generating (generation_logps.py; `sampling_logps` below, a forward pass, is the
fallback) and handed to TRL as `old_per_token_logps`, so the clipped importance ratio corrects for the lag
(PPO's own treatment of stale samples). With vLLM, TRL's importance sampling correction against vLLM's
sampling log-probs does this instead.

The first call fills the queue by sampling its prompts d + 1 times (fresh samples each time); no rollout is
sampled that no step will train, and the queue is saved in each checkpoint, so a resumed run continues
exactly where the uninterrupted one would have. With `judge_ahead_steps: auto` (AutoDepth) d changes between
calls: a raise samples the extra batches at once, a fall trains from the queue without sampling, so a batch
trains at most the d it was sampled under.

All of this holds only when one generation batch is one optimizer update trained once (TRL's
`steps_per_generation` equal to the accumulation steps, `num_iterations` 1: then checkpoints, taken between
updates, never fall inside a batch) and a forward pass is deterministic (no dropout: sampling-time and
training-time log-probs would use different masks). `check_exact` refuses anything else; config_load.py
refuses the same settings with config errors first.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Rollout:
    """One generation batch waiting for its turn to train."""

    inputs: list[dict]  # TRL's generation batch (dataset rows)
    generated: tuple  # what GRPOTrainer._generate returned for them
    old_logps: torch.Tensor | None  # (B, T) per-token log-probs under the sampling weights; None with vLLM

    def state(self) -> dict[str, Any]:
        old = None if self.old_logps is None else self.old_logps.detach().cpu()
        return {"inputs": self.inputs, "generated": self.generated, "old_logps": old}


class RolloutQueue:
    """FIFO of sampled, not yet trained rollouts; `depth` is how many updates a rollout waits."""

    def __init__(self, depth: int):
        self.depth = depth
        self.items: deque[Rollout] = deque()

    def __len__(self) -> int:
        return len(self.items)

    def wanted(self, remaining_calls: int) -> int:
        """Queue length needed before popping, when REMAINING_CALLS generation calls (this one included) are left.

        Enough for this call and the next `depth`, but never a rollout that no remaining call will train.
        """
        return min(self.depth, max(0, remaining_calls - 1)) + 1

    def append(self, rollout: Rollout) -> None:
        self.items.append(rollout)

    def pop(self) -> Rollout:
        return self.items.popleft()

    def save(self, path: Path) -> None:
        torch.save([r.state() for r in self.items], path)

    @staticmethod
    def load(path: Path, device) -> list[Rollout]:
        # Our own file, written by save() above: plain lists, dicts, strings and tensors.
        states = torch.load(path, map_location=device, weights_only=False)
        return [Rollout(s["inputs"], s["generated"], s["old_logps"]) for s in states]


AUTO_STATE_KEY = "judge_ahead_auto"  # the AutoDepth state in a checkpoint's state file


class AutoDepth:
    """`judge_ahead_steps: auto`: the smallest lag that hides the measured teacher latency behind the measured step.

    A batch sampled at generation call c is scored at call c + d, so its judging has about d step periods to
    finish: the lag wanted is ceil(MARGIN x latency / step), where latency is the slowest of the last few batches'
    judging (start to finish) and step the median of the last few steps' time less their wait for grades. A
    teacher within FAST of a step is simply waited for (d = 0: no staleness for a cost under FAST of a step).
    The lag rises at once (a stall costs a whole teacher round) and falls only after LOWER_AFTER decisions in a
    row ask for less (each fall skips a sampling call while the queue drains). Bounded to 0..bound.

    The first step's time (loading, warm-up) and the steps that sampled more or less than one batch (the queue
    filling or draining) are not step measurements. The state is saved in each checkpoint and restored on
    resume, so a resumed run starts from the depth and measurements the uninterrupted run had; later decisions
    follow measured times, so neither run's lag sequence is reproducible to the step (each stays exact: every
    batch trains at most its lag after sampling, from recorded log-probs).
    """

    MARGIN = 1.1
    FAST = 0.1
    LOWER_AFTER = 3
    WINDOW = 3

    def __init__(self, bound: int, start: int = 1):
        self.bound = bound
        self.depth = min(start, bound)
        self.latencies: deque[float] = deque(maxlen=self.WINDOW)
        self.steps: deque[float] = deque(maxlen=self.WINDOW)
        self.lower_votes = 0

    def observe(self, judge_s: float | None, step_s: float | None) -> None:
        """One step's measurements: the judging time of the batch it scored, its time less the wait for grades."""
        if judge_s is not None:
            self.latencies.append(judge_s)
        if step_s is not None and step_s > 0:
            self.steps.append(step_s)

    def target(self) -> int | None:
        """The lag the measurements ask for, or None before there are any."""
        if not self.latencies or not self.steps:
            return None
        latency, step = max(self.latencies), statistics.median(self.steps)
        if latency <= self.FAST * step:
            return 0
        return min(self.bound, math.ceil(self.MARGIN * latency / step))

    def decide(self) -> int:
        """The lag for the generation call about to run."""
        want = self.target()
        if want is None or want == self.depth:
            self.lower_votes = 0
        elif want > self.depth:
            self.depth, self.lower_votes = want, 0
        else:
            self.lower_votes += 1
            if self.lower_votes >= self.LOWER_AFTER:
                self.depth, self.lower_votes = want, 0
        return self.depth

    def state(self) -> dict[str, Any]:
        return {"depth": self.depth, "latencies": list(self.latencies), "steps": list(self.steps),
                "lower_votes": self.lower_votes}

    def restore(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        self.depth = min(int(state["depth"]), self.bound)
        self.latencies.extend(state["latencies"])
        self.steps.extend(state["steps"])
        self.lower_votes = int(state["lower_votes"])


def check_exact(args, model) -> None:
    """Raise ValueError where judging ahead would not be exact (see the module doc): ARGS is the GRPOConfig."""
    problems = []
    if args.num_iterations != 1:
        problems.append(f"num_iterations is {args.num_iterations}, not 1")
    if args.steps_per_generation != args.gradient_accumulation_steps:
        problems.append(f"steps_per_generation ({args.steps_per_generation}) differs from gradient_accumulation_steps "
                        f"({args.gradient_accumulation_steps})")
    dropout = sorted({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0})
    if dropout and not args.use_vllm:
        problems.append(f"the model has dropout (p = {', '.join(map(str, dropout))})")
    if args.use_vllm and not args.vllm_importance_sampling_correction:
        problems.append("vLLM generates with vllm_importance_sampling_correction false (the only correction for "
                        "the lag with vLLM: TRL recomputes the old log-probs under the current weights)")
    if problems:
        raise ValueError("judging ahead (judge_ahead_steps > 0) is exact only with one generation batch per update, "
                         "trained once, no dropout, and with vLLM its importance sampling correction on; "
                         f"here {'; '.join(problems)}. Fix those, or set "
                         "judge_ahead_steps: 0.")


def remaining_generation_calls(global_step: int, max_steps: int, micro_step: int, grad_accum: int,
                               generate_every: int) -> int:
    """How many generation calls are left in the run, the current one included.

    TRL generates once every `generate_every` micro-steps; a run has max_steps x grad_accum micro-steps.
    """
    done = global_step * grad_accum + micro_step % grad_accum
    return max(1, math.ceil((max_steps * grad_accum - done) / generate_every))


def queue_file(checkpoint: Path, process_index: int) -> Path:
    return Path(checkpoint) / f"judge_ahead_queue-{process_index}.pt"


def padded_width(rows: list[list[int]], multiple: int | None) -> int:
    """The width TRL pads ROWS to (the longest, rounded up to MULTIPLE)."""
    width = max(map(len, rows), default=0)
    return -(-width // multiple) * multiple if multiple else width


def sampling_logps(trainer, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
    """Per-token log-probs of the completions under the trainer's current weights, padded as TRL pads them.

    TRL builds the same tensors from the same lists when the batch trains, so the shapes line up.
    """
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import pad

    device = trainer.accelerator.device
    multiple = trainer.pad_to_multiple_of

    def padded(rows, value, side):
        return pad([torch.tensor(r) for r in rows], padding_value=value, padding_side=side,
                   pad_to_multiple_of=multiple).to(device)

    pad_id = trainer._tokenizer.pad_token_id
    p_ids, c_ids = padded(prompt_ids, pad_id, "left"), padded(completion_ids, pad_id, "right")
    p_mask = padded([[1] * len(r) for r in prompt_ids], 0, "left")
    c_mask = padded([[1] * len(r) for r in completion_ids], 0, "right")
    ids, mask = torch.cat([p_ids, c_ids], dim=1), torch.cat([p_mask, c_mask], dim=1)
    with torch.no_grad(), disable_gradient_checkpointing(trainer.model, trainer.args.gradient_checkpointing_kwargs):
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, c_ids.size(1), batch_size=trainer.args.per_device_train_batch_size)
    return logps
