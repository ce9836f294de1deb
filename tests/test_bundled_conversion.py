"""The bundled GGUF is converted once into a safetensors folder, also when several distributed processes ask for it
at once on a fresh cache (the first `accelerate launch` on a new machine)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.multiprocessing as mp

from grpo_llm_eval.models import ModelError, convert_bundled

NAME = "smollm2-135m-instruct"


def _rank(rank: int, store: str, cache: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        folder = convert_bundled(NAME, cache)
        assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors")), sorted(os.listdir(folder))
        dist.barrier()
    finally:
        dist.destroy_process_group()


class TestBundledConversion:
    def test_two_distributed_ranks_on_a_fresh_cache_both_get_a_whole_model(self, tmp_path):
        """Before: transformers' save_pretrained writes weights on global rank 0 only. Rank 1, with less to write,
        published a folder holding the tokenizer and no model, and rank 0 failed with 'Directory not empty'."""
        cache = tmp_path / "cache"
        mp.start_processes(_rank, args=(str(tmp_path / "store"), str(cache)), nprocs=2, start_method="spawn")
        folder = Path(cache) / "bundled" / NAME
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
        assert [p.name for p in folder.parent.iterdir()] == [NAME]  # no temporary folder left behind

    def test_a_published_folder_without_a_model_is_replaced(self, tmp_path):
        """A cache that an older release broke (tokenizer files only) is converted again, not loaded or fatal."""
        broken = tmp_path / "cache" / "bundled" / NAME
        broken.mkdir(parents=True)
        (broken / "tokenizer.json").write_text("{}")
        folder = convert_bundled(NAME, str(tmp_path / "cache"))
        assert folder == broken and (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
        assert [p.name for p in folder.parent.iterdir()] == [NAME]

    def test_a_failed_conversion_names_the_fix_and_publishes_nothing(self, tmp_path, monkeypatch):
        cache = tmp_path / "cache"
        monkeypatch.setattr(sys, "executable", "/bin/false")  # the converting child exits 1 with no output
        try:
            convert_bundled(NAME, str(cache))
            raise AssertionError("the conversion did not fail")
        except ModelError as exc:
            assert "converting" in str(exc) and "cache_dir" in str(exc), exc
        assert list((cache / "bundled").iterdir()) == []
