"""FSDP2 on two CPU processes (gloo): the SFT term on a sharded tiny Llama, one process without examples.

`accelerate launch --config_file configs/accelerate/fsdp2.yaml` cannot run on CPU: accelerate turns a CPU
launch into MULTI_CPU (DDP) and enables FSDP only for GPU-type devices, so the FSDP settings would be
ignored (docs/scaling.md). torch's `fully_shard` itself runs on CPU with gloo, so this test shards the model
the way that config does (each decoder layer a unit, the root the rest) and runs our SFT loss on it.
"""

from __future__ import annotations

import json
import os
import sys

from tests.test_multiprocess import ROOT, _free_port
from tests.test_multiprocess_sft import _launch


def test_sft_term_under_fsdp2_matches_the_unsharded_step_and_does_not_hang(tiny_model, tmp_path):
    """Would have caught: an SFT pass run by one process only (unpartnered FSDP all-gathers: a hang), or a
    loss whose gradient does not reach sharded or tied weights (the output layer called outside the root's
    forward pass) under FSDP2."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "fsdp2_sft_worker.py"), tiny_model, str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rc, output = _launch(cmd, env, timeout=240)
    assert rc is not None, f"no exit within 240 s (hung):\n{output[-3000:]}"
    assert rc == 0, output[-4000:]
    first, second = (json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(2))
    assert first["forwards"] == second["forwards"] == 2  # the process without examples ran the agreed passes
    assert first["n_tokens"] > 0 and second["n_tokens"] == 0
    assert abs(first["loss"] - first["reference_loss"]) < 1e-5
    assert first["moved"] > 1e-3 and first["max_weight_diff"] < 1e-5
