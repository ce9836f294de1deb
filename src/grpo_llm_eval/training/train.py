"""The training entry point, top to bottom: config -> run folder -> data -> teacher -> student -> trainer -> save."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from grpo_llm_eval import data as data_mod
from grpo_llm_eval import models
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.training import checkpoints, model_card, run_dir
from grpo_llm_eval.training.agreement import run_agreed

logger = logging.getLogger(__name__)


class TrainingAborted(Exception):
    """Training stopped on purpose (e.g. every grade failed for too long); a checkpoint was written."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint; `exit_code` is 130 or 143."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    final_dir: Path | None


def grpo_args(cfg, out_dir: Path):
    """Map the seed's keys onto trl.GRPOConfig; the `trl:` section wins over mapped values."""
    import torch
    from trl import GRPOConfig

    cuda = torch.cuda.is_available()
    batch = cfg.prompts_per_step * cfg.num_return_sequences
    micro = min(cfg.micro_batch_size or batch, batch)
    mapped = dict(
        output_dir=str(out_dir),
        max_steps=cfg.total_steps,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        beta=cfg.grpo_beta,
        num_generations=cfg.num_return_sequences,
        max_completion_length=cfg.max_new_tokens,
        # micro_batch_size: the batch in slices, their gradients accumulated; the generation batch (per-device
        # batch x steps_per_generation, which defaults to the accumulation steps) stays the same.
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.accumulation_steps * (batch // micro),
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        repetition_penalty=cfg.repetition_penalty,
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit or None,
        logging_steps=cfg.logging_steps,
        use_cpu=not cuda,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        report_to="none",
        disable_tqdm=not sys.stderr.isatty(),
        remove_unused_columns=False,
        log_completions=False,
    )
    mapped.update(cfg.trl)
    # TRL's own push would upload the run folder (rollouts, the judgement cache) and reach the Hub when the trainer
    # is built; final/ is pushed with its card once it is saved (model_card.push_final).
    mapped["push_to_hub"] = False
    return GRPOConfig(**mapped)


def _filter_long_prompts(dataset, tokenizer, cfg):
    """Drop prompts that leave no room for the completion within max_seq_length; count them."""
    limit = cfg.max_seq_length - cfg.max_new_tokens  # validation refuses <= 0; here every prompt would go

    def fits(row):
        ids = tokenizer.apply_chat_template(row["prompt"], tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) else ids
        return len(ids) <= limit

    kept = dataset.filter(fits)
    dropped = len(dataset) - len(kept)
    if dropped:
        logger.warning("Skipped %d of %d prompts longer than max_seq_length - max_new_tokens = %d tokens.",
                       dropped, len(dataset), limit)
    if len(kept) == 0:
        raise data_mod.DataError(f"every prompt is longer than max_seq_length - max_new_tokens = {limit} tokens; "
                                 "raise max_seq_length or lower max_new_tokens.")
    return kept


def train(cfg, resume: str | Path | None = None) -> TrainResult:
    """Run GRPO training as configured; returns where the run lives. RESUME: a checkpoint folder to continue."""
    cfg, out, is_main = _prepare_run(cfg, resume)
    loaded = data_mod.load_rows(cfg, cfg.dataset_split)
    dataset = data_mod.build_prompts(loaded.dataset, cfg)
    rubric = Rubric.from_config(cfg)
    teacher = build_teacher(cfg, rubric, cache_path=out / "judgements.sqlite") if cfg.teacher_weight > 0 else None
    if teacher is not None:
        asyncio.run(teacher.health_check())  # fail fast, before any model is loaded
    trainer, reward, recorder = _build_trainer(cfg, out, dataset, rubric, teacher, is_main)
    guard, stopper, monitor = _attach_callbacks(trainer, cfg, rubric, teacher, recorder, out, is_main)
    if resume:
        trainer.restore_state(resume)
        logger.info("Resuming %s from %s", out, resume)
    stopper.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stopper.uninstall()
        recorder.close()
        reward.cancel_background()  # rollouts sampled ahead of a stop; they are saved in the checkpoint
        if teacher is not None:
            _close_teacher(teacher, getattr(trainer, "async_loop", None))
    _raise_if_stopped(trainer, cfg, out, stopper, guard, monitor)
    final = save_final(trainer, cfg, out)
    if cfg.trl.get("push_to_hub") and is_main:
        model_card.push_final(final, cfg.trl)
    return TrainResult(run_dir=out, global_step=trainer.state.global_step, final_dir=final)


def _close_teacher(teacher, loop) -> None:
    """Close the teacher on TRL's event loop; a teacher slow to close must not cost the trained model."""
    if loop is None or not loop.is_running():
        return
    import concurrent.futures

    try:
        asyncio.run_coroutine_threadsafe(teacher.aclose(), loop).result(timeout=60)
    except (TimeoutError, concurrent.futures.TimeoutError):
        logger.warning("The teacher did not close within 60 s; going on without waiting for it.")


def _prepare_run(cfg, resume):
    """Name the run (one name for every process), create or reopen its folder, cut records for a resume."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    _refuse_fsdp_without_gpus()
    # cpu= as TrainingArguments decides it later: without it, processes launched on CPUs would not join one
    # group, and each would take itself for the main process.
    state = PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))
    if not cfg.run_name:  # one timestamp for every process, or each would name its own folder
        from accelerate.utils import broadcast_object_list

        cfg = dataclasses.replace(cfg, run_name=broadcast_object_list([run_dir.run_dir_for(cfg).name])[0])
    out = run_dir.prepare(cfg, resume=bool(resume)) if state.is_main_process else run_dir.run_dir_for(cfg)
    if state.is_main_process:
        shutil.rmtree(out / checkpoints.STAGING, ignore_errors=True)  # a save cut short by a crash
        if resume:
            checkpoints.truncate_records(out, checkpoints.step_of(Path(resume)))
    state.wait_for_everyone()
    return cfg, out, state.is_main_process


def _refuse_fsdp_without_gpus() -> None:
    """`accelerate launch` with an FSDP config (configs/accelerate/fsdp2.yaml) where no GPU is visible is no FSDP:
    accelerate starts independent single-process runs into one run folder (or, with ACCELERATE_USE_CPU=1, DDP)."""
    import torch
    from accelerate.utils import parse_flag_from_env

    from grpo_llm_eval.config.load import ConfigError

    if parse_flag_from_env("ACCELERATE_USE_FSDP") and not torch.cuda.is_available():
        raise ConfigError(["accelerate launch with FSDP (e.g. configs/accelerate/fsdp2.yaml) needs GPUs, and none is "
                           "visible: accelerate cannot run FSDP on CPU (the processes would train apart into one run "
                           "folder); launch with configs/accelerate/cpu_2proc.yaml for several CPU processes, or on "
                           "a machine with GPUs"])


def _build_trainer(cfg, out: Path, dataset, rubric, teacher, is_main: bool):
    """Student, reward, recorder and our GRPOTrainer subclass."""
    from grpo_llm_eval.rewards import TeacherRubricReward
    from grpo_llm_eval.training.records import RolloutRecorder
    from grpo_llm_eval.training.trainer import TeacherGRPOTrainer

    _share_cpu_with_local_teacher(cfg)
    student = models.load_student(cfg)
    dataset = _filter_long_prompts(dataset, student.tokenizer, cfg)
    recorder = RolloutRecorder(out, cfg.num_return_sequences, is_main=is_main)
    reward = TeacherRubricReward(cfg, rubric, teacher, recorder)
    trainer = TeacherGRPOTrainer(
        model=student.model, reward_funcs=[reward], args=grpo_args(cfg, out), train_dataset=dataset,
        processing_class=student.tokenizer, peft_config=models.lora_config(cfg),
        run_cfg=cfg, recorder=recorder, reward=reward,
    )
    return trainer, reward, recorder


def _share_cpu_with_local_teacher(cfg) -> None:
    """On CPU, keep torch within this process's share of the cores (every core for one process; the machine's
    cores over the processes launched on it otherwise), less the cores of an in-process teacher that grades
    while torch trains (judging ahead): oversubscribed cores slow both down. Without judging ahead the teacher
    and torch take turns, each with the whole share. Lowers torch's threads, never raises them."""
    import torch

    if torch.cuda.is_available():
        return
    from grpo_llm_eval.teacher.backends.local_backend import cores_per_process, default_threads, usable_cores

    concurrent = cfg.teacher_weight > 0 and cfg.teacher_backend == "local" and cfg.judge_ahead_steps != 0
    threads = max(1, cores_per_process() - (default_threads() if concurrent else 0))
    if threads < torch.get_num_threads():
        logger.info("torch uses %d of %d CPU threads (this process's share: %d cores%s).", threads, usable_cores(),
                    cores_per_process(), "; the local teacher the rest" if concurrent else "")
        torch.set_num_threads(threads)


def _attach_callbacks(trainer, cfg, rubric, teacher, recorder, out: Path, is_main: bool):
    """Records, the failed-grades guard, judge monitors, the time budget, evaluation, signals, progress display."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from grpo_llm_eval.evaluation.monitors import JudgeMonitorCallback
    from grpo_llm_eval.training.agreement import agreed_max
    from grpo_llm_eval.training.callbacks import (
        FailedGradesGuard,
        ProgressBar,
        ProgressLines,
        RecordsCallback,
        StopOnSignal,
        TimeBudget,
        WeightDigestCallback,
    )

    agree = agreed_max(trainer.accelerator)  # stops taken by every process at the same step end
    guard = FailedGradesGuard(trainer, cfg.max_consecutive_failed_steps)
    stopper = StopOnSignal(agree)
    if teacher is not None:  # calls, tokens and cost in metrics.jsonl; the teacher budgets
        from grpo_llm_eval.training.judge_spend import JudgeSpend

        trainer.judge_spend = JudgeSpend(trainer, teacher.usage, out / "judgements.sqlite")
        trainer.add_callback(trainer.judge_spend)
    records = RecordsCallback(recorder, out, is_main)
    trainer.add_callback(records)
    trainer.add_callback(guard)
    monitor = JudgeMonitorCallback(trainer, cfg, rubric, records, out) if teacher is not None else None
    if monitor is not None:
        trainer.add_callback(monitor)
    if cfg.max_train_minutes > 0:
        trainer.add_callback(TimeBudget(cfg.max_train_minutes, agree))
    if cfg.eval_steps > 0:
        from grpo_llm_eval.training.eval_callback import EvalCallback

        trainer.add_callback(EvalCallback(trainer, cfg, rubric, teacher))
    trainer.add_callback(stopper)
    # Our own progress display (a bar on a terminal, plain lines otherwise) instead of Trainer's dict printing.
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(ProgressLines() if trainer.args.disable_tqdm else ProgressBar())
    digests = WeightDigestCallback.from_env(trainer.accelerator.process_index)
    if digests is not None:  # GRPO_LLM_EVAL_DUMP_WEIGHTS_DIR: a test checks every process ends with the same weights
        trainer.add_callback(digests)
    return guard, stopper, monitor


def _raise_if_stopped(trainer, cfg, out: Path, stopper, guard, monitor) -> None:
    """A signal, the failed-grades guard or a judge alarm ended training: say how to resume, with the right exit code."""
    import signal

    if stopper.signal_number is not None and stopper.stopped_at is None:
        logger.warning("%s arrived after the last step: the run is complete; saving the final model.",
                       signal.Signals(stopper.signal_number).name)
    if stopper.stopped_at is not None:
        name = signal.Signals(stopper.signal_number).name
        # Every process took this stop at the same step; none exits (and has the launcher end the others)
        # before all have finished training's last collectives and callbacks.
        trainer.accelerator.wait_for_everyone()
        ckpt = out / f"checkpoint-{trainer.state.global_step}"
        raise TrainingInterrupted(
            f"stopped by {name} at step {trainer.state.global_step} with a checkpoint in {ckpt}; resume with: "
            f"grpo_llm_eval --resume {ckpt}", 128 + stopper.signal_number)
    if guard.tripped:
        raise TrainingAborted(
            f"every grade failed for {cfg.max_consecutive_failed_steps} steps in a row; stopped at step "
            f"{trainer.state.global_step} with a checkpoint in {out}. Check the teacher (see judge_status in "
            f"rollouts.jsonl), then resume with --resume.")
    if monitor is not None and monitor.tripped is not None:
        raise TrainingAborted(
            f"{monitor.tripped.message}; on_judge_alarm: stop saved checkpoint-{trainer.state.global_step} in {out}. "
            "Measure the teacher with `grpo_llm_eval calibrate`, or set on_judge_alarm: warn to train on.")


def save_final(trainer, cfg, out: Path) -> Path | None:
    """final/ loads with from_pretrained (the adapter with LoRA; plus final/merged/ when asked).

    Written to final.partial/ and published by a rename (checkpoints.publish), so a crash or a full disk during
    the save never leaves a half-written final/, and a resumed run's earlier final/ stays whole until the new one is.
    """
    final, staged = out / "final", out / checkpoints.FINAL_STAGING
    main = trainer.accelerator.is_main_process
    if main:
        shutil.rmtree(staged, ignore_errors=True)  # a crashed save's leftovers
    trainer.accelerator.wait_for_everyone()

    def write():
        with checkpoints.saving(staged, "the final model", out):
            trainer.save_model(str(staged))
            if main:
                trainer.processing_class.save_pretrained(str(staged))
                if cfg.lora.enabled and cfg.lora.merge_on_save:
                    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
                    merged.save_pretrained(str(staged / "merged"))
                    trainer.processing_class.save_pretrained(str(staged / "merged"))
                _write_card(out, staged)

    def publish():
        if main:
            with checkpoints.saving(staged, "the final model", out):
                checkpoints.publish(staged, final)

    # A SaveError on any process is raised on every one (the others would wait for it at a barrier).
    run_agreed(trainer.accelerator, write, checkpoints.SaveError, "writing the final model")
    run_agreed(trainer.accelerator, publish, checkpoints.SaveError, "publishing the final model")
    return final


def _write_card(out: Path, staged: Path) -> None:
    """The model card, over peft's, in final/ and the run folder; a card that cannot be built never costs the model
    (a full disk still can: checkpoints.saving names it)."""
    try:
        model_card.write_card(out, staged)
    except OSError:
        raise
    except Exception as exc:
        logger.warning("The model card could not be written (%s: %s); final/ is saved without it.",
                       type(exc).__name__, exc)
