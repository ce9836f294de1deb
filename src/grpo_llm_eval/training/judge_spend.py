"""The teacher's spend during training: per step and run totals in metrics.jsonl, and the stop at a budget.

Each step end sums every process's usage meter (teacher/usage.py) and logs what the run spent since the
previous step end (`judge/calls`, `judge/prompt_tokens`, `judge/completion_tokens`, `judge/cost_usd` when
priced) and in total (`judge/total_*`, resumes included). Spend is counted when the call is made, so a
batch judged ahead counts in the step during which it was graded, not the one that trains on it; the
totals are exactly what the teacher was asked for. When a budget is reached the run stops as
`max_train_minutes` stops it: the step finishes, a checkpoint and final/ are saved, one line names the
budget, and the process exits 0. Every call is also written to the run's database as it is counted
(teacher/spend_ledger.py), so a resume after a crash counts what was spent after the last checkpoint too.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback

from grpo_llm_eval.teacher.spend_ledger import SpendLedger
from grpo_llm_eval.teacher.usage import Usage, UsageMeter, describe, usage_metrics

logger = logging.getLogger(__name__)

STATE_KEY = "judge_usage"  # in the checkpoint's grpo_llm_eval_state.json


class JudgeSpend(TrainerCallback):
    """Logs teacher spend per step and in total; stops training (with a checkpoint) when a budget is reached."""

    def __init__(self, trainer, meter: UsageMeter, ledger_path: Path | None = None):
        self.trainer = trainer
        self.meter = meter
        if ledger_path is not None:  # what each call costs, written as it is counted (survives kill -9)
            meter.ledger = SpendLedger(ledger_path)
            meter.add(0)  # this process's row now, with what the health check spent
        self.total = Usage()  # the whole run's, all processes, as of the last step end
        self._last = Usage()
        self._before = Usage()
        self.spent: str | None = None  # the line naming the budget reached, once reached
        self._endpoints: list[int] = []  # requests per teacher replica this session, all processes
        self._last_endpoints: list[int] = []

    def restore(self, spent_before: Usage) -> None:
        """What the run spent before a resume: counted in the totals and against the budgets. SPENT_BEFORE: the
        checkpoint's totals; the ledger's rows of earlier sessions add what was spent after that checkpoint."""
        ledger = self.meter.ledger
        earlier = None
        if ledger is not None:
            ledger.session_start = self._session_start()  # rows from then on: this session's, for the budgets
            earlier = ledger.before(ledger.session_start)
        if earlier is not None:
            counted = Usage(*(max(a, b) for a, b in zip(spent_before.as_tuple(), earlier.as_tuple(), strict=True)))
            extra = counted - spent_before
            if extra.calls or extra.total_tokens:
                logger.info("Teacher spend after the checkpoint, before the run stopped (from %s): %s; counted in "
                            "the totals and budgets.", ledger.path.name, describe(extra, self.meter.prices))
            spent_before = counted
        self._before = self.total = self._last = spent_before
        self.meter.before = spent_before

    def _session_start(self) -> float:
        """When the first process of this session opened its ledger (the same on every process): rows started
        earlier are the earlier sessions'."""
        import torch

        accelerator = self.trainer.accelerator
        if accelerator.num_processes == 1:
            return self.meter.ledger.started
        mine = torch.tensor([self.meter.ledger.started], dtype=torch.float64, device=accelerator.device)
        return float(accelerator.gather(mine).min().item())

    def state(self) -> dict:
        """For the checkpoint: the run's totals."""
        return self.total.to_dict()

    def _run_total(self) -> Usage:
        """The run's usage (all processes, resumes included); also sums the calls per replica into `_endpoints`."""
        import torch

        accelerator = self.trainer.accelerator
        mine = self.meter.usage.as_tuple()
        values = [*mine, *self.meter.endpoint_calls]  # the same length on every process (the same config)
        local = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
        summed = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
        summed = [int(round(v)) for v in summed.tolist()]
        self._endpoints = summed[len(mine):]
        return self._before + Usage(*summed[:len(mine)])

    def on_train_begin(self, args, state, control, **kwargs):
        """Check the budgets against the run's total where every process writes to the same ledger file; on
        machines that do not share the run folder each process keeps its 1/n share of each budget instead."""
        ledger = self.meter.ledger
        if ledger is None:
            return
        accelerator = self.trainer.accelerator
        accelerator.wait_for_everyone()  # every process has written its row (in __init__)
        rows = ledger.session_rows()
        self.meter.aggregate = rows == accelerator.num_processes
        if not self.meter.aggregate:
            logger.info("The processes do not share %s (%d of %d rows in this one): each keeps 1/%d of the teacher "
                        "budgets.", ledger.path, rows, accelerator.num_processes, accelerator.num_processes)

    def on_step_end(self, args, state, control, **kwargs):
        self.total = self._run_total()
        step, self._last = self.total - self._last, self.total
        prices = self.meter.prices
        for name, value in usage_metrics(step, prices, "judge/").items():
            self.trainer._metric(name, value)
        # Requests per teacher replica in this step (several replicas only): where the calls went.
        last = self._last_endpoints or [0] * len(self._endpoints)
        for i, (now, before) in enumerate(zip(self._endpoints, last, strict=True)):
            self.trainer._metric(f"judge/calls_by_endpoint/{i}", float(now - before))
        self._last_endpoints = self._endpoints
        metrics = self.trainer._metrics["train"]
        for name, value in usage_metrics(self.total, prices, "judge/total_").items():
            metrics[name] = [value]  # a total, not averaged over the logging window: the latest is the value
        reason = self.meter.budgets.spent(self.total, prices)
        if reason is not None and self.trainer.run_cfg.on_budget_end == "verifier_only":
            # The same totals on every process, so every process switches at the same step end.
            if self.spent is None:
                logger.info("Teacher budget %s; from step %d on, the reward is the verifiers' alone "
                            "(on_budget_end: verifier_only).", reason, state.global_step + 1)
            self.spent = reason
            self.trainer.teacher_reward.verifier_only = True
        elif reason is not None and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
            if self.spent is None:
                logger.info("Teacher budget %s; stopping after step %d.", reason, state.global_step)
            self.spent = reason
        if self.trainer.teacher_reward is not None and self.trainer.teacher_reward.verifier_only:
            metrics["judge/verifier_only"] = [1.0]  # the steps after the switch (the teacher is no longer asked)

    def on_train_end(self, args, state, control, **kwargs):
        total = self._run_total()  # every process takes part in the sum
        if state.is_world_process_zero:
            logger.info("Teacher spend of the run: %s.", describe(total, self.meter.prices))
