"""Persistent judgement cache (SQLite in WAL mode), and a Teacher wrapper that consults it.

GRPO groups often repeat a completion, and resumed or repeated runs re-grade the same texts; a grade
at temperature 0 is a pure function of (teacher, rubric, options, question, response, ground truth),
so it is looked up instead of paid for again. Only "ok" grades are stored: a failure must be retried
next time, never replayed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from grpo_llm_eval.teacher.backends.transport import display_url
from grpo_llm_eval.teacher.types import Judgement, JudgeRequest

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
_SCHEMA = "CREATE TABLE IF NOT EXISTS judgements (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"


def cache_key(model_name: str, fingerprint: str, flags: dict, request: JudgeRequest) -> str:
    """sha256 over everything that shapes a grade; `flags` are options such as structured output."""
    payload = [model_name, fingerprint, sorted(flags.items()), request.question, request.response, request.ground_truth]
    if request.sample:  # only when nonzero, so the keys of caches written before teacher_samples stay valid
        payload.append(request.sample)
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def flags_from_config(cfg) -> dict:
    """The config options that change what the teacher is asked or what its grade holds, for `cache_key`.

    The server is keyed by its URL without credentials (a rotated password is the same teacher), replicas by
    the first one's (adding a replica keeps the cache); the local backend has none. Think tags shape the cached feedback (server-side reasoning is wrapped in them).
    """
    server = ""
    if cfg.teacher_backend == "openai":
        url = cfg.openai_base_url
        url = url[0] if isinstance(url, list) else url  # replicas serve one teacher: the first names it
        url = url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        server = display_url(url.strip()).rstrip("/")  # scheme://host:port/path, no credentials
    return {"structured": bool(cfg.teacher_structured_output), "logprobs": bool(cfg.teacher_logprob_scores),
            "temperature": float(cfg.teacher_temperature), "backend": cfg.teacher_backend, "server": server,
            "think": [cfg.think_open_string, cfg.think_close_string],
            "max_tokens": int(cfg.max_feedback_new_tokens)}


class JudgementCache:
    """Key -> ok Judgement, in an SQLite file shared safely by threads and processes.

    One connection per (process, thread): sqlite3 connections must not cross a fork, and a connection
    per thread needs no lock around queries. WAL lets readers run beside a writer; `busy_timeout` makes a
    writer wait for another process's write instead of failing.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        conn = self._conn()
        for attempt in range(50):
            try:  # switching to WAL takes an exclusive lock that busy_timeout does not always wait for
                mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                conn.execute(_SCHEMA)
                conn.commit()
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.05)
        if str(mode).lower() != "wal":
            logger.warning("judgement cache %s is not in WAL mode (%s); concurrent writers may wait", self.path, mode)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise RuntimeError(f"judgement cache {self.path} is closed")
        conn = getattr(self._local, "conn", None)
        if conn is None or self._local.pid != os.getpid():
            # check_same_thread=False only so close() may close every thread's connection.
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes of the process
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._connections.append(conn)
        return conn

    @property
    def journal_mode(self) -> str:
        """The database's journal mode as SQLite reports it ("wal")."""
        return self._conn().execute("PRAGMA journal_mode").fetchone()[0]

    def get_many(self, keys: Iterable[str]) -> dict[str, Judgement]:
        """Cached judgements for those keys that have one (marked cached, latency 0, attempts 0)."""
        keys = list(keys)
        found: dict[str, Judgement] = {}
        conn = self._conn()
        for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[i: i + 500]
            marks = ",".join("?" * len(chunk))
            for key, value in conn.execute(f"SELECT key, value FROM judgements WHERE key IN ({marks})", chunk):
                found[key] = _load(value)
        with self._lock:
            self.hits += sum(k in found for k in keys)
            self.misses += sum(k not in found for k in keys)
        return found

    def put_many(self, items: Iterable[tuple[str, Judgement]]) -> int:
        """Store the ok judgements among `items`; returns how many were stored."""
        rows = [(key, _dump(j), time.time()) for key, j in items if j.ok]
        if rows:
            conn = self._conn()
            with conn:  # one transaction
                conn.executemany("INSERT OR REPLACE INTO judgements (key, value, created) VALUES (?, ?, ?)", rows)
        return len(rows)

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        """Close every connection this process opened."""
        with self._lock:
            conns, self._connections = self._connections, []
            self._closed = True
        for conn in conns:
            try:
                conn.close()
            except sqlite3.ProgrammingError:  # opened before a fork, in the parent
                pass


def _dump(j: Judgement) -> str:
    d = j.to_dict()
    for volatile in ("latency_s", "attempts", "cached"):
        d.pop(volatile)
    return json.dumps(d, ensure_ascii=False)


def _load(value: str) -> Judgement:
    return Judgement(**json.loads(value), latency_s=0.0, attempts=0, cached=True)


class CachedTeacher:
    """Any Teacher, answered from a JudgementCache where possible.

    Identical requests within one batch are graded once. The wrapper owns the cache: `aclose()` closes
    both. Keys carry `model_name`, `rubric.fingerprint` and `flags` (see `flags_from_config`); a run whose
    server refused structured output still files its plain grades under structured=True, which is
    harmless because the same server would refuse again.
    """

    def __init__(self, teacher, cache: JudgementCache, model_name: str, rubric, flags: dict):
        self.teacher = teacher
        self.cache = cache
        self.model_name = model_name
        self.rubric = rubric
        self.flags = dict(flags)

    @property
    def usage(self):
        """The wrapped teacher's usage meter: a grade answered from the cache costs nothing."""
        return self.teacher.usage

    def key(self, request: JudgeRequest) -> str:
        """The cache key of one request."""
        # The example's own rubric items are in the fingerprint of the rubric that grades them.
        return cache_key(self.model_name, self.rubric.for_items(request.rubric).fingerprint, self.flags, request)

    async def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """Cached grades where present; the rest graded by the wrapped teacher and stored if ok."""
        keys = [self.key(r) for r in requests]
        # SQLite may wait on another process's write lock: keep that wait off the event loop.
        found = await asyncio.to_thread(self.cache.get_many, keys)
        todo: dict[str, JudgeRequest] = {}
        for key, request in zip(keys, requests, strict=True):
            if key not in found:
                todo.setdefault(key, request)
        if todo:
            fresh = await self.teacher.judge(list(todo.values()))
            graded = dict(zip(todo, fresh, strict=True))
            await asyncio.to_thread(self.cache.put_many, graded.items())
            found.update(graded)
        # Copies, so that two positions never share one mutable Judgement. A call graded for several identical
        # requests has its usage split evenly over them, so that per-completion usage sums to what was spent.
        copies = {k: keys.count(k) for k in todo}
        out = []
        for k in keys:
            extra = dict(found[k].extra)
            if copies.get(k, 1) > 1 and isinstance(extra.get("usage"), dict):
                extra["usage"] = {name: value / copies[k] for name, value in extra["usage"].items()}
            out.append(dataclasses.replace(found[k], scores=dict(found[k].scores), extra=extra))
        return out

    async def health_check(self) -> None:
        """The wrapped teacher's health check."""
        await self.teacher.health_check()

    async def aclose(self) -> None:
        """Close the wrapped teacher and the cache."""
        try:
            await self.teacher.aclose()
        finally:
            self.cache.close()
