"""The teacher's spend, written down as it happens, so that a crash cannot forget what was paid.

A checkpoint saves the run's totals as of its step; what the teacher cost between that checkpoint and a crash
(kill -9, a lost node) was billed but would be counted nowhere, and a resumed run could spend its budget again.
So each process keeps one row in a `spend` table of the run's judgement database (`judgements.sqlite`, the
same SQLite file in WAL mode as the judgement cache, written whether or not the cache is on): its calls and
tokens so far, rewritten after every call (`UsageMeter.add`). A committed WAL transaction survives the
process being killed. A resumed run counts the rows of the processes that started before it: every call any
earlier session made, up to its last one.

The same rows let each process see the whole run's spend as it happens, so the budgets hold in aggregate:
a process refuses calls when the run (all processes) has spent the budget, not when it has spent 1/n of it,
so with uneven load no process is starved while the others leave budget unused (`UsageMeter.admit`).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from grpo_llm_eval.teacher.usage import USAGE_KEYS, Usage

logger = logging.getLogger(__name__)

_COLUMNS = ", ".join(f"{k} INTEGER NOT NULL" for k in USAGE_KEYS)
_SCHEMA = f"CREATE TABLE IF NOT EXISTS spend (id TEXT PRIMARY KEY, started REAL NOT NULL, updated REAL NOT NULL, {_COLUMNS})"
BUSY_TIMEOUT_S = 30.0


class SpendLedger:
    """One process's row of teacher spend in the run's database; `before(t)`: the rows of processes started before t."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.id = uuid.uuid4().hex
        self.started = time.time()  # wall clock: rows are compared across processes and sessions
        # When this session's first process started (agreed on resume, judge_spend.py); 0: every row is this
        # session's (a new run).
        self.session_start = 0.0
        self._lock = threading.Lock()
        self._warned = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        self._conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:  # another process is switching it right now: it ends in WAL either way
            pass
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives the process's death
        with self._conn:
            self._conn.execute(_SCHEMA)

    def record(self, usage: Usage) -> None:
        """Write this process's totals so far (called with the meter's lock held, so rows only grow)."""
        with self._lock:
            try:
                with self._conn:
                    self._conn.execute(f"INSERT OR REPLACE INTO spend (id, started, updated, {', '.join(USAGE_KEYS)}) "
                                       f"VALUES (?, ?, ?, {', '.join('?' * len(USAGE_KEYS))})",
                                       (self.id, self.started, time.time(), *usage.as_tuple()))
            except sqlite3.Error as exc:  # a full disk must not stop the grading; the checkpoint still counts
                if not self._warned:
                    self._warned = True
                    logger.warning("cannot write the teacher's spend to %s (%s): a crash before the next checkpoint "
                                   "would forget what was spent since the last one", self.path, exc)

    def before(self, started: float) -> Usage | None:
        """The spend of every process that started before STARTED (the run's earlier sessions); None: no row."""
        with self._lock:
            row = self._conn.execute(f"SELECT COUNT(*), {', '.join(f'SUM({k})' for k in USAGE_KEYS)} FROM spend "
                                     "WHERE started < ?", (started,)).fetchone()
        return None if not row[0] else Usage(*(int(v or 0) for v in row[1:]))

    def session_total(self) -> Usage:
        """The spend of this session's processes so far (rows started at `session_start` or later): every process
        writes its row as it goes, so this is the run-wide spend of the session, read by each process's budget."""
        with self._lock:
            row = self._conn.execute(f"SELECT {', '.join(f'SUM({k})' for k in USAGE_KEYS)} FROM spend "
                                     "WHERE started >= ?", (self.session_start,)).fetchone()
        return Usage(*(int(v or 0) for v in row))

    def session_rows(self) -> int:
        """How many processes of this session have a row in this file (all of them: the file is shared)."""
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM spend WHERE started >= ?", (self.session_start,)).fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SharedWindow:
    """`limits.SlidingWindow` for all the processes of a run at once, kept in the ledger's file: at most LIMIT
    units (requests, or tokens) in any WINDOW_S, counted as SlidingWindow counts them (from the send until
    WINDOW_S after the answer), whichever process sends. Check and take are one IMMEDIATE transaction, so two
    processes cannot both take the last room. Entries of earlier sessions (a crashed process's calls in flight
    would otherwise hold their room for ever) are dropped when the window is opened."""

    _SCHEMA = ("CREATE TABLE IF NOT EXISTS rate_window (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, "
               "sent REAL NOT NULL, ends REAL NOT NULL, amount REAL NOT NULL)")
    _IN_FLIGHT = 1e300

    def __init__(self, path: str | Path, name: str, limit: float, window_s: float, session_start: float):
        self.name, self.limit, self.window_s = name, float(limit), float(window_s)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, check_same_thread=False, isolation_level=None)
        self._conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        self._conn.execute(self._SCHEMA)
        self._conn.execute("DELETE FROM rate_window WHERE name = ? AND sent < ?", (name, session_start))

    def _try(self, amount: float) -> tuple[float, int | None]:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                conn.execute("DELETE FROM rate_window WHERE name = ? AND ends <= ?", (self.name, now - self.window_s))
                rows = conn.execute("SELECT ends, amount FROM rate_window WHERE name = ?", (self.name,)).fetchall()
                used = sum(a for _, a in rows)
                if used + amount <= self.limit or not rows:
                    cur = conn.execute("INSERT INTO rate_window (name, sent, ends, amount) VALUES (?, ?, ?, ?)",
                                       (self.name, now, self._IN_FLIGHT, float(amount)))
                    return 0.0, cur.lastrowid
                need, freed = used + amount - self.limit, 0.0
                for ends, size in sorted(r for r in rows if r[0] < self._IN_FLIGHT):
                    freed += size
                    if freed >= need:
                        return max(1e-3, ends + self.window_s - now), None
                return 0.05, None
            finally:
                conn.execute("COMMIT")

    async def acquire(self, amount: float = 1.0) -> int:
        """Wait until AMOUNT fits in the run's window and take it; returns its entry (for `finish`)."""
        import asyncio

        while True:
            wait, entry = self._try(amount)
            if entry is not None:
                return entry
            await asyncio.sleep(wait)

    def finish(self, entry: int, amount: float | None = None) -> None:
        """The request of ENTRY has ended; AMOUNT: its real size, when known."""
        with self._lock:
            if amount is None:
                self._conn.execute("UPDATE rate_window SET ends = ? WHERE id = ?", (time.time(), entry))
            else:
                self._conn.execute("UPDATE rate_window SET ends = ?, amount = ? WHERE id = ?",
                                   (time.time(), float(amount), entry))
