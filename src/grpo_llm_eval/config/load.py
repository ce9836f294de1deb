"""YAML loading, `--set` overrides and one validation pass whose errors name key, value and fix."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from grpo_llm_eval.config import Config, LoraSection


class ConfigError(Exception):
    """Invalid configuration; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def default_config_text() -> str:
    """The embedded offline default (the same text as configs/offline.yaml)."""
    return resources.files("grpo_llm_eval.assets").joinpath("offline.yaml").read_text(encoding="utf-8")


def read_yaml(path: str | None) -> dict:
    """Read a config mapping with `yaml.safe_load`; None reads the embedded offline default."""
    if path is None:
        text, where = default_config_text(), "the embedded offline config"
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError([f"--config {path}: no such file; pass the path of a YAML config (see configs/)."])
        text, where = p.read_text(encoding="utf-8", errors="replace"), str(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise ConfigError([f"{where}: invalid YAML{at}: {getattr(exc, 'problem', exc)}; fix the syntax."]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{where}: the top level must be a mapping of key: value, got {type(data).__name__}."])
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `KEY=VALUE` overrides (values parsed as YAML; dotted keys reach into sections)."""
    out = dict(data)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set total_steps=2.")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return out


def _is_instance(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    if isinstance(hint, types.UnionType):  # e.g. float | None, str | list
        return any(_is_instance(value, h) for h in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _check_section(cls: type, data: dict, prefix: str, problems: list[str]) -> dict:
    """Type, range and choice checks of one dataclass section; returns the coerced values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"did you mean '{prefix}{near[0]}'?" if near else f"see the configuration table in the README for valid keys of {cls.__name__}."
            problems.append(f"{name}: unknown key; {hint}")
            continue
        hint, meta = hints[key], fields[key].metadata
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                problems.append(f"{name}: expected a mapping (section), got {value!r}.")
                continue
            values[key] = hint(**_check_section(hint, value, f"{name}.", problems))
            continue
        if (hint is float or float in typing.get_args(hint)) and isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-7 as a string
        if hint is str and value is None:
            value = ""
        if not _is_instance(value, hint):
            want = getattr(hint, "__name__", str(hint))
            problems.append(f"{name}: expected {want}, got {value!r} ({type(value).__name__}); write a {want}.")
            continue
        if (hint is float or float in typing.get_args(hint)) and value is not None:
            value = float(value)
        if "choices" in meta and value not in meta["choices"]:
            problems.append(f"{name}: {value!r} is not one of {', '.join(meta['choices'])}; pick one of them.")
            continue
        if "min" in meta and value is not None and value < meta["min"]:
            problems.append(f"{name}: {value!r} is below the minimum {meta['min']}; use a value >= {meta['min']}.")
            continue
        if "max" in meta and value is not None and value > meta["max"]:
            problems.append(f"{name}: {value!r} is above the maximum {meta['max']}; use a value <= {meta['max']}.")
            continue
        values[key] = value
    return values


def _check_trl(section: dict, problems: list[str]) -> None:
    from trl import GRPOConfig  # imported only when the section is used: importing trl takes seconds

    valid = [f.name for f in dataclasses.fields(GRPOConfig)]
    for key in section:
        if key not in valid:
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            tip = f"did you mean 'trl.{near[0]}'?" if near else "it must be a field of trl.GRPOConfig."
            problems.append(f"trl.{key}: not a trl.GRPOConfig field; {tip}")


def _check_hub(section: dict, problems: list[str]) -> None:
    """`trl.push_to_hub` pushes final/ with its card once training ends (training/model_card.py), not TRL's way."""
    if "hub_token" in section:
        problems.append("trl.hub_token: a token in the config would be written to the run's config.yaml; drop it "
                        "and give the token as HF_TOKEN in the environment, or run `hf auth login` once.")
    if section.get("push_to_hub") and not section.get("hub_model_id"):
        problems.append("trl.push_to_hub: true needs trl.hub_model_id, the repo to push to, e.g. "
                        "trl: {push_to_hub: true, hub_model_id: your-name/your-model}.")
    for key in ("hub_strategy", "hub_always_push"):
        if key in section and section[key] not in ("end", False):
            problems.append(f"trl.{key}: {section[key]!r}: only final/ is pushed, once, with its model card, when "
                            f"training ends; drop trl.{key} (push a checkpoint yourself with `hf upload`).")


def _check_criteria(criteria: list, problems: list[str]) -> None:
    for i, c in enumerate(criteria):
        where = f"criteria[{i}]"
        if not isinstance(c, dict):
            problems.append(f"{where}: expected a mapping with name, weight, description, min, max; got {c!r}.")
            continue
        name = c.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            problems.append(f"{where}.name: {name!r} must be an identifier such as 'answer' (letters, digits, _).")
        unknown = set(c) - {"name", "weight", "description", "min", "max"}
        if unknown:
            problems.append(f"{where}: unknown keys {sorted(unknown)}; allowed: name, weight, description, min, max.")
        lo, hi, w = c.get("min", 0), c.get("max", 10), c.get("weight", 1.0)
        if not all(_is_instance(v, float) for v in (lo, hi, w)) or lo >= hi or w < 0:
            problems.append(f"{where}: need numbers with min < max and weight >= 0; got min={lo!r} max={hi!r} weight={w!r}.")
    names = [c.get("name") for c in criteria if isinstance(c, dict)]
    if len(names) != len(set(names)):
        problems.append("criteria: names must be unique; rename the duplicates.")


def _check_grade_room(cfg: Config, problems: list[str]) -> None:
    """Refuse a max_feedback_new_tokens no grade of the rubric fits in, where the backend decodes its grades
    (openai; local without forced-key scores, whose explanation alone is decoded and may be short). The
    forced-key scorer needs integer scales within 0..99 (and a tokenizer that writes digits singly, which
    only the loaded teacher can tell: a grade cut off there is recorded 'truncated' with a warning)."""
    from grpo_llm_eval.teacher.backends.local_scores import forced_scale  # the teacher package imports Config
    from grpo_llm_eval.teacher.grading.rubric import Rubric

    rubric = Rubric.from_config(cfg)
    if (cfg.teacher_backend == "local" and cfg.teacher_logprob_scores
            and all(forced_scale(c) is not None for c in rubric.criteria)):
        if cfg.max_feedback_new_tokens == 0 and cfg.sft_beta > 0 and cfg.sft_target == "feedback":
            problems.append(
                f"max_feedback_new_tokens: 0 with sft_beta: {cfg.sft_beta} and sft_target: feedback: the local "
                "teacher would write no explanation, so SFT would train on bare scores; set max_feedback_new_tokens "
                "above 0 (e.g. 32), or sft_target: best_response.")
        return
    json_mode = cfg.teacher_structured_output
    fewest, typical = rubric.grade_tokens(json_mode, compact=cfg.teacher_backend == "local")
    if cfg.max_feedback_new_tokens < fewest:
        problems.append(
            f"max_feedback_new_tokens: {cfg.max_feedback_new_tokens} cannot hold one grade: the {cfg.teacher_backend} "
            f"backend decodes grades, and a bare {'JSON' if json_mode else 'XML'} grade of this rubric takes at "
            f"least {fewest} tokens (about {typical}, before explanations and thinking); raise it, e.g. to 512. "
            "(Only the local backend's forced-key scores, teacher_logprob_scores: true, get by with a few tokens.)")

def _check_samples(cfg: Config, problems: list[str], criteria_ok: bool) -> None:
    """Refuse teacher_samples > 1 where the repeats would be the same grade: k times the calls for nothing.
    CRITERIA_OK: the criteria passed their checks, so the rubric can be built."""
    if cfg.teacher_samples <= 1:
        return
    from grpo_llm_eval.teacher.backends.local_scores import forced_scale
    from grpo_llm_eval.teacher.grading.rubric import Rubric

    if cfg.teacher_temperature == 0:
        problems.append(
            f"teacher_samples: {cfg.teacher_samples} with teacher_temperature: 0: every sample would be the same "
            "grade, at teacher_samples times the calls; set teacher_temperature above 0 (e.g. 0.7), or "
            "teacher_samples: 1.")
    elif (criteria_ok and cfg.teacher_backend == "local" and cfg.teacher_logprob_scores
          and all(forced_scale(c) is not None for c in Rubric.from_config(cfg).criteria)):
        # An error, not a warning: the forced-key scorer reads digit probabilities and decodes its explanation
        # greedily, so teacher_temperature never reaches it and the k grades are identical by construction.
        problems.append(
            f"teacher_samples: {cfg.teacher_samples} with the local backend's forced-key scores "
            "(teacher_logprob_scores: true): they read probabilities and ignore teacher_temperature, so every "
            "sample would be the same grade; set teacher_samples: 1 (the probability-weighted score is already "
            "an average over the teacher's choices), or teacher_logprob_scores: false to sample decoded grades.")


def _check_micro_batch(cfg: Config, problems: list[str]) -> None:
    """micro_batch_size slices an update through TRL's gradient accumulation: refuse it where the slices would not
    add up to the same update."""
    micro, batch = cfg.micro_batch_size, cfg.prompts_per_step * cfg.num_return_sequences
    if not micro or micro >= batch:  # the whole batch at once
        return
    if batch % micro:
        problems.append(f"micro_batch_size: {micro} does not divide an update's {batch} completions (prompts_per_step "
                        f"x num_return_sequences); use a divisor of {batch}, or 0 for the whole batch at once.")
    taken = [k for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation",
                         "generation_batch_size") if k in cfg.trl]
    if taken:
        problems.append(f"micro_batch_size: {micro} sets TRL's batch sizes, and trl.{taken[0]} sets them too; drop "
                        "one of the two.")
    loss = cfg.trl.get("loss_type", "dapo")
    if loss not in ("dapo", "grpo", "dr_grpo"):
        problems.append(f"micro_batch_size: {micro} with trl.loss_type: {loss}: that loss is normalised per slice, so "
                        "slicing would change the update; set micro_batch_size: 0, or a loss_type of dapo, grpo or "
                        "dr_grpo.")
    if cfg.sft_beta > 0:
        problems.append(f"micro_batch_size: {micro} with sft_beta: {cfg.sft_beta}: the SFT term is not sliced with the "
                        "batch (untested); set micro_batch_size: 0 to train with SFT.")


def _check_judge_ahead(cfg: Config, problems: list[str]) -> None:
    """Judging ahead is exact only when one generation batch is one optimizer update, trained once, with the
    same log-probs at sampling and training time (see judge_ahead.py); refuse the settings where it is not."""
    depth = cfg.judge_ahead_steps
    if depth != "auto" and (isinstance(depth, (str, bool)) or depth < 0):
        problems.append(f"judge_ahead_steps: {depth!r} is neither auto nor a whole number >= 0; write auto (the lag "
                        "follows the teacher's measured latency), 0 (wait for the grades) or a fixed lag such as 1.")
        return
    # auto falls back to 0, with a warning, where the trainer finds these settings (judge_ahead.check_exact).
    if depth == "auto" or depth == 0 or cfg.teacher_weight <= 0:
        return
    fix = "or set judge_ahead_steps: 0 to wait for the grades"
    accum = cfg.trl.get("gradient_accumulation_steps", cfg.accumulation_steps)
    if cfg.trl.get("num_iterations", 1) != 1:
        problems.append(
            f"trl.num_iterations: {cfg.trl['num_iterations']!r} with judge_ahead_steps: {cfg.judge_ahead_steps}: each "
            "batch would train on several updates, so the lag is not judge_ahead_steps updates and a checkpoint "
            f"inside a batch's updates would sample its prompts again on resume; drop trl.num_iterations, {fix}.")
    if "steps_per_generation" in cfg.trl and cfg.trl["steps_per_generation"] != accum:
        problems.append(
            f"trl.steps_per_generation: {cfg.trl['steps_per_generation']!r} differs from the accumulation steps "
            f"({accum}) with judge_ahead_steps: {cfg.judge_ahead_steps}: a generation batch would not be one update "
            f"(the lag and resuming from a checkpoint would be off); drop trl.steps_per_generation, {fix}.")
    if "generation_batch_size" in cfg.trl:
        problems.append(
            f"trl.generation_batch_size: {cfg.trl['generation_batch_size']!r} with judge_ahead_steps: "
            f"{cfg.judge_ahead_steps}: judging ahead needs one generation batch per update; drop the key "
            f"(prompts_per_step and accumulation_steps size the batch), {fix}.")
    if cfg.trl.get("use_vllm", False) and not cfg.trl.get("vllm_importance_sampling_correction", True):
        problems.append(
            f"trl.vllm_importance_sampling_correction: false with trl.use_vllm and judge_ahead_steps: "
            f"{cfg.judge_ahead_steps}: with vLLM rollouts TRL recomputes the old log-probs under the current weights, "
            "so its importance-sampling weight is the only correction for the lag, and a lagged batch would train "
            f"with none; drop the key (true is TRL's default), {fix}.")
    if cfg.lora.enabled and cfg.lora.dropout > 0 and not cfg.trl.get("use_vllm", False):
        problems.append(
            f"lora.dropout: {cfg.lora.dropout!r} with judge_ahead_steps: {cfg.judge_ahead_steps}: the log-probs kept "
            "at sampling and those at training would use different dropout masks, so the importance ratio would be "
            f"noise even with no lag; set lora.dropout: 0, {fix}.")


def _urls(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value or "")]


def _check_base_url(cfg: Config, problems: list[str]) -> None:
    """openai_base_url: one URL (a string), or a non-empty list of distinct URLs, the replicas of one teacher."""
    value = cfg.openai_base_url
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        problems.append(f"openai_base_url: {value!r} is neither a URL nor a list of URLs; write one URL, or a YAML "
                        "list of the replicas' URLs (--set 'openai_base_url=[http://h1:8000/v1,http://h2:8000/v1]').")
    elif len({v.strip() for v in value}) != len(value):
        problems.append(f"openai_base_url: the list repeats a URL ({', '.join(redact_url(v) for v in value)}); "
                        "name each replica once.")


def validate(data: dict) -> Config:
    """Build a Config from a mapping, or raise ConfigError listing every problem."""
    problems: list[str] = []
    values = _check_section(Config, data, "", problems)
    cfg = Config(**values)
    if "{student_response}" not in cfg.evaluation_prompt:
        problems.append(
            "evaluation_prompt: has no {student_response} placeholder, so the teacher would never see the answer; "
            "add {student_response} (and usually {question} and {ground_truth})."
        )
    if cfg.trl:
        _check_trl(cfg.trl, problems)
        _check_hub(cfg.trl, problems)
    _check_criteria(cfg.criteria, problems)
    _check_base_url(cfg, problems)
    if cfg.teacher_backend == "openai" and any(is_redacted(u) for u in _urls(cfg.openai_base_url)):
        problems.append(
            f"openai_base_url: {cfg.openai_base_url} has its credentials redacted ({REDACTED}), as a run's config.yaml "
            "stores it, so the teacher would be sent the placeholder; give the real URL: resume with --config "
            "pointing at the original config, or --set openai_base_url=URL, or set OPENAI_BASE_URL=URL in the "
            "environment (used on --resume when the run's config.yaml holds a redacted URL).")
    if cfg.teacher_backend == "openai" and not cfg.teacher_model_name:
        problems.append("teacher_model_name: empty; name the model the teacher server serves.")
    if cfg.max_seq_length <= cfg.max_new_tokens:
        problems.append(
            f"max_seq_length: {cfg.max_seq_length} leaves no room for a prompt beside max_new_tokens "
            f"{cfg.max_new_tokens} (training keeps prompts of at most max_seq_length - max_new_tokens = "
            f"{cfg.max_seq_length - cfg.max_new_tokens} tokens); raise max_seq_length above max_new_tokens plus "
            f"your prompts' length, e.g. {cfg.max_new_tokens + 512}.")
    criteria_ok = not problems  # the rubric is built from checked criteria
    if criteria_ok:
        _check_grade_room(cfg, problems)
    _check_samples(cfg, problems, criteria_ok)
    if cfg.use_unsloth:  # the seed's example asks for it: warn once and train with transformers
        from grpo_llm_eval.models import warn_unsloth_fallback

        warn_unsloth_fallback()
    _check_judge_ahead(cfg, problems)
    _check_micro_batch(cfg, problems)
    if cfg.group_judge_passes > 1 and cfg.judge_mode != "group":
        problems.append(f"group_judge_passes: {cfg.group_judge_passes} only applies to judge_mode group (judge_mode is "
                        f"{cfg.judge_mode}); set judge_mode: group, or group_judge_passes: 1.")
    if cfg.teacher_max_cost_usd > 0 and not (cfg.teacher_price_input_per_mtok or cfg.teacher_price_output_per_mtok):
        problems.append(f"teacher_max_cost_usd: {cfg.teacher_max_cost_usd!r} but no price is set, so no cost is ever "
                        "counted; set teacher_price_input_per_mtok and teacher_price_output_per_mtok.")
    verifiers = cfg.verifier_answer_weight + cfg.verifier_format_weight + cfg.verifier_checklist_weight
    if cfg.on_budget_end == "verifier_only" and verifiers <= 0:
        problems.append("on_budget_end: verifier_only, but no verifier has weight (verifier_answer_weight, "
                        "verifier_format_weight and verifier_checklist_weight are 0), so nothing would be rewarded "
                        "once the budget is spent; set one of them > 0, or on_budget_end: stop.")
    rewards = cfg.teacher_weight + cfg.verifier_answer_weight + cfg.verifier_format_weight + cfg.verifier_checklist_weight
    if rewards <= 0:
        problems.append("teacher_weight, verifier_answer_weight, verifier_format_weight, verifier_checklist_weight: all 0, so nothing is rewarded; set one > 0.")
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (None: the embedded offline default), apply overrides, validate."""
    return validate(apply_overrides(read_yaml(path), overrides or []))


REDACTED = "***"


def redact_url(url: str) -> str:
    """Replace any user:password@ of a URL by ***@."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"{REDACTED}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def is_redacted(url: str) -> bool:
    """Whether URL is the output of `redact_url` (its credentials replaced by ***)."""
    parts = urlsplit(url) if url else None
    return parts is not None and parts.username == REDACTED and parts.password is None


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data, secrets redacted (the API key is never part of it)."""
    data = dataclasses.asdict(cfg)
    url = cfg.openai_base_url
    data["openai_base_url"] = [redact_url(u) for u in url] if isinstance(url, list) else redact_url(url)
    return data


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=120)


__all__ = ["REDACTED", "ConfigError", "LoraSection", "apply_overrides", "dump_yaml", "is_redacted", "load_config",
           "read_yaml", "redact_url", "to_dict", "validate"]
