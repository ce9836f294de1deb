"""The run folder: an unusable output_dir fails before training with a clear line; nothing is written
outside output_dir and cache_dir, and a run name cannot climb out of output_dir."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest

from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.testing import TeacherServer
from grpo_llm_eval.training.run_dir import RunDirError, prepare
from grpo_llm_eval.training.train import train
from tests.conftest import tiny_overrides
from tests.reliability.helpers import cli_env, run_cli, sets


@contextlib.contextmanager
def full_folder(tmp_path: Path):
    """A folder on a full filesystem: a 64 KiB tmpfs filled up where mounting is allowed (root with
    CAP_SYS_ADMIN); elsewhere a run folder whose write probe is a link to /dev/full (every write: ENOSPC)."""
    mount = tmp_path / "full"
    mount.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                                 capture_output=True).returncode == 0
    except OSError:  # no mount command
        mounted = False
    try:
        if mounted:
            with contextlib.suppress(OSError), open(mount / "filler", "wb") as fh:
                fh.write(b"\0" * 65536)
        else:
            (mount / "run").mkdir()
            (mount / "run" / ".write-test").symlink_to("/dev/full")
        yield mount
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], check=True)


def no_model_overrides(tmp_path: Path, out: Path) -> list[str]:
    # A student that cannot be loaded and a teacher that is not there: the run folder check must come first.
    return tiny_overrides(str(tmp_path / "no-such-student"), out, openai_base_url="http://127.0.0.1:9/v1")


class TestUnusableOutputDir:
    def test_output_dir_under_a_regular_file_fails_before_anything_is_loaded(self, tmp_path):
        (tmp_path / "a-file").write_text("not a folder")
        cfg = load_config(None, no_model_overrides(tmp_path, tmp_path / "a-file" / "runs"))
        with pytest.raises(RunDirError, match=r"output_dir .*cannot write to .*choose a writable folder"):
            train(cfg)

    def test_a_full_filesystem_fails_before_anything_is_loaded(self, tmp_path):
        with full_folder(tmp_path) as full:
            cfg = load_config(None, no_model_overrides(tmp_path, full))
            with pytest.raises(RunDirError, match=r"cannot write to .*No space left on device"):
                train(cfg)
            assert not (full / "run" / "config.yaml").exists()

    def test_the_cli_says_so_in_one_line_and_exits_1(self, tmp_path):
        (tmp_path / "a-file").write_text("not a folder")
        result = run_cli(sets(no_model_overrides(tmp_path, tmp_path / "a-file" / "runs")))
        assert result.rc == 1
        errors = [line for line in result.err.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith("error: output_dir ")
        assert "Not a directory" in errors[0] and "--set output_dir=" in errors[0]
        assert "Traceback" not in result.text and "teacher" not in errors[0]


class TestRunFolderConfinement:
    @pytest.mark.parametrize("name", ["../../escape", "../escape", "/tmp/escape", "a/../../escape", "..", ".",
                                      "sub/dir", "~root", "run\0x", "run\nx"])
    def test_a_run_name_that_is_not_one_plain_folder_name_is_refused(self, tmp_path, name):
        cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", f"run_name={name}"])
        with pytest.raises(RunDirError, match="use letters, digits"):
            prepare(cfg)
        assert list(tmp_path.iterdir()) == []

    def test_set_run_name_escaping_is_refused_by_the_cli_and_creates_nothing(self, tmp_path):
        out = tmp_path / "a" / "b" / "out"
        result = run_cli(sets(no_model_overrides(tmp_path, out)) + ["--set", "run_name=../../escape"])
        assert result.rc == 1 and "error: run_name '../../escape'" in result.err
        assert [p for p in tmp_path.rglob("*")] == []

    def test_a_run_writes_nothing_outside_output_dir_and_cache_dir(self, tiny_model, tmp_path):
        home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
        for d in (home, cwd, tmp):
            d.mkdir()
        out, cache = tmp_path / "out", tmp_path / "cache"
        env = cli_env(HOME=str(home), TMPDIR=str(tmp), XDG_CACHE_HOME=str(home / ".cache"))
        for var in ("HF_HOME", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "XDG_CONFIG_HOME", "TORCHINDUCTOR_CACHE_DIR"):
            env.pop(var, None)
        with TeacherServer() as srv:
            args = tiny_overrides(tiny_model, out, openai_base_url=srv.base_url, cache_dir=str(cache), total_steps=1,
                                  save_steps=1, prompts_per_step=1, num_return_sequences=2, max_new_tokens=4)
            result = run_cli(sets(args), env=env, cwd=cwd)
        assert result.rc == 0, result.text[-3000:]
        assert (out / "run" / "final").is_dir()
        outside = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")
                         if not p.is_relative_to(out) and not p.is_relative_to(cache) and p not in (home, cwd, tmp)
                         # torch creates an empty $TMPDIR/torchinductor_$USER when imported: a temporary, empty
                         and not (p.is_relative_to(tmp) and p.is_dir() and not any(p.iterdir())))
        assert outside == []
