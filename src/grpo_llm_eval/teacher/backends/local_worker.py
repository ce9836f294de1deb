"""The local teacher's model in a process of its own: what training, `calibrate`, `evaluate` and `judge` grade with.

Why a process rather than a thread of the trainer's:

- **Speed.** llama-cpp-python is built with OpenMP, and it resolves ``libgomp.so.1`` to the copy torch has already
  loaded, so the teacher's and torch's OpenMP threads count as one runtime. With more OpenMP threads than cores
  (torch's two and llama.cpp's two on a 2-core machine), libgomp spins 100 times rather than 300,000 before a waiting
  thread sleeps, and llama.cpp's threads, which meet at a barrier every layer, sleep and wake all through a grade.
  Measured in the offline default on 2 cores: 0.32 s a grade inside the trainer, 0.22 s alone (llama.cpp's threads
  at 80% of a core against 100%); `bench/local_teacher_process.py` shows it side by side. A process of its own has
  a runtime of its own.
- **A native crash is contained.** llama.cpp is native code built for the machine that compiled it; a crash in it
  (SIGSEGV, SIGILL) ends this process, not the run: the grade in progress and the rest of its batch fail with one
  line naming the signal and the fix, and the next batch starts a new process (at most `MAX_RESTARTS` times).
- **Memory.** The teacher's model, context and llama.cpp's buffers are not in the trainer's resident memory.

Starting it is the local backend's health check: the child loads the model and grades a test response
(`probe.PROBE_REQUEST`), so a teacher that cannot grade stops the run in one line before any student loads.
Requests go one at a time over a pipe (a grade takes about 0.2 s; a round trip a fraction of a millisecond); the
parent keeps the budget checks, the closing and the usage meter, the child only grades. The child's stderr
(llama.cpp's own log and, on a crash, faulthandler's trace) goes to a file that --debug logs.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

from grpo_llm_eval.teacher.backends.probe import PROBE_REQUEST, crash_cause, crash_message, signal_name
from grpo_llm_eval.teacher.types import TeacherUnavailable

logger = logging.getLogger(__name__)

MAX_RESTARTS = 3  # new processes after crashes, per teacher; after that every grade fails at once
START_TIMEOUT_S = 600.0  # loading the model and grading the test response


class WorkerCrashed(RuntimeError):
    """The teacher's process ended while grading; the message names the signal."""


def _serve(conn) -> None:
    """The child: load the model, grade the test response, then grade what the parent sends until it says stop."""
    from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher

    cfg, rubric, n_ctx, n_threads, verbose = conn.recv()
    try:
        teacher = LocalTeacher(cfg, rubric, n_ctx=n_ctx, n_threads=n_threads, verbose=verbose)
        start = time.perf_counter()
        teacher.load()
        probe = teacher._judge_one(PROBE_REQUEST)
        conn.send(("ready", {"status": probe.status, "error": probe.error, "seconds": time.perf_counter() - start}))
    except Exception as exc:  # a corrupt file, an unsupported model: the parent reports this line
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        conn.send(("error", text))
        return
    while True:
        try:
            op, arg = conn.recv()
        except EOFError:  # the parent is gone
            break
        if op == "close":
            break
        before = teacher.usage.usage
        try:
            out = teacher._judge_one(arg) if op == "one" else teacher._grade_group(arg)
        except Exception as exc:  # the backend catches grading errors itself; this is a bug, reported per grade
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:300]))
            continue
        conn.send(("ok", out, (teacher.usage.usage - before).as_tuple()))
    teacher.close_now()


def exit_name(code: int | None) -> str:
    """SIGSEGV for a process killed by signal 11, "exit 1" for one that exited."""
    return signal_name(code) if code is not None and code < 0 else f"exit {code}"


class TeacherWorker:
    """The parent's end: starts the child, sends it one request at a time, restarts it after a crash."""

    def __init__(self, teacher):
        self.teacher = teacher  # the parent's LocalTeacher: its config, rubric, threads and usage meter
        self._proc = None
        self._conn = None
        fd, log = tempfile.mkstemp(prefix="grpo-local-teacher-", suffix=".log")
        os.close(fd)
        self._log = Path(log)
        self.crashes = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, when: str = "before training started") -> dict:
        """Start the child and wait for its test grade; raise TeacherUnavailable in one line if it cannot grade
        (WHEN: what the message says of the moment)."""
        t = self.teacher
        # A new interpreter running this module, not multiprocessing's spawn: spawn runs the parent's main script
        # again in the child, which a user's script without a __main__ guard cannot survive.
        ours, theirs = socket.socketpair()
        with open(self._log, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", __name__, str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        theirs.close()
        self._proc, self._conn = proc, Connection(ours.detach())
        self._conn.send((t.cfg, t.rubric, t.n_ctx, t.n_threads, t.verbose))
        try:
            message = self._receive(START_TIMEOUT_S)
        except WorkerCrashed:
            self._debug_log()
            code = self._proc.returncode
            self.close()
            if code is not None and code >= 0:  # exited rather than killed: a Python error before it could report
                raise TeacherUnavailable(f"the local teacher's process exited with code {code} before it graded a test "
                                         f"response with {t.path}; run with --debug to see its output.") from None
            raise TeacherUnavailable(crash_message(t.path, code, when)) from None
        except TimeoutError:
            self.close()
            raise TeacherUnavailable(
                f"the local teacher did not finish a test grade with {t.path} in {START_TIMEOUT_S:.0f} s; check the "
                "model file and the CPU load, or serve the teacher elsewhere and set teacher_backend: openai.") from None
        if message[0] == "error":
            self.close()
            raise TeacherUnavailable(f"cannot load the local teacher {t.path}: {message[1]}")
        report = message[1]
        if report["status"] == "error":
            self.close()
            raise TeacherUnavailable(f"the local teacher {t.path} could not grade a test response: {report['error']}")
        logger.info("Local teacher: process %d, %d llama.cpp threads; loaded and graded a test response in %.1f s "
                    "(status %s).", self._proc.pid, t.n_threads, report["seconds"], report["status"])
        return report

    def _receive(self, timeout_s: float | None = None):
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._conn.poll(0.2):
            if self._proc.poll() is not None:
                raise WorkerCrashed(exit_name(self._proc.returncode))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError
        try:
            return self._conn.recv()
        except (EOFError, ConnectionResetError):
            self._proc.wait(5)
            raise WorkerCrashed(exit_name(self._proc.returncode)) from None

    def _debug_log(self) -> None:
        try:
            text = self._log.read_text(errors="replace")
        except OSError:
            return
        if text.strip():
            logger.debug("The local teacher's process, its stderr:\n%s", text[-8000:])

    def grade(self, op: str, arg):
        """The child's result for one request ("one": a JudgeRequest, "group": a GroupCall); its usage is added to
        the parent's meter. Raises WorkerCrashed, with the line to record, when the child died or cannot restart."""
        if self._proc is not None and self._proc.poll() is not None:
            self._crashed("between grades")  # nothing was in progress: the next process takes this grade
        if self._proc is None:
            if self.crashes > MAX_RESTARTS:
                raise WorkerCrashed(f"the local teacher's process died too often ({self.crashes} crashes, "
                                    f"{MAX_RESTARTS} restarts); no more grades are made")
            try:
                self.start(when="while restarting after a crash" if self.crashes else "at its first grade")
            except TeacherUnavailable as exc:
                self.crashes += 1
                raise WorkerCrashed(str(exc)) from None
        try:
            self._conn.send((op, arg))
            message = self._receive()
        except (WorkerCrashed, OSError):  # OSError: the pipe broke
            raise WorkerCrashed(self._crashed("while grading")) from None
        if message[0] == "error":
            raise WorkerCrashed(message[1])
        _, out, usage = message
        self.teacher.usage.add(*usage)
        return out

    def _crashed(self, when: str) -> str:
        """Count, log and clear a dead child; the line that names how it ended and the fix."""
        self.crashes += 1
        self._debug_log()
        if self._proc.poll() is None:
            self._proc.kill()
        code = self._proc.wait()
        self.close()
        cause = crash_cause(code) if code < 0 else "run with --debug to see its output"
        line = f"the local teacher's process died ({exit_name(code)}) {when}: {cause}"
        if self.crashes <= MAX_RESTARTS:
            logger.error("%s. A new process starts for the next grade (restart %d of %d).", line, self.crashes,
                         MAX_RESTARTS)
        else:
            logger.error("%s. No more restarts (%d crashes): every further grade fails.", line, self.crashes)
        return line

    def close(self, timeout_s: float = 10.0) -> None:
        """Ask the child to stop, then make sure it has (terminate, then kill)."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is not None:
            try:
                conn.send(("close", None))
            except (OSError, ValueError):
                pass
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            conn.close()
        self._log.unlink(missing_ok=True)


if __name__ == "__main__":
    _serve(Connection(int(sys.argv[1])))
