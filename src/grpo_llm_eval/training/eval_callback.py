"""Evaluation during training: every `eval_steps` steps, greedy answers to held-out prompts, graded.

Logs `eval/answer_accuracy`, `eval/teacher_reward`, `eval/judge_failure_rate` (and `eval/format_rate`) into
the trainer's metrics, so they reach metrics.jsonl (RecordsCallback) and any `report_to` logger with the
step's other metrics. Greedy decoding draws no random numbers, so evaluating does not change training.

The teacher object lives in TRL's event loop thread (`trainer.async_loop`): grading runs there too.
With several processes each one answers its share of the prompts and the results are gathered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time

from transformers import TrainerCallback

from grpo_llm_eval import data as data_mod
from grpo_llm_eval.data.rubrics import from_json
from grpo_llm_eval.evaluation.evaluate import generate_responses
from grpo_llm_eval.evaluation.items import checklist_score
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.verifiers import answer_correct, format_correct

logger = logging.getLogger(__name__)


class EvalCallback(TrainerCallback):
    """Greedy evaluation on the first `eval_limit` prompts of `eval_split`, every `eval_steps` steps.

    In train.py: `trainer.add_callback(EvalCallback(trainer, cfg, rubric, teacher))` (teacher may be None:
    then only the verifier metrics are logged).
    """

    def __init__(self, trainer, cfg, rubric, teacher, batch_size: int = 16):
        self.trainer = trainer
        self.cfg = cfg
        self.rubric = rubric
        self.teacher = teacher
        self.batch_size = batch_size
        # Loaded now so that a missing eval split fails before training starts, not at step eval_steps.
        loaded = data_mod.load_rows(cfg, cfg.eval_split)
        rows = loaded.dataset.select(range(min(cfg.eval_limit, len(loaded.dataset))))
        rows = data_mod.build_prompts(rows, cfg)
        self.questions = list(rows["question"])
        self.truths = [t if t and t.strip() else None for t in rows["answer"]]  # a row with its own rubric may have none
        self.own = [from_json(r) for r in rows["rubric"]] if "rubric" in rows.column_names else [()] * len(rows)
        self.conversations = list(rows["prompt"])

    def on_step_end(self, args, state, control, **kwargs):
        every = self.cfg.eval_steps
        if every <= 0 or state.global_step % every != 0:
            return control
        start = time.perf_counter()
        metrics = self.evaluate()
        metrics["eval/time_s"] = time.perf_counter() - start
        for name, value in metrics.items():
            self.trainer._metric(name, value)  # averaged and logged with this step's metrics
        control.should_log = True  # this step's log carries them, even between logging_steps
        logger.info("eval at step %d: %s", state.global_step,
                    ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" for k, v in metrics.items()))
        return control

    def evaluate(self) -> dict[str, float]:
        """Generate, grade and reduce over every process; returns the eval/* metrics."""
        trainer = self.trainer
        acc = trainer.accelerator
        mine = list(range(acc.process_index, len(self.conversations), acc.num_processes))
        # Every process must make the same generate calls (synced_gpus under FSDP/ZeRO-3): pad the short shards.
        padded = mine + [mine[-1] if mine else 0] * (math.ceil(len(self.conversations) / acc.num_processes) - len(mine))
        texts = self._generate([self.conversations[i] for i in padded])[:len(mine)]
        judgements = self._judge([JudgeRequest(self.questions[i], t, self.truths[i], rubric=self.own[i])
                                  for i, t in zip(mine, texts, strict=True)])
        cfg = self.cfg
        local = []
        for i, text, j in zip(mine, texts, judgements, strict=True):
            local.append({
                "answer_correct": answer_correct(text, self.truths[i], cfg.think_close_string),
                "format_correct": format_correct(text, cfg.think_open_string, cfg.think_close_string),
                "status": None if j is None else j.status,
                "teacher_reward": self.rubric.reward(j.scores, self.own[i]) if j is not None and j.ok else None,
                "constraint_share": checklist_score(self.own[i], text, cfg.think_close_string) if self.own[i] else None,
            })
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            local = gather_object(local)
        return summarize(local)

    def _generate(self, conversations: list[list[dict]]) -> list[str]:
        import torch
        from trl.models import unwrap_model_for_generation

        trainer, cfg = self.trainer, self.cfg
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), unwrap_model_for_generation(
                    trainer.model_wrapped, trainer.accelerator,
                    gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
                    gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) as unwrapped:
                responses = generate_responses(
                    unwrapped, trainer.processing_class, conversations, max_new_tokens=cfg.max_new_tokens,
                    max_prompt_tokens=cfg.max_seq_length, samples=1, repetition_penalty=cfg.repetition_penalty,
                    batch_size=self.batch_size, synced_gpus=trainer.accelerator.num_processes > 1)
        finally:
            if was_training:
                model.train()
        return [r[0] for r in responses]

    def _judge(self, requests: list[JudgeRequest]):
        if self.teacher is None or not requests:
            return [None] * len(requests)
        loop = getattr(self.trainer, "async_loop", None)
        if loop is not None and loop.is_running():
            return asyncio.run_coroutine_threadsafe(self.teacher.judge(requests), loop).result()
        return asyncio.run(self.teacher.judge(requests))  # no TRL loop (no async reward): a loop of our own


def summarize(rows: list[dict]) -> dict[str, float]:
    """eval/* metrics of graded rows (answer_correct, format_correct, status, teacher_reward)."""
    out: dict[str, float] = {}
    checked = [r["answer_correct"] for r in rows if r["answer_correct"] is not None]
    if checked:
        out["eval/answer_accuracy"] = sum(checked) / len(checked)
    if rows:
        out["eval/format_rate"] = sum(bool(r["format_correct"]) for r in rows) / len(rows)
    graded = [r for r in rows if r["status"] is not None]
    if graded:
        out["eval/judge_failure_rate"] = sum(r["status"] != "ok" for r in graded) / len(graded)
    rewards = [r["teacher_reward"] for r in rows if r["teacher_reward"] is not None]
    if rewards:
        out["eval/teacher_reward"] = statistics.fmean(rewards)
    shares = [r["constraint_share"] for r in rows if r.get("constraint_share") is not None]
    if shares:  # examples' own rubrics with programmatic checks: the share of checkable items met, and all met
        out["eval/constraint_share"] = statistics.fmean(shares)
        out["eval/all_checks_met"] = sum(v == 1.0 for v in shares) / len(shares)
    return out
