"""llama.cpp on any CPU: the portable load, the child-process check before training, and contained native crashes.

The crash these guard against (issue: SIGSEGV in libggml-cpu.so on the first grade) happened on a VM whose CPU
reports AMX. On such a machine the grading tests here crash without the fix; on any other they run the same
path (load the bundled GGUF, grade in a child process) and check the parameters the model was loaded with.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.models import bundled_gguf_path
from grpo_llm_eval.teacher.backends.llamacpp import ENV_EXTRA_BUFTS
from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher
from grpo_llm_eval.teacher.backends.probe import check_in_child
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import TeacherUnavailable

from .conftest import CACHE_DIR


def cpu_reports_amx() -> bool:
    try:
        return bool(re.search(r"\bamx_\w+", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


def run_python(code: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


class TestPortableLoad:
    """Every llama.cpp model the project loads skips ggml's extra buffer types (AMX, repacked weights)."""

    def test_the_offline_teacher_grades_in_a_child_process_with_no_extra_buffer_types(self):
        """On a CPU that reports AMX this grade crashed the child (SIGSEGV) before the fix; it must be `ok`."""
        cfg = load_config(None)
        teacher = LocalTeacher(cfg, Rubric.from_config(cfg), n_threads=1)
        report = check_in_child(cfg, teacher.n_ctx, teacher.n_threads, teacher.path, timeout_s=300)
        assert report["status"] == "ok", (report, f"CPU reports AMX: {cpu_reports_amx()}")
        assert report["use_extra_bufts"] is False

    def test_the_in_process_teacher_is_loaded_with_no_extra_buffer_types(self):
        cfg = load_config(None)
        teacher = LocalTeacher(cfg, Rubric.from_config(cfg), n_threads=1)
        try:
            asyncio.run(teacher.health_check())
            assert teacher.load().model_params.use_extra_bufts is False
        finally:
            teacher.close_now()

    def test_a_plain_llama_loaded_after_the_portable_defaults_skips_them_and_completes(self):
        """What `python -m grpo_llm_eval.teacher.backends.llamacpp` (the server) and bench scripts rely on: the bare
        completion that crashed on the AMX machine, in a child process."""
        proc = run_python(f"""
            from grpo_llm_eval.teacher.backends.llamacpp import use_portable_defaults
            assert use_portable_defaults()
            from llama_cpp import Llama
            llm = Llama(model_path={str(bundled_gguf_path("smollm2-135m-instruct"))!r}, n_ctx=256, n_threads=1,
                        verbose=False)
            out = llm.create_completion("Hello", max_tokens=8, temperature=0.0)
            print("extra_bufts", llm.model_params.use_extra_bufts, "tokens", out["usage"]["completion_tokens"])
            llm.close()
        """)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "extra_bufts False tokens" in proc.stdout

    def test_the_environment_variable_gives_llama_cpp_its_default_back(self):
        """No model is loaded here (on an AMX VM that would crash): only the parameters are compared."""
        code = """
            from grpo_llm_eval.teacher.backends.llamacpp import use_portable_defaults
            import llama_cpp.llama_cpp as lib
            print(use_portable_defaults(), lib.llama_model_default_params().use_extra_bufts)
        """
        assert run_python(code, {ENV_EXTRA_BUFTS: "1"}).stdout.split() == ["False", "True"]
        assert run_python(code, {ENV_EXTRA_BUFTS: ""}).stdout.split() == ["True", "False"]


# A child process that dies in native code the moment it imports llama.cpp, as the AMX VM's did on its first
# grade: a real signal (SIGSEGV through faulthandler's own test hook, or SIGILL), in a real process.
CRASH_ON_IMPORT = """
import faulthandler, os, signal, sys

class _CrashOnLlamaImport:
    def find_spec(self, name, path=None, target=None):
        if name == "llama_cpp" and os.environ.get("CRASH_SIGNAL"):
            if os.environ["CRASH_SIGNAL"] == "SIGSEGV":
                faulthandler._sigsegv()
            os.kill(os.getpid(), getattr(signal, os.environ["CRASH_SIGNAL"]))
        if name == os.environ.get("CRASH_ON_MODULE"):
            faulthandler._sigsegv()
        return None

if os.environ.get("CRASH_SIGNAL") or os.environ.get("CRASH_ON_MODULE"):
    sys.meta_path.insert(0, _CrashOnLlamaImport())
"""


def cli(tmp_path: Path, *overrides: str, env: dict | None = None, timeout: float = 600):
    args = [sys.executable, "-m", "grpo_llm_eval.cli", "--set", f"output_dir={tmp_path / 'runs'}",
            "--set", f"cache_dir={CACHE_DIR}", "--set", "total_steps=1", *[a for o in overrides for a in ("--set", o)]]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=tmp_path)


def crash_env(tmp_path: Path, **env) -> dict:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(CRASH_ON_IMPORT)
    return {"PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]), **env}


class TestBrokenTeacherFailsFast:
    """A teacher that cannot grade stops the run in one line, with a non-zero exit, before any student loads.
    The student given is a folder that does not exist: an error about it would mean the student came first."""

    MISSING_STUDENT = "student_model_name=/nonexistent/student-model"

    def _assert_one_line_before_the_student(self, proc, *expected: str):
        assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        assert len(errors) == 1, proc.stderr[-3000:]
        for text in expected:
            assert text in errors[0], errors[0]
        assert "nonexistent" not in proc.stderr and "Traceback" not in proc.stderr

    @pytest.mark.parametrize("signal_name, fix", [("SIGSEGV", "rebuild llama-cpp-python here"),
                                                  ("SIGILL", "compiled for another CPU")])
    def test_a_native_crash_in_the_teacher_is_one_line_naming_the_signal_and_the_fix(self, tmp_path, signal_name,
                                                                                      fix):
        """Before: the run itself died of the signal (exit -11, no message) on its first grade."""
        proc = cli(tmp_path, self.MISSING_STUDENT, env=crash_env(tmp_path, CRASH_SIGNAL=signal_name))
        self._assert_one_line_before_the_student(proc, f"the local teacher crashed ({signal_name})", fix,
                                                 "before training started")

    def test_a_gguf_file_cut_in_half_is_one_line_naming_the_file(self, tmp_path):
        whole = bundled_gguf_path("smollm2-135m-instruct").read_bytes()
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(whole[: len(whole) // 2])
        proc = cli(tmp_path, self.MISSING_STUDENT, f"teacher_model_name={cut}")
        self._assert_one_line_before_the_student(proc, "cannot load the local teacher", str(cut))

    def test_the_check_raises_teacher_unavailable_for_a_crash(self, tmp_path, monkeypatch):
        for key, value in crash_env(tmp_path, CRASH_SIGNAL="SIGSEGV").items():
            monkeypatch.setenv(key, value)
        cfg = load_config(None)
        with pytest.raises(TeacherUnavailable, match=r"crashed \(SIGSEGV\)"):
            check_in_child(cfg, 512, 1, bundled_gguf_path("smollm2-135m-instruct"), timeout_s=120)


class TestLaterNativeCrashes:
    def test_a_native_crash_after_the_check_still_prints_where_it_happened(self, tmp_path):
        """faulthandler is on in the CLI: a crash past the teacher check (here, in native code while the trainer
        module loads) prints Python's fatal-error trace with the file and line, not a bare exit 139."""
        proc = cli(tmp_path, env=crash_env(tmp_path, CRASH_ON_MODULE="grpo_llm_eval.training.trainer"))
        assert proc.returncode == -11, (proc.returncode, proc.stderr[-3000:])
        assert "Fatal Python error: Segmentation fault" in proc.stderr
        assert re.search(r'File ".*train\.py", line \d+', proc.stderr), proc.stderr[-3000:]


class TestPinnedBuild:
    def test_the_pinned_llama_cpp_python_is_the_one_installed_and_the_one_the_fix_message_names(self):
        """teacher/backends/llamacpp.py writes a field of llama.cpp's C struct, whose layout moves between releases; the
        rebuild command in the crash message must install the same release."""
        from importlib.metadata import version

        from grpo_llm_eval.teacher.backends.probe import LLAMA_PIN

        pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        (pin,) = re.findall(r'"llama-cpp-python\[server\](==[\d.]+)"', pyproject)
        assert LLAMA_PIN == f"llama-cpp-python{pin}"
        assert version("llama-cpp-python") == pin[2:]
