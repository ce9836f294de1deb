"""The run folder: created and checked for writability before anything expensive starts."""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path

from grpo_llm_eval.config.load import dump_yaml


class RunDirError(Exception):
    """The run folder cannot be used; the message names the path and the fix."""


def run_dir_for(cfg) -> Path:
    """<output_dir>/<run_name or a timestamp>; a run name may not climb out of output_dir."""
    name = cfg.run_name or _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in {".", ".."}:
        raise RunDirError(f"run_name {name!r}: use letters, digits, '.', '_' and '-' only (it names one folder "
                          f"inside output_dir).")
    return Path(cfg.output_dir).expanduser().resolve() / name


def prepare(cfg, resume: bool = False) -> Path:
    """Create the run folder, prove it is writable (with room to spare) and write config.yaml."""
    path = run_dir_for(cfg)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        with open(probe, "wb") as fh:
            fh.write(b"\0" * 65536)
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"output_dir {cfg.output_dir!r}: cannot write to {path} ({exc.strerror or exc}); "
                          f"choose a writable folder with free space (--set output_dir=...).") from None
    if not resume and (path / "rollouts.jsonl").exists():
        raise RunDirError(f"run folder {path} already holds a run; pass --resume to continue it, or choose another "
                          f"run_name.")
    tmp = path / "config.yaml.tmp"
    tmp.write_text(dump_yaml(cfg), encoding="utf-8")
    os.replace(tmp, path / "config.yaml")
    return path
