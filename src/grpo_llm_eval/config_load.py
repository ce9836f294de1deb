"""YAML loading, `--set` overrides and one validation pass whose errors name key, value and fix."""

from __future__ import annotations

import dataclasses
import difflib
import re
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
        if hint is float and isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            value = float(value)  # YAML 1.1 reads 5e-7 as a string
        if hint is str and value is None:
            value = ""
        if not _is_instance(value, hint):
            want = getattr(hint, "__name__", str(hint))
            problems.append(f"{name}: expected {want}, got {value!r} ({type(value).__name__}); write a {want}.")
            continue
        if hint is float:
            value = float(value)
        if "choices" in meta and value not in meta["choices"]:
            problems.append(f"{name}: {value!r} is not one of {', '.join(meta['choices'])}; pick one of them.")
            continue
        if "min" in meta and value < meta["min"]:
            problems.append(f"{name}: {value!r} is below the minimum {meta['min']}; use a value >= {meta['min']}.")
            continue
        if "max" in meta and value > meta["max"]:
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
    _check_criteria(cfg.criteria, problems)
    if cfg.teacher_backend == "openai" and not cfg.teacher_model_name:
        problems.append("teacher_model_name: empty; name the model the teacher server serves.")
    if cfg.teacher_max_cost_usd > 0 and not (cfg.teacher_price_input_per_mtok or cfg.teacher_price_output_per_mtok):
        problems.append(f"teacher_max_cost_usd: {cfg.teacher_max_cost_usd!r} but no price is set, so no cost is ever "
                        "counted; set teacher_price_input_per_mtok and teacher_price_output_per_mtok.")
    rewards = cfg.teacher_weight + cfg.verifier_answer_weight + cfg.verifier_format_weight
    if rewards <= 0:
        problems.append("teacher_weight, verifier_answer_weight, verifier_format_weight: all 0, so nothing is rewarded; set one > 0.")
    if problems:
        raise ConfigError(problems)
    return cfg


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (None: the embedded offline default), apply overrides, validate."""
    return validate(apply_overrides(read_yaml(path), overrides or []))


def redact_url(url: str) -> str:
    """Drop any user:password@ from a URL."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain data, secrets redacted (the API key is never part of it)."""
    data = dataclasses.asdict(cfg)
    data["openai_base_url"] = redact_url(cfg.openai_base_url)
    return data


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=120)


__all__ = ["ConfigError", "LoraSection", "apply_overrides", "dump_yaml", "load_config", "read_yaml", "to_dict", "validate"]
