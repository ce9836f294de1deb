"""A save that runs out of room says so, names the folder and the fix, and leaves no partial folder behind.

The errors are real: a child process with a 1 MiB file-size limit (``ulimit -f``) makes torch's and
safetensors' own writers fail as they do on a full disk (the same short write, EFBIG in place of ENOSPC).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grpo_llm_eval.training import checkpoints

CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from grpo_llm_eval.training import checkpoints

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
folder, run, writer = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
try:
    with checkpoints.saving(folder, "checkpoint checkpoint-3", run):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
        weights = {"w": torch.zeros(1_000_000)}  # 4 MB
        if writer == "torch":
            torch.save(weights, folder / "optimizer.pt")
        else:
            save_file(weights, str(folder / "model.safetensors"))
    print(json.dumps({"error": None}))
except checkpoints.SaveError as exc:
    print(json.dumps({"error": str(exc), "exists": folder.exists()}))
"""


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_a_save_out_of_room_is_a_clear_error_and_leaves_no_partial_folder(tmp_path, writer):
    (tmp_path / "checkpoint-2").mkdir()  # the run's earlier checkpoint, which the message must point to
    folder = tmp_path / ".checkpoint-staging" / "checkpoint-3"
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path), writer], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    text = result["error"]
    assert text is not None, f"{writer}: the save did not fail as a SaveError"
    assert "disk is full" in text and str(folder) in text and "output_dir" in text and "MiB free" in text
    assert "earlier checkpoints are intact" in text and str(tmp_path / "checkpoint-2") in text
    assert result["exists"] is False, "the partial checkpoint must not stay where a resume could pick it"


FINAL_CHILD = r"""
import json, resource, signal, sys, types
from pathlib import Path
import torch
from safetensors.torch import save_file
from grpo_llm_eval.training import checkpoints, train

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
out, size = Path(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

class Accelerator:  # one process: what save_final asks of accelerate's
    is_main_process = True
    num_processes = 1
    def wait_for_everyone(self):
        pass

class Tokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")

def save_model(folder):  # a stand-in for Trainer.save_model: writes SIZE floats of weights
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.zeros(size)}, str(Path(folder) / "model.safetensors"))

trainer = types.SimpleNamespace(accelerator=Accelerator(), processing_class=Tokenizer(), save_model=save_model)
cfg = types.SimpleNamespace(lora=types.SimpleNamespace(enabled=False, merge_on_save=False))
try:
    train.save_final(trainer, cfg, out)
    print(json.dumps({"error": None}))
except checkpoints.SaveError as exc:
    print(json.dumps({"error": str(exc)}))
"""


def _save_final_in_child(out, floats: int) -> str | None:
    done = subprocess.run([sys.executable, "-c", FINAL_CHILD, str(out), str(floats)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["error"]


def test_a_final_save_out_of_room_leaves_the_earlier_final_whole(tmp_path):
    """Would have caught: final/ was written in place, so a full disk during a resumed run's final save deleted
    the final/ of the run it resumed (the partial folder is removed), and a crash left a half-written one."""
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"earlier weights")
    error = _save_final_in_child(tmp_path, 1_000_000)  # 4 MB > the 1 MiB limit
    assert error is not None and "the final model" in error and checkpoints.FINAL_STAGING in error
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"earlier weights"
    assert not (tmp_path / checkpoints.FINAL_STAGING).exists()
    assert _save_final_in_child(tmp_path, 1000) is None  # room enough: the new final/ replaces the earlier one
    assert (tmp_path / "final" / "model.safetensors").stat().st_size > 1000 and (tmp_path / "final" / "tokenizer.json").is_file()
    assert not (tmp_path / checkpoints.FINAL_STAGING).exists() and not (tmp_path / "final.old").exists()


def test_other_errors_pass_through_and_keep_the_folder(tmp_path):
    folder = tmp_path / "final"
    with pytest.raises(PermissionError):
        with checkpoints.saving(folder, "the final model", tmp_path):
            folder.mkdir()
            (folder / "config.json").write_text("{}")
            raise PermissionError("read-only")
    assert (folder / "config.json").is_file()


def test_is_disk_full_follows_the_cause_chain():
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert checkpoints.is_disk_full(outer)
    assert not checkpoints.is_disk_full(RuntimeError("shape mismatch"))


def test_free_mib_of_a_folder_not_yet_created(tmp_path):
    assert checkpoints.free_mib(tmp_path / "a" / "b") > 0


def test_publish_syncs_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    """Would have caught: publish fsynced only the run folder, so after a power loss a published checkpoint could
    hold empty files. Every fsync is observed (the real one still runs) by the path its descriptor points at, so
    a sync of the staged path proves it happened before the rename."""
    import os

    staged = tmp_path / ".checkpoint-staging" / "checkpoint-4"
    (staged / "sub").mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "sub/rng_state.pth"):
        (staged / name).write_bytes(b"x" * 1000)
    synced, real_fsync = [], os.fsync

    def observed_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", observed_fsync)
    checkpoints.publish(staged, tmp_path / "checkpoint-4")
    expected = {str(staged / n) for n in ("model.safetensors", "optimizer.pt", "sub/rng_state.pth", "sub")}
    assert expected | {str(staged)} <= set(synced), sorted(set(synced))
    assert str(tmp_path) in synced  # the rename itself, last
    assert (tmp_path / "checkpoint-4" / "sub" / "rng_state.pth").read_bytes() == b"x" * 1000


QUEUE_CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
from grpo_llm_eval.training import checkpoints
from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.training.train import train

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
cfg = load_config(None, sys.argv[2:])
try:
    train(cfg)
    print(json.dumps({"error": None}))
except Exception as exc:
    run = Path(cfg.output_dir) / cfg.run_name
    print(json.dumps({"error": f"{type(exc).__name__}: {exc}", "staging": (run / checkpoints.STAGING).exists()}))
"""


def test_a_judge_ahead_queue_that_does_not_fit_is_a_clear_error_and_leaves_no_staging(tiny_model, tmp_path):
    """Would have caught: the judge-ahead queue file was written outside the `saving()` guard, so a full disk
    there was a raw error that left the staging folder behind. Real error: the model and optimizer files fit
    under the child's file-size limit, the queue (8 rows carrying a 2.5 MB column) does not."""
    from grpo_llm_eval.testing import TeacherServer
    from tests.conftest import tiny_overrides

    data = tmp_path / "data.jsonl"
    blob = "z" * 2_500_000
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1), "blob": blob}) + "\n"
                            for i in range(4)))
    with TeacherServer(mode="scripted") as server:
        overrides = tiny_overrides(tiny_model, tmp_path / "runs", openai_base_url=server.base_url, total_steps=2,
                                   save_steps=1, judge_ahead_steps=1, dataset_name=str(data), max_train_samples=0)
        out = subprocess.run([sys.executable, "-c", QUEUE_CHILD, str(14 << 20), *overrides], capture_output=True,
                             text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["error"] is not None and result["error"].startswith("SaveError"), result
    assert "disk is full" in result["error"] and "checkpoint checkpoint-1" in result["error"]
    assert result["staging"] is False, "the partial staging folder must not stay behind"
