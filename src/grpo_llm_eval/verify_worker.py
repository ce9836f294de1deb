"""math-verify in a child process with a deadline per check, so that no answer can stall the caller.

Why a process: math-verify (through sympy) can compute for ever on a nested power such as
``7^{7^{7^{7}}}`` (Math-Verify issue 65). Its own ``timeout_seconds`` uses ``signal.alarm``, which works only
in the main thread (rewards run in TRL's event-loop thread) and cannot stop a long integer power inside C
anyway. A thread cannot be stopped either. A child process can: a check that misses its deadline has its
process killed, the check reads as not verified, and the next check starts a fresh child.

Cost, measured on the 2-core development machine over 200 checks that reach math-verify: 0.73 to 0.76 ms a
check here against 0.36 to 0.74 ms in-process; the child starts in 0.3 s (once), and a killed check's
successor starts in 0.3 s. A hostile answer costs CHECK_TIMEOUT_S plus that restart.

Protocol: one JSON line per check on the child's stdin (``[gold, answer]``), one JSON line back
(``{"result": true|false|null}``, or ``{"error": "..."}`` where math-verify raised). The child exits when
its stdin closes, so it never outlives the process that started it by more than one check.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import selectors
import subprocess
import sys
import threading
import time

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0  # one check; typical checks take milliseconds
START_TIMEOUT_S = 120.0  # the child imports math-verify and sympy once (seconds on a busy machine)
TIMED_OUT = "timeout"


class CheckTimeout(Exception):
    """A check that missed its deadline; its child process was killed."""


class BoundedVerifier:
    """Runs ``math_verify.parse`` + ``verify`` in a child process; thread-safe (one check at a time)."""

    def __init__(self, timeout_s: float = CHECK_TIMEOUT_S, start_timeout_s: float = START_TIMEOUT_S):
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.timeouts = 0  # checks that missed their deadline, for logs and tests
        self.starts = 0  # child processes started
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()  # a forked copy of this object must not share the parent's pipes
        self._lock = threading.Lock()

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen([sys.executable, "-m", "grpo_llm_eval.verify_worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self.starts += 1
        line = self._read_line(self.start_timeout_s)
        if line is None or json.loads(line).get("ready") is not True:
            self._kill()
            raise RuntimeError(f"the math-verify worker did not start within {self.start_timeout_s:.0f} s")

    def _read_line(self, timeout_s: float) -> bytes | None:
        """One line from the child, or None when it did not come within TIMEOUT_S (or the child died)."""
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            left = timeout_s
            while left > 0:
                if sel.select(left):
                    line = self._proc.stdout.readline()  # the child writes whole lines and flushes
                    return line or None
                left = deadline - time.monotonic()
        return None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
            for stream in (proc.stdin, proc.stdout):
                stream.close()

    def check(self, gold: str, answer: str) -> bool | None:
        """math-verify's verdict on ANSWER against GOLD (None: nothing parsed on one side).

        Raises CheckTimeout past the deadline, and ValueError with math-verify's message where it raised.
        """
        if self._pid != os.getpid():  # forked: the child process and its pipes belong to the parent
            self._proc, self._pid, self._lock = None, os.getpid(), threading.Lock()
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            try:
                self._proc.stdin.write((json.dumps([gold, answer]) + "\n").encode())
                self._proc.stdin.flush()
            except OSError:  # the child died between checks: one retry with a fresh one
                self._kill()
                self._start()
                self._proc.stdin.write((json.dumps([gold, answer]) + "\n").encode())
                self._proc.stdin.flush()
            line = self._read_line(self.timeout_s)
            if line is None:
                self._kill()
                self.timeouts += 1
                raise CheckTimeout(f"math-verify took over {self.timeout_s:g} s")
        reply = json.loads(line)
        if "error" in reply:
            raise ValueError(reply["error"])
        return reply["result"]

    def close(self) -> None:
        """Stop the child process (it also exits by itself when this process ends)."""
        if self._pid != os.getpid():  # a forked copy: the child process is the parent's
            return
        with self._lock:
            self._kill()


_shared: BoundedVerifier | None = None
_shared_lock = threading.Lock()


def shared() -> BoundedVerifier:
    """This process's verifier (started on first use, stopped at exit)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = BoundedVerifier()
            atexit.register(_shared.close)
        return _shared


def _serve() -> None:
    """The child's loop: read checks from stdin, answer on stdout, until stdin closes."""
    logging.disable(logging.CRITICAL)  # math-verify warns on every call with its timeouts off
    from math_verify import parse, verify

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            gold_text, answer = json.loads(line)
            # Timeouts off: the parent enforces the deadline by killing this process.
            gold, pred = parse(gold_text, parsing_timeout=None), parse(answer, parsing_timeout=None)
            reply = {"result": bool(verify(gold, pred, timeout_seconds=None)) if gold and pred else None}
        except Exception as exc:  # math-verify raises on odd input; the parent falls back
            reply = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve()
