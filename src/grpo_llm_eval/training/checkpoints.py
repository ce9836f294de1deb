"""Checkpoints and resuming: atomic publication, rotation in Python, finding what to resume, record repair.

A checkpoint is written into `<run>/.checkpoint-staging/checkpoint-N` and then renamed to `<run>/checkpoint-N`,
so a crash mid-save leaves no half checkpoint that a resume could pick. On resume, records of steps after the
checkpoint are truncated (they are replayed, and the judgement cache answers their grades again), and a torn
last line is dropped: the files then hold each step exactly once.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from grpo_llm_eval.training.records import dumps

logger = logging.getLogger(__name__)

STAGING = ".checkpoint-staging"
FINAL_STAGING = "final.partial"  # final/ is written here, then renamed into place
STATE_FILE = "grpo_llm_eval_state.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class ResumeError(Exception):
    """Nothing to resume, or the resume target is not a run; the message says what to pass instead."""


class SaveError(Exception):
    """A checkpoint or the final model could not be written for lack of room; says where and what to do."""


# What a full disk looks like from the writers: OSError ENOSPC/EDQUOT (Python), safetensors' "(os error 28)",
# and torch's zip writer, which reports a short write as "unexpected pos N vs M" or "file write failed". A
# file-size limit (ulimit -f: EFBIG) fails the same writes the same way.
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXTS = ("no space left", "unexpected pos", "file write failed", "disk quota", "file too large")


def is_disk_full(exc: BaseException) -> bool:
    """Whether EXC (or an exception it was raised from) is a write that failed for lack of disk space."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in _FULL_ERRNOS or any(s in str(exc).lower() for s in _FULL_TEXTS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_mib(path: Path) -> float:
    """Free space of the filesystem holding PATH (or its nearest existing parent), in MiB."""
    path = Path(path).resolve()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 2**20


@contextmanager
def saving(folder: Path, what: str, run_dir: Path):
    """Run a save into FOLDER of the run RUN_DIR; a full disk becomes a SaveError naming FOLDER, the fix and the
    run's last intact checkpoint, and the partial FOLDER is removed (it would load as a broken model or
    checkpoint). Any other error passes through unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        shutil.rmtree(folder, ignore_errors=True)
        earlier = checkpoints(run_dir)
        intact = (f"the run's earlier checkpoints are intact (resume from {earlier[-1]} with --resume)" if earlier
                  else "no earlier checkpoint of this run was written")
        raise SaveError(
            f"writing {what} to {folder} failed: the disk is full or a file-size limit was reached "
            f"({free_mib(folder):.0f} MiB free after removing the partial write). Free space there, or set "
            f"output_dir to a larger disk (fewer checkpoints: save_total_limit); {intact}.") from None


def checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints of a run, oldest first (by step number)."""
    found = [p for p in Path(run_dir).iterdir() if p.is_dir() and _CKPT.match(p.name)] if Path(run_dir).is_dir() else []
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))


def step_of(checkpoint: Path) -> int:
    return int(_CKPT.match(Path(checkpoint).name).group(1))


def publish(staged: Path, final: Path) -> None:
    """Move a fully written checkpoint into place with a rename (atomic on one filesystem).

    Every file and folder of STAGED is flushed to disk first (fsync), then the rename, then the parent
    folder: a rename can reach the disk before the data it names, and after a power loss the published
    checkpoint would hold empty or short files.
    """
    fsync_tree(staged)
    if final.exists():  # the same step saved twice (e.g. a stop signal on a save step): keep the newer
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, final)
    _fsync_dir(final.parent)


def rotate(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest KEEP checkpoints (0: keep all) with shutil, never a shell; returns the deleted."""
    if keep <= 0:
        return []
    doomed = checkpoints(run_dir)[:-keep]
    for path in doomed:
        shutil.rmtree(path)
        logger.info("Deleted old checkpoint %s (save_total_limit=%d)", path.name, keep)
    return doomed


def write_state(checkpoint_dir: Path, state: dict) -> None:
    (Path(checkpoint_dir) / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


def read_state(checkpoint_dir: Path) -> dict:
    path = Path(checkpoint_dir) / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def find_resume(output_dir: str, run_name: str, target: str | bool) -> tuple[Path, Path]:
    """(run folder, checkpoint) for `--resume` (True: the latest checkpoint of run_name, or of the newest run in
    output_dir) or `--resume PATH` (a checkpoint folder, or a run folder: its latest checkpoint)."""
    if target is True:
        root = Path(output_dir).expanduser().resolve()
        if run_name:
            run = root / run_name
        else:
            runs = [p for p in root.iterdir() if p.is_dir() and checkpoints(p)] if root.is_dir() else []
            if not runs:
                raise ResumeError(f"--resume: no run with a checkpoint in {root}; pass --resume RUN_DIR or a checkpoint.")
            run = max(runs, key=lambda p: checkpoints(p)[-1].stat().st_mtime)
    else:
        path = Path(str(target)).expanduser().resolve()
        if _CKPT.match(path.name) and path.is_dir():
            return path.parent, path
        run = path
    found = checkpoints(run)
    if not found:
        raise ResumeError(f"--resume: {run} holds no checkpoint-N folder; pass a run folder with checkpoints, or "
                          f"start a new run without --resume.")
    return run, found[-1]


def truncate_records(run_dir: Path, after_step: int) -> dict[str, int]:
    """Drop rows of steps after AFTER_STEP and unreadable (torn) lines from the run's JSONL files, atomically.

    Returns how many rows each file lost.
    """
    dropped = {}
    for name in ("rollouts.jsonl", "metrics.jsonl"):
        path = Path(run_dir) / name
        if not path.exists():
            continue
        kept, lost = [], 0
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    lost += 1 if line.strip() else 0
                    continue
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > after_step:
                    lost += 1
                    continue
                kept.append(row)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("".join(dumps(r) + "\n" for r in kept))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dropped[name] = lost
        if lost:
            logger.info("%s: removed %d rows past step %d (they are replayed from the checkpoint)", name, lost, after_step)
    return dropped


def fsync_tree(folder: Path) -> None:
    """fsync every file under FOLDER, then every folder, deepest first. A file that cannot be synced raises
    (its data may not be on disk); a folder that cannot be is skipped (some filesystems refuse it)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
