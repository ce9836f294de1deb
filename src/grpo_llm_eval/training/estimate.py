"""What a configured run will ask of its teacher, before it starts (`grpo_llm_eval --dry-run`).

Calls: one per completion (pointwise) or one per prompt's group (group mode, times `group_judge_passes`), times
`teacher_samples`, for `total_steps` steps of `prompts_per_step x accumulation_steps` prompts on one process
(the processes of a multi-GPU run each take as many). An upper bound: identical completions, the judgement cache,
a stopped run and a spent budget only lower it; evaluation during training (`eval_steps`) is not counted.

Prompt tokens: the teacher prompts of a sample of the real rows (up to 16), each graded response taken as
`max_new_tokens` tokens long (students often stop sooner). Counted with the teacher's own tokenizer where it
is a local folder, else estimated as characters / 4 (said in the output). Completion tokens: from the rubric's
bare grade (typical tokens; explanations come on top) up to the cap `max_feedback_new_tokens` per graded
response. Measured against a short real run in tests/test_judge_spend.py::TestEstimate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.usage import Prices, Usage

logger = logging.getLogger(__name__)

SAMPLE_ROWS = 16
CHARS_PER_TOKEN = 4


@dataclass
class Estimate:
    calls: int
    prompt_tokens: int
    completion_tokens_low: int  # bare grades
    completion_tokens_high: int  # every grade at the cap
    counted_with: str  # "the teacher's tokenizer" or "characters / 4"
    prices: Prices

    def lines(self) -> list[str]:
        """The estimate for people, as YAML comments (so --dry-run's output stays valid YAML)."""
        low = Usage(self.calls, self.prompt_tokens, self.completion_tokens_low)
        high = Usage(self.calls, self.prompt_tokens, self.completion_tokens_high)
        out = [f"# teacher estimate (one process, upper bound on calls; prompt tokens counted with {self.counted_with}):",
               f"#   calls: {self.calls:,}",
               f"#   prompt tokens: {self.prompt_tokens:,}",
               f"#   completion tokens: {self.completion_tokens_low:,} (bare grades) to {self.completion_tokens_high:,} "
               "(every grade at max_feedback_new_tokens)"]
        if self.prices.priced:
            out.append(f"#   cost: ${self.prices.cost_usd(low):.4f} to ${self.prices.cost_usd(high):.4f} "
                       "(prompt tokens at the input price: a prompt cache only lowers it)")
        return out


def _counter(cfg):
    """(count tokens of a text, what counts them): the teacher's tokenizer where it is a local folder."""
    path = Path(str(cfg.teacher_model_name)).expanduser()
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), "the teacher's tokenizer"
        except Exception as exc:  # a folder it cannot read: the stated estimate instead
            logger.debug("cannot load the teacher's tokenizer from %s: %s", path, exc)
    return (lambda text: -(-len(text) // CHARS_PER_TOKEN)), f"characters / {CHARS_PER_TOKEN}"


def estimate(cfg, rows: list[dict]) -> Estimate:
    """The teacher spend of the configured run, from ROWS (dicts with question and answer), a sample of its data."""
    from grpo_llm_eval.teacher.grading.group_prompt import GroupPrompt

    count, counted_with = _counter(cfg)
    rubric = Rubric.from_config(cfg)
    json_mode = cfg.teacher_structured_output
    response = ("word " * cfg.max_new_tokens).strip()  # about max_new_tokens tokens, the longest a response gets
    group_size = cfg.num_return_sequences
    prompts = cfg.total_steps * cfg.prompts_per_step * cfg.accumulation_steps
    sample = rows[:SAMPLE_ROWS] or [{"question": "", "answer": None}]
    texts = []
    for row in sample:
        question, truth = str(row.get("question") or ""), row.get("answer")
        truth = None if truth is None else str(truth)
        if cfg.judge_mode == "group":
            messages = GroupPrompt(rubric).messages(question, truth, [response] * group_size, json_mode=json_mode)
        else:
            messages = rubric.messages(question, response, truth, json_mode=json_mode)
        texts.append("\n".join(str(m["content"]) for m in messages))
    per_call = sum(count(t) for t in texts) / len(texts)
    grades_per_call = group_size if cfg.judge_mode == "group" else 1
    calls = prompts * cfg.teacher_samples * (cfg.group_judge_passes if cfg.judge_mode == "group" else group_size)
    bare = min(rubric.grade_tokens(json_mode)[1], cfg.max_feedback_new_tokens)  # forced-key scores write fewer
    return Estimate(calls, round(calls * per_call), calls * grades_per_call * bare,
                    calls * grades_per_call * cfg.max_feedback_new_tokens, counted_with,
                    Prices(cfg.teacher_price_input_per_mtok, cfg.teacher_price_output_per_mtok,
                           cfg.teacher_price_cached_input_per_mtok))


def estimate_lines(cfg) -> list[str]:
    """--dry-run's estimate, or one line saying why there is none (the data could not be read, say)."""
    if cfg.teacher_weight <= 0:
        return ["# teacher estimate: no teacher calls (teacher_weight is 0)"]
    from grpo_llm_eval import data as data_mod

    try:
        loaded = data_mod.load_rows(cfg, cfg.dataset_split)
        rows = loaded.dataset.select(range(min(SAMPLE_ROWS, len(loaded.dataset)))).to_list()
    except Exception as exc:  # --dry-run still validates and prints the config
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return [f"# teacher estimate: unavailable, the data could not be read ({first})"]
    return estimate(cfg, rows).lines()
