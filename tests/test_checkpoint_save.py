"""A save that runs out of room says so, names the folder and the fix, and leaves no partial folder behind.

The errors are real: a child process with a 1 MiB file-size limit (``ulimit -f``) makes torch's and
safetensors' own writers fail as they do on a full disk (the same short write, EFBIG in place of ENOSPC).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grpo_llm_eval import checkpoints

CHILD = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from grpo_llm_eval import checkpoints

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
