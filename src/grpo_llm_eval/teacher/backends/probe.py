"""Prove that the local teacher can grade, in a child process, before anything else is loaded.

llama.cpp is native code compiled for whatever CPU built it; on another CPU (or one whose hypervisor forbids
an instruction set the CPU reports, as AMX on some VMs) it dies with a signal, not an exception, and takes the
whole run with it without a word. So the local backend's health check first grades one tiny response in a
child process with the same model, threads and grading path. If the child dies, the run stops there, before
any student is loaded, with one line naming the signal, the likely cause and the fix. It costs the child's
start and one grade: about 2 s for the bundled model on 2 cores (measured in tests/test_native_teacher.py).

``python -m grpo_llm_eval.teacher.backends.probe`` is the child: it reads the config (JSON) on stdin and writes one
JSON line: the grade's status, its seconds, and the parameters the model was loaded with.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time

from grpo_llm_eval.teacher.types import JudgeRequest, TeacherUnavailable

logger = logging.getLogger(__name__)

PROBE_REQUEST = JudgeRequest("What is 2 + 3? Give only the final number.", "5", "5")
LLAMA_PIN = "llama-cpp-python==0.3.36"  # keep in step with pyproject.toml
REBUILD = (f"pip install --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python '{LLAMA_PIN}'")


def signal_name(code: int) -> str:
    """SIGSEGV for an exit code of -11 (a process killed by a signal)."""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def crash_cause(code: int) -> str:
    """The likely cause of a native crash with exit code CODE, and its fix."""
    if signal_name(code) == "SIGILL":
        return ("an instruction this CPU does not have: llama-cpp-python was compiled for another CPU (a wheel "
                f"built or cached on another machine); rebuild it here: {REBUILD}")
    return ("native code in llama.cpp crashed on this CPU (for example AMX or AVX-512 instructions that "
            "this VM reports but does not permit); rebuild llama-cpp-python here "
            f"({REBUILD}), leave GRPO_LLM_EVAL_LLAMA_EXTRA_BUFTS unset, or serve the teacher elsewhere "
            "and set teacher_backend: openai")


def crash_message(gguf, code: int, when: str = "before training started") -> str:
    """One line: which signal killed the child grading GGUF, the likely cause, and the fix."""
    return (f"the local teacher crashed ({signal_name(code)}) grading a test response with {gguf}, {when}: "
            f"{crash_cause(code)}. Run with --debug for the crash trace.")


def check_in_child(cfg, n_ctx: int, n_threads: int, gguf, timeout_s: float = 600.0) -> dict:
    """Grade PROBE_REQUEST in a child process; return its report, or raise TeacherUnavailable in one line."""
    import dataclasses

    payload = json.dumps({"config": dataclasses.asdict(cfg), "n_ctx": n_ctx, "n_threads": n_threads})
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "grpo_llm_eval.teacher.backends.probe"],
                              input=payload, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TeacherUnavailable(
            f"the local teacher did not finish a test grade with {gguf} in {timeout_s:.0f} s; check the model "
            "file and the CPU load, or serve the teacher elsewhere and set teacher_backend: openai.") from None
    if proc.stderr.strip():
        logger.debug("local teacher check, the child's stderr:\n%s", proc.stderr[-8000:])
    if proc.returncode < 0:
        raise TeacherUnavailable(crash_message(gguf, proc.returncode))
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error: ")]
        reason = lines[-1][len("error: "):] if lines else f"the check exited with {proc.returncode}"
        raise TeacherUnavailable(f"cannot load the local teacher {gguf}: {reason}")
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise TeacherUnavailable(f"the local teacher check with {gguf} exited 0 without a result on stdout (got "
                                 f"{proc.stdout[-200:]!r}); run with --debug to see its output.") from None
    if report["status"] == "error":  # the grade raised inside the backend (it caught it): nothing to train on
        raise TeacherUnavailable(f"the local teacher {gguf} could not grade a test response: {report['error']}")
    report["wall_s"] = time.perf_counter() - start
    logger.info("Local teacher check: graded a test response in a child process in %.1f s (status %s).",
                report["wall_s"], report["status"])
    return report


def _child() -> int:
    from grpo_llm_eval.config.load import validate
    from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher
    from grpo_llm_eval.teacher.grading.rubric import Rubric

    try:
        payload = json.loads(sys.stdin.read())
        cfg = validate(payload["config"])
        teacher = LocalTeacher(cfg, Rubric.from_config(cfg), n_ctx=payload["n_ctx"], n_threads=payload["n_threads"])
        start = time.perf_counter()
        llm = teacher.load()
        judgement = teacher.grade_now([PROBE_REQUEST])[0]
        extra_bufts = bool(getattr(llm.model_params, "use_extra_bufts", True))
        seconds = time.perf_counter() - start
        teacher.close_now()
        print(json.dumps({"status": judgement.status, "error": judgement.error, "load_and_grade_s": seconds,
                          "use_extra_bufts": extra_bufts}), flush=True)
        return 0
    except Exception as exc:  # a corrupt file, an unsupported model: the parent reports this line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {text}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(_child())
