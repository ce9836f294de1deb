"""The one GRPOTrainer subclass: records each batch, adds the SFT term, skips steps whose grades all failed.

Everything GRPO (sampling, advantages, clipped loss, KL, PEFT reference) is TRL's; this class only wraps two
of its methods and calls the originals.
"""

from __future__ import annotations

import functools
import logging
import shutil
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer

from grpo_llm_eval.teacher.usage import Usage
from grpo_llm_eval.training import agreement, checkpoints, generation_logps, judge_ahead, judge_spend, sft, sft_loss
from grpo_llm_eval.training.callbacks import StepTimer
from grpo_llm_eval.training.skip_update import SkipUngradedUpdates

logger = logging.getLogger(__name__)


class TeacherGRPOTrainer(GRPOTrainer):
    """GRPO on teacher grades, plus `sft_beta` x SFT loss on the teacher's feedback in the same update."""

    def __init__(self, *args, run_cfg=None, recorder=None, reward=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_cfg = run_cfg
        self.recorder = recorder
        self.teacher_reward = reward
        self.sft_chunks: list[list[tuple[list[int], list[int]]]] = []
        self.all_grades_failed = False
        self.consecutive_failed = 0
        self._staging: str | None = None
        graded = reward is not None and run_cfg is not None and run_cfg.teacher_weight > 0
        depth = run_cfg.judge_ahead_steps if graded else 0
        self.auto_depth = self._auto_depth(run_cfg) if depth == "auto" else None
        if depth == "auto":
            depth = self.auto_depth.depth if self.auto_depth is not None else 0
        elif depth > 0:
            judge_ahead.check_exact(self.args, self.model)
        self.rollouts = judge_ahead.RolloutQueue(depth)
        self._sampled = 0  # batches sampled by this step's generation call (the auto lag measures 1-batch steps)
        self._steps_timed = 0
        self._replay: tuple | None = None
        self.times: dict[str, float] = defaultdict(float)  # this step's seconds by part; StepTimer logs them
        self.add_callback(StepTimer(self))
        self.skip_updates = SkipUngradedUpdates()
        self.add_callback(self.skip_updates)
        self.judge_spend = None  # judge_spend.JudgeSpend, when a teacher grades (train.py attaches it)
        self._compiled_generation = False
        self._logps_source: str | None = None  # logged when it changes (see generation_logps.py)
        if run_cfg is not None and run_cfg.fast_generation:
            self._use_compiled_generation()

    def _auto_depth(self, cfg) -> judge_ahead.AutoDepth | None:
        try:
            judge_ahead.check_exact(self.args, self.model)
        except ValueError as exc:
            logger.warning("judge_ahead_steps: auto stays at 0 (grades are waited for): %s", exc)
            return None
        return judge_ahead.AutoDepth(cfg.judge_ahead_max_steps)

    def _use_compiled_generation(self) -> None:
        """Static KV cache plus transformers' compiled decoding step, on CUDA with transformers generation."""
        if self.use_vllm or not torch.cuda.is_available() or getattr(self, "generation_config", None) is None:
            return
        if self.args.cache_implementation not in (None, "static"):
            return  # the user chose a cache; leave it
        self.generation_config.cache_implementation = "static"
        self.generation_config.disable_compile = False
        self.generation_kwargs["cache_implementation"] = "static"
        self._compiled_generation = True

    def _metric(self, name: str, value: float) -> None:
        # TRL averages self._metrics["train"][name] over the logging window (the same store log_metric feeds).
        self._metrics["train"][name].append(float(value))

    # ---- generation, judging ahead, scoring ---------------------------------------------------------

    def _generate(self, prompts):
        # A rollout sampled earlier comes back here when its turn to train has come (see judge_ahead.py).
        if self._replay is not None:
            return self._replay
        if not self._compiled_generation:
            return super()._generate(prompts)
        try:
            return super()._generate(prompts)
        except Exception as exc:  # a compile failure must not end the run: generate as TRL does instead
            logger.warning("Compiled generation failed (%s: %s); continuing with TRL's uncompiled generation.",
                           type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self._compiled_generation = False
            self.generation_config.disable_compile = True
            self.generation_config.cache_implementation = self.args.cache_implementation
            self.generation_kwargs["cache_implementation"] = self.args.cache_implementation
            return super()._generate(prompts)

    def _sample(self, inputs) -> judge_ahead.Rollout:
        """Generate completions for INPUTS now, record their sampling log-probs, start judging them."""
        start = time.perf_counter()
        prompts = [x["prompt"] for x in inputs]
        why_not = generation_logps.unsupported(self)
        if why_not is None:
            with generation_logps.recording(self) as recorder:
                generated = self._generate(prompts)
        else:
            generated = self._generate(prompts)
        self.times["generate_s"] += time.perf_counter() - start
        old = None
        if not self.use_vllm:  # with vLLM, TRL's importance sampling correction covers the lag
            start = time.perf_counter()
            recorded = None
            if why_not is None:
                recorded = recorder.result(generated[1], judge_ahead.padded_width(generated[1], self.pad_to_multiple_of))
                why_not = recorder.problem
            # Every process, every batch: a forward pass run by some processes only would hang under ZeRO-3/FSDP.
            why_not = generation_logps.agree_fallback(self.accelerator, why_not)
            if why_not is None:
                old = recorded
            else:
                old = judge_ahead.sampling_logps(self, generated[0], generated[1])
                if recorded is not None:  # this process's recording was fine: how far it is from the forward pass
                    self._metric("judge_ahead/logps_abs_diff",
                                 generation_logps.mean_abs_difference(recorded, old, generated[1]))
            self._log_logps_source(why_not)
            self.times["old_logps_s"] += time.perf_counter() - start
        rollout = judge_ahead.Rollout(inputs, generated, old)
        self._sampled += 1
        self._start_judging(rollout)
        return rollout

    def _log_logps_source(self, why_not: str | None) -> None:
        source = "generation" if why_not is None else f"a forward pass ({why_not})"
        if source != self._logps_source:
            logger.info("Judging ahead: sampling log-probs recorded from %s.", source)
            self._logps_source = source

    def _start_judging(self, rollout: judge_ahead.Rollout) -> None:
        prompts = [x["prompt"] for x in rollout.inputs]
        self.teacher_reward.judge_in_background(self.async_loop, prompts, rollout.generated[3], rollout.inputs)

    def _generate_and_score_completions(self, inputs):
        if not self.model.training:
            return super()._generate_and_score_completions(inputs)
        start = time.perf_counter()
        if self.auto_depth is not None:
            depth = self.auto_depth.decide()
            if self.accelerator.num_processes > 1:
                # Each process measures its own times; all must sample the same batches, or their collectives
                # (reward gathering) would pair different calls and hang. The largest lag hides every teacher.
                depth = max(gather_object([depth]))
                self.auto_depth.depth = depth
            self._set_depth(depth)
        if self.rollouts.depth > 0 or self.auto_depth is not None:
            self._metric("judge_ahead/depth", self.rollouts.depth)
        if self.rollouts.depth == 0 and not self.rollouts:  # (a queue left by a lowered lag trains first)
            self._sampled += 1
            output = super()._generate_and_score_completions(inputs)
            judged = self.teacher_reward.last_judge_wall_s if self.teacher_reward is not None else 0.0
            self.times["generate_s"] += time.perf_counter() - start - judged  # includes TRL's scoring work
        else:
            output = self._train_on_queued(inputs)
        self.times["prepare_s"] += time.perf_counter() - start
        if self.teacher_reward is not None:
            self.times["judge_s"] += self.teacher_reward.last_judge_wall_s
            self.times["judge_wait_s"] += self.teacher_reward.last_judge_wait_s
        advantages = output["advantages"].tolist()
        if self.recorder is not None:
            self.recorder.finish_batch(advantages, step=self.state.global_step + 1,
                                       gather=gather_object if self.accelerator.num_processes > 1 else None)
        self._check_failed_grades()
        self._prepare_sft()
        return output

    def _set_depth(self, depth: int) -> None:
        if depth != self.rollouts.depth:
            auto = self.auto_depth
            # Another process's measurements may have set the lag (see the gather above) before this one has any.
            measured = (f"teacher {max(auto.latencies):.2f} s a batch, step {statistics.median(auto.steps):.2f} s "
                        "without waiting" if auto.latencies and auto.steps else "set by another process's measurements")
            logger.info("Judging ahead: lag %d -> %d updates (%s).", self.rollouts.depth, depth, measured)
            self.rollouts.depth = depth

    def observe_step(self, step_s: float, times: dict[str, float]) -> None:
        """Feed the auto lag one finished step's times (StepTimer calls this before it clears them)."""
        self._steps_timed += 1
        sampled, self._sampled = self._sampled, 0
        if self.auto_depth is None:
            return
        # The first step loads and warms up; a step that sampled 0 or several batches is not a step's work.
        usable = self._steps_timed > 1 and sampled == 1
        self.auto_depth.observe(times.get("judge_s"), step_s - times.get("judge_wait_s", 0.0) if usable else None)

    def _train_on_queued(self, inputs):
        """Sample INPUTS (and, at the start, enough more to fill the queue); score and return the oldest rollout."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        remaining = judge_ahead.remaining_generation_calls(
            self.state.global_step, self.state.max_steps, self._step, self.args.gradient_accumulation_steps,
            generate_every)
        while len(self.rollouts) < self.rollouts.wanted(remaining):
            self.rollouts.append(self._sample(inputs))
        ready = self.rollouts.pop()
        self._replay = ready.generated
        try:
            output = super()._generate_and_score_completions(ready.inputs)
        finally:
            self._replay = None
        if ready.old_logps is not None:
            output["old_per_token_logps"] = ready.old_logps
        return output

    def _check_failed_grades(self) -> None:
        cfg = self.run_cfg
        if cfg is None or cfg.teacher_weight <= 0 or self.recorder is None:
            return
        local = self.recorder.last_batch
        ok = sum(1 for r in local if r.get("reward") is not None)
        counts = torch.tensor([ok, len(local)], dtype=torch.float32, device=self.accelerator.device)
        ok_all, total = self.accelerator.reduce(counts, reduction="sum").tolist()
        self.all_grades_failed = total > 0 and ok_all == 0
        if self.all_grades_failed:
            self.consecutive_failed += 1
            logger.warning("Every grade of step %d failed: the update is skipped (%d in a row; the run stops at %d).",
                           self.state.global_step + 1, self.consecutive_failed, cfg.max_consecutive_failed_steps)
        else:
            self.consecutive_failed = 0

    def _prepare_sft(self) -> None:
        cfg = self.run_cfg
        self.sft_chunks = []
        if cfg is None or cfg.sft_beta <= 0 or self.recorder is None:
            return
        chats = sft.select_targets(self.recorder.last_batch, cfg.sft_target, self.num_generations,
                                   cfg.sft_recheck_prompt)
        examples = [ex for chat in chats if (ex := sft.tokenize_example(self.processing_class, chat, cfg.max_seq_length))]
        parts = self.args.steps_per_generation
        # One slice per micro-step that this generation batch serves, as TRL splits the rollouts.
        self.sft_chunks = [examples[i::parts] for i in range(parts)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not model.training:
            return loss
        if self.all_grades_failed:
            return loss * 0.0  # nothing was graded: no gradient, and skip_updates skips the optimizer step
        self.skip_updates.graded()
        cfg = self.run_cfg
        if cfg is None or cfg.sft_beta <= 0:
            return loss
        chunk = self.sft_chunks[(self._step) % self.args.steps_per_generation] if self.sft_chunks else []
        start = time.perf_counter()
        s_loss, n_tokens = self._sft_term(model, chunk)
        self.times["sft_s"] += time.perf_counter() - start  # its forward passes; the backward is in train_s
        self._metric("sft_tokens", n_tokens)
        if n_tokens:
            self._metric("sft_loss", s_loss.item())
        # TRL's policy loss is already divided by the accumulation steps; scale the SFT term the same way.
        return loss + cfg.sft_beta * s_loss / self.current_gradient_accumulation_steps

    def _sft_term(self, model, examples):
        """The SFT loss in bounded memory, with as many forward passes on every process (see sft_loss.py)."""
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        rows = sft_loss.rows_for(head.out_features)  # not weight.shape: ZeRO-3 partitions it
        batches, calls = sft_loss.plan(examples, rows)
        reduce_max = None
        if self.accelerator.num_processes > 1:
            reduce_max = functools.partial(self.accelerator.reduce, reduction="max")
        forwards, calls = sft_loss.agree((len(batches), calls), reduce_max, self.accelerator.device)
        pad = self.processing_class.pad_token_id
        return sft_loss.sft_loss(model, head, batches, forwards, calls, rows, pad if pad is not None else 0,
                                 self.accelerator.device)

    def create_model_card(self, *args, **kwargs) -> None:
        """TRL's card (written into the run folder at every checkpoint) names base model "None" for a model passed
        in as an object; the run's card is written with final/ instead (training/model_card.py)."""

    # ---- atomic checkpoints -------------------------------------------------------------------------

    def _get_output_dir(self, trial):
        # While a checkpoint is being written, Trainer writes it under the staging folder.
        return self._staging if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run / checkpoints.STAGING
        self._staging = str(staging)

        def write():
            with checkpoints.saving(staging, f"checkpoint {name}", run):
                super(TeacherGRPOTrainer, self)._save_checkpoint(model, trial)
                if self.rollouts.depth > 0 or self.auto_depth is not None:  # sampled, not yet trained rollouts
                    (staging / name).mkdir(parents=True, exist_ok=True)
                    self.rollouts.save(judge_ahead.queue_file(staging / name, self.accelerator.process_index))

        try:  # a SaveError on any process is raised on every one, never left for the others to wait on
            agreement.run_agreed(self.accelerator, write, checkpoints.SaveError, f"writing {name}")
        finally:
            self._staging = None

        def publish():
            if not self.args.should_save:
                return
            state = {"global_step": self.state.global_step, "consecutive_failed": self.consecutive_failed}
            if self.judge_spend is not None:
                state[judge_spend.STATE_KEY] = self.judge_spend.state()
            if self.auto_depth is not None:
                state[judge_ahead.AUTO_STATE_KEY] = self.auto_depth.state()
            with checkpoints.saving(staging, f"checkpoint {name}", run):  # these write too (and fsync)
                checkpoints.write_state(staging / name, state)
                checkpoints.publish(staging / name, run / name)
            checkpoints.rotate(run, self.args.save_total_limit or 0)
            shutil.rmtree(staging, ignore_errors=True)  # only leftovers (a model card) remain there

        agreement.run_agreed(self.accelerator, publish, checkpoints.SaveError, f"publishing {name}")

    def restore_state(self, checkpoint: str | Path) -> None:
        """Our counters from a checkpoint (the Trainer restores weights, optimizer, scheduler, RNG, data)."""
        saved = checkpoints.read_state(Path(checkpoint))
        self.consecutive_failed = int(saved.get("consecutive_failed", 0))
        if self.judge_spend is not None:
            self.judge_spend.restore(Usage.from_dict(saved.get(judge_spend.STATE_KEY)))
        if self.auto_depth is not None:
            self.auto_depth.restore(saved.get(judge_ahead.AUTO_STATE_KEY))
            self.rollouts.depth = self.auto_depth.depth
        queued = judge_ahead.queue_file(Path(checkpoint), self.accelerator.process_index)
        if (self.rollouts.depth > 0 or self.auto_depth is not None) and queued.is_file():
            for rollout in judge_ahead.RolloutQueue.load(queued, self.accelerator.device):
                self._start_judging(rollout)  # answered by the judgement cache where graded before the stop
                self.rollouts.append(rollout)
