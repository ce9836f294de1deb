"""Configuration dataclasses. Every field carries its help text, which feeds the README table.

The flat keys are the seed's (same names, same meaning); sections (`lora`, `trl`, `criteria`) are new.
Loading, `--set` overrides and validation live in `config_load.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grpo_llm_eval.teacher import BACKENDS, JUDGE_MODES
from grpo_llm_eval.teacher.grading.rubric import SEED_EVALUATION_PROMPT

SEED_SYSTEM_PROMPT = "Respond in the following format:\n<think>\n...\n</think>\n...\n$\\boxed{answer}$"
BUNDLED_STUDENT = "bundled:smollm2-135m-instruct"
BUDGET_ENDS = ("stop", "verifier_only")  # on_budget_end


def _f(default: Any, help: str, **extra: Any) -> Any:
    """A dataclass field with help metadata (and optional `choices`, `min`, `max`, `secret`)."""
    meta = {"help": help, **extra}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraSection:
    """LoRA adapter settings (peft). With LoRA the reference model is the base with the adapter off."""

    enabled: bool = _f(False, "Train a LoRA adapter instead of all weights.")
    r: int = _f(16, "LoRA rank.", min=1)
    alpha: int = _f(32, "LoRA alpha (scaling numerator).", min=1)
    dropout: float = _f(0.0, "LoRA dropout; must be 0 with judge_ahead_steps > 0 unless trl.use_vllm (sampling and training log-probs would use different masks).", min=0.0, max=1.0)
    target_modules: Any = _f("all-linear", "Modules to adapt: 'all-linear' or a list of module names.")
    merge_on_save: bool = _f(False, "Also save a merged full model under final/merged/.")


@dataclass
class Config:
    """The whole run, as read from one YAML file."""

    # ---- models -------------------------------------------------------------------------------
    student_model_name: str = _f(BUNDLED_STUDENT, "Student: Hub id, local folder, or bundled:NAME.")
    teacher_model_name: str = _f(BUNDLED_STUDENT, "Teacher model: the served model name (openai) or a model (local).")
    teacher_backend: str = _f("local", "Where the teacher runs.", choices=BACKENDS)
    openai_base_url: str | list = _f("", "OpenAI-compatible base URL of the teacher; empty: the openai library's default. Key from OPENAI_API_KEY. A list of URLs (YAML list; on the command line --set 'openai_base_url=[URL1,URL2]') names replicas of one teacher: each call goes to the least-loaded healthy one, a failing one is taken out and probed back in, and its calls go to the others; credentials may differ per URL (user:password@).")
    use_unsloth: bool = _f(False, "Seed key: true warns once (unsloth is not wired: no GPU to verify it, and its TRL range) and loads with transformers and peft.")
    load_in_4bit: bool = _f(False, "Load the student in 4 bit (only where bitsandbytes and CUDA are there; else a warning).")
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "LoRA section (see below)."})
    # ---- data ---------------------------------------------------------------------------------
    dataset_name: str = _f("bundled:arithmetic", "Hub id, .jsonl/.json/.csv/.parquet file, save_to_disk folder, or bundled:NAME.")
    dataset_question_column: str = _f("question", "Column holding the question.")
    dataset_answer_column: str = _f("answer", "Column holding the ground-truth answer (may be empty or absent where rows carry a rubric).")
    dataset_rubric_column: str = _f("rubric", "Column holding each example's own rubric: a list of strings (checklist items), or of {id, criterion, description, weight, check} (a negative weight is a pitfall; check: a programmatic check, see data/constraints.py), or that list as JSON text. Rows without one are graded on the config's criteria; a row with one is graded on its items alone (see rubric_aggregation), worth at most the config criteria's top reward (sum of weight x max). Absent column: no row has one.")
    dataset_split: str = _f("train", "Split to train on.")
    eval_split: str = _f("test", "Held-out split for evaluation.")
    max_train_samples: int = _f(0, "Use at most this many training rows (0: all).", min=0)
    # ---- output -------------------------------------------------------------------------------
    output_dir: str = _f("runs", "Folder that holds run folders.")
    run_name: str = _f("", "Run folder name under output_dir; empty: a timestamp.")
    cache_dir: str = _f("~/.cache/grpo_llm_eval", "Cache for converted models and downloads.")
    save_steps: int = _f(50, "Save a checkpoint every this many steps.", min=1)
    save_total_limit: int = _f(3, "Keep only the last K checkpoints (0: keep all).", min=0)
    logging_steps: int = _f(1, "Log metrics every this many steps.", min=1)
    # ---- optimisation -------------------------------------------------------------------------
    learning_rate: float = _f(5e-7, "Learning rate.", min=0.0)
    warmup_steps: int = _f(0, "Linear warm-up steps.", min=0)
    total_steps: int = _f(1000, "Number of optimizer updates (TRL max_steps).", min=1)
    max_train_minutes: float = _f(0.0, "Stop training after this many minutes (from the first step; a checkpoint and final/ are saved); 0: no limit.", min=0.0)
    prompts_per_step: int = _f(4, "Prompts per update on each process; each yields num_return_sequences completions.", min=1)
    accumulation_steps: int = _f(1, "Gradient accumulation steps.", min=1)
    micro_batch_size: int = _f(0, "Completions per forward and backward pass of an update: an update's completions (prompts_per_step x num_return_sequences, times accumulation_steps) go through in slices of this many, their gradients summed; the same update with TRL's loss_type dapo (the default), grpo or dr_grpo, and the activations' memory of a slice instead of the whole batch. Must divide prompts_per_step x num_return_sequences. 0 (or the batch or more): the whole batch at once.", min=0)
    max_grad_norm: float = _f(0.1, "Gradient clipping norm.", min=0.0)
    seed: int = _f(3409, "Random seed.")
    grpo_beta: float = _f(0.0, "KL coefficient to the reference model (TRL beta).", min=0.0)
    # ---- generation (student) -----------------------------------------------------------------
    max_new_tokens: int = _f(256, "Max tokens per student completion.", min=1)
    num_return_sequences: int = _f(8, "Completions per prompt (the GRPO group size).", min=2)
    temperature: float = _f(0.7, "Student sampling temperature.", min=0.0)
    top_p: float = _f(0.9, "Student nucleus sampling.", min=0.0, max=1.0)
    top_k: int = _f(50, "Student top-k sampling (0: off).", min=0)
    repetition_penalty: float = _f(1.0, "Student repetition penalty.", min=0.0)
    fast_generation: bool = _f(True, "On CUDA without vLLM: sample with a static KV cache and compiled decoding (TRL turns compile off); ignored on CPU.")
    max_seq_length: int = _f(1024, "Max tokens of prompt plus completion: training skips (with a warning) prompts longer than max_seq_length - max_new_tokens; evaluation cuts prompts from the left to max_seq_length. Also the max tokens of an SFT example.", min=8)
    system_prompt: str = _f(SEED_SYSTEM_PROMPT, "System prompt for the student; empty: none.")
    think_open_string: str = _f("<think>", "Opening think tag.")
    think_close_string: str = _f("</think>", "Closing think tag.")
    # ---- teacher ------------------------------------------------------------------------------
    evaluation_prompt: str = _f(SEED_EVALUATION_PROMPT, "Teacher prompt; takes {question}, {student_response}, {ground_truth} and {rubric} (the example's own rubric items, fenced; for rows without one, the config's criteria). Rows with a rubric are graded with this prompt where it has {rubric} (their grade format is appended), else with a generated checklist prompt.")
    criteria: list = _f([], "Rubric criteria [{name, weight, description, min, max}]; empty: the seed's three.")
    rubric_aggregation: str = _f("explicit", "How an example's own rubric (dataset_rubric_column) becomes its score: explicit (each item graded met 1 / not met 0; the weights of the items met over the sum of the positive weights, clipped to [0, 1], as in RaR and HealthBench) or implicit (one holistic 0-10 score, the items as guidance). The score times the config criteria's top reward is the teacher's reward.", choices=("explicit", "implicit"))
    thought_process_weight: float = _f(0.07, "Weight of the thought_process score (seed rubric).", min=0.0)
    answer_weight: float = _f(0.1, "Weight of the answer score (seed rubric).", min=0.0)
    format_weight: float = _f(0.03, "Weight of the format score (seed rubric).", min=0.0)
    max_feedback_new_tokens: int = _f(512, "Max tokens of a teacher grade; a grade cut off by it is recorded 'truncated'. Where grades are decoded (openai; local without teacher_logprob_scores) it must hold a whole grade, else a config error. With the local backend's forced-key scores it bounds the explanation alone, and 0 writes none (the scores are the same; the feedback is the bare grade).", min=0)
    teacher_temperature: float = _f(0.0, "Teacher sampling temperature.", min=0.0)
    teacher_samples: int = _f(1, "Grade each completion (or group) this many times at teacher_temperature (> 0) and average each criterion; judge/sample_spread reports the spread of the rubric reward between the samples. Each sample is a teacher call of its own.", min=1)
    teacher_timeout_s: float = _f(120.0, "Timeout of one teacher call, seconds.", min=0.0)
    teacher_max_retries: int = _f(3, "Retries of a failed teacher call (backoff honours Retry-After).", min=0)
    teacher_max_concurrency: int = _f(32, "Teacher calls in flight at once across the whole batch (split evenly across processes under accelerate).", min=1)
    teacher_adaptive_concurrency: bool = _f(True, "Halve the teacher calls in flight when calls time out (a server that queues them), and grow them back by one per round of successes, up to teacher_max_concurrency (openai backend).")
    teacher_rpm: int = _f(0, "Teacher requests per minute for the whole run, retries included (one window for all processes where they share the run folder, else split evenly; openai backend); 0: no limit.", min=0)
    teacher_tpm: int = _f(0, "Teacher tokens (prompt + completion) per minute for the whole run (one window for all processes where they share the run folder, else split evenly; a call counts its estimate until its usage is known; openai backend); 0: no limit.", min=0)
    teacher_price_input_per_mtok: float = _f(0.0, "Price of the teacher's prompt tokens, US dollars per million; with the output price it turns tokens into judge/cost_usd.", min=0.0)
    teacher_price_output_per_mtok: float = _f(0.0, "Price of the teacher's completion tokens, US dollars per million.", min=0.0)
    teacher_price_cached_input_per_mtok: float | None = _f(None, "Price of the prompt tokens the server reports read from its prompt cache (usage.prompt_tokens_details.cached_tokens), US dollars per million; unset (null): the input price. Hosted APIs bill them at 0.1x to 0.5x the input price.", min=0.0)
    teacher_max_total_tokens: int = _f(0, "Stop training (with a checkpoint and final/) once the teacher has used this many prompt + completion tokens in the run, resumes included; 0: no limit.", min=0)
    teacher_max_cost_usd: float = _f(0.0, "Stop training (with a checkpoint and final/) once the teacher has cost this many US dollars (needs the prices); 0: no limit.", min=0.0)
    on_budget_end: str = _f("stop", "What a spent teacher budget (teacher_max_total_tokens, teacher_max_cost_usd) does: stop (with a checkpoint and final/), or verifier_only: train on with the verifiers' rewards alone (needs verifier_answer_weight or verifier_format_weight > 0); the switch is logged once and marked judge/verifier_only in metrics.jsonl and the report.", choices=BUDGET_ENDS)
    teacher_structured_output: bool = _f(False, "Ask for JSON-schema-constrained grades (response_format); falls back if refused.")
    teacher_logprob_scores: bool = _f(False, "Score = probability-weighted mean over score tokens (openai: needs top_logprobs; local: JSON keys forced, no grammar decoding).")
    teacher_weight: float = _f(1.0, "Weight of the teacher's rubric reward among all rewards.", min=0.0)
    teacher_cache: bool = _f(True, "Answer repeated (model, rubric, prompt, response) from the run's cache.")
    judge_mode: str = _f("pointwise", "How the teacher grades: pointwise (one call per completion) or group (one call grades a prompt's completions together, up to num_return_sequences a call, in a seeded shuffled order, each fenced; identical completions sent once). A group call may write up to its size x max_feedback_new_tokens. Logprob scores are pointwise only (openai).", choices=JUDGE_MODES)
    group_judge_passes: int = _f(1, "judge_mode group: grade each group this many times (1 or 2). 2: the second pass shows the reversed order, scores are averaged per criterion (a completion is masked unless both passes graded it), and judge/position_flip_rate counts groups whose ranking the order changed.", min=1, max=2)
    judge_ahead_steps: int | str = _f("auto", "Grade each batch in the background and train on it this many updates after sampling it, so judging overlaps training and generation (importance-corrected); auto: the smallest lag that hides the measured teacher latency behind the measured step time (0 for a teacher faster than a tenth of a step, at most judge_ahead_max_steps; logged when it changes); 0: wait for the grades, as the seed.")
    judge_ahead_max_steps: int = _f(4, "Upper bound of the lag that judge_ahead_steps: auto may choose (each step of lag is one more update between sampling a batch and training on it).", min=0)
    # ---- verifiers ----------------------------------------------------------------------------
    verifier_answer_weight: float = _f(0.0, "Weight of the math-verify answer check (1 right, 0 wrong).", min=0.0)
    verifier_format_weight: float = _f(0.0, "Weight of the think-tag format check.", min=0.0)
    verifier_checklist_weight: float = _f(0.0, "Weight of the programmatic checks of an example's own rubric items (those with a check, as in bundled:instructions): the weighted share met, in [0, 1]; rows without checkable items add nothing.", min=0.0)
    verifier_veto: bool = _f(False, "A failed answer check caps the teacher's answer score at its minimum.")
    verifier_monitor: bool = _f(True, "Check answers (math-verify) for the verifier/answer_accuracy metric even where no weight or veto uses the check; false skips the check then.")
    # ---- SFT on feedback ----------------------------------------------------------------------
    sft_beta: float = _f(0.0, "Weight of the SFT loss on teacher feedback, added to the GRPO loss.", min=0.0)
    sft_target: str = _f("feedback", "SFT target.", choices=("feedback", "best_response"))
    sft_recheck_prompt: str = _f("Let's recheck the previous answer", "User turn before the teacher's feedback in SFT examples.")
    # ---- robustness ---------------------------------------------------------------------------
    max_consecutive_failed_steps: int = _f(5, "Stop (with a checkpoint) after this many steps whose grades all failed.", min=1)
    eval_steps: int = _f(0, "Every this many steps, grade greedy answers to held-out prompts; logs eval/* metrics (0: off).", min=0)
    eval_limit: int = _f(32, "Held-out prompts (the first N of eval_split) graded at each eval_steps evaluation.", min=1)
    # ---- judge monitors -----------------------------------------------------------------------
    monitor_min_auc: float = _f(0.6, "Judge alarm when, over the last monitor_window steps, the ROC AUC of the teacher's answer score against the verifier's answer check falls below this (0: off). See `calibrate`.", min=0.0, max=1.0)
    monitor_window: int = _f(10, "Steps in the judge monitors' rolling window (the AUC alarm and the reward-hacking alarm: teacher reward rising while verifier accuracy falls).", min=2)
    on_judge_alarm: str = _f("warn", "What a judge alarm does: warn once (and record it in metrics.jsonl), or stop with a checkpoint and a non-zero exit.", choices=("warn", "stop"))
    # ---- pass-through -------------------------------------------------------------------------
    trl: dict = _f({}, "Any trl.GRPOConfig field, e.g. {loss_type: dr_grpo}; wins over mapped keys.")
