"""A fault-injecting OpenAI-compatible teacher server on loopback (stdlib only).

Serves `GET /v1/models`, `POST /v1/chat/completions` (non-streaming) and `GET /stats`. Modes (what it
writes: `grades.py`): `scripted`, a correct teacher (answer and thought_process 10 when the student's last
number equals the ground truth's, else 0; format 10 with a think block); `fixed` scores; `obedient`, a
gullible teacher; the bad judges `inverted`, `random`, `length_loving` and `master_key`. Group prompts
(`judge_mode: group`) are answered in the group format (`group_grades.py`, with `position_biased`,
`group_wrong_count` and `group_forged`). `switch_mode=(N, MODE)`
turns it into MODE after N chat requests (a judge that goes wrong mid-run). Faults (`FAULT_KINDS`, opt-in `EXTRA_FAULTS`) come at `fault_rate` from a seeded RNG or
in order (`fault_script`), changeable while serving (`set_faults`); `die_after=N` kills the server after N
chat requests; `require_auth` answers 401 to requests without that Authorization header; `serial` grades
one request at a time and queues the rest, and `refuse_json_schema` refuses response_format json_schema
(taking json_object), as llama.cpp's server does. Every request and fault is counted, so tests can compare
the server's view with the client's.

    with TeacherServer(mode="scripted", fault_rate=0.3, seed=0) as srv:
        srv.base_url   # http://127.0.0.1:PORT/v1

CLI: python -m grpo_llm_eval.testing.teacher_server --port 8011 --mode scripted --latency-s 2
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import random
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from grpo_llm_eval.testing.grades import (
    GARBAGE,
    MODES,
    SEED_CRITERIA,
    _error,
    _text,
    completion_object,
    criteria_in,
    extract_fields,
    last_number,
    request_key,
    scripted_grade,
)

logger = logging.getLogger(__name__)

# Re-exported: tests and benchmarks import the grading helpers from here too.
__all__ = ["ALL_FAULTS", "EXTRA_FAULTS", "FAULT_KINDS", "GARBAGE", "MODES", "SEED_CRITERIA", "TeacherServer",
           "criteria_in", "extract_fields", "last_number", "request_key", "scripted_grade"]

FAULT_KINDS = ("500", "429", "hang", "garbage", "empty")  # the default mix
# Opt-in kinds: "drop" closes the connection without an answer (a crash mid-request), "huge" answers
# `huge_chars` of adversarial near-miss grade syntax, "noisy" wraps an honest grade in control characters.
# "trickle" sends a good answer a few bytes at a time over `hang_s` (no single read ever waits long).
EXTRA_FAULTS = ("drop", "huge", "noisy", "trickle")
ALL_FAULTS = FAULT_KINDS + EXTRA_FAULTS


def _check_faults(kinds) -> None:
    unknown = set(kinds) - set(ALL_FAULTS)
    if unknown:
        raise ValueError(f"unknown faults {sorted(unknown)}; choose from {ALL_FAULTS}")


class TeacherServer:
    """An OpenAI-compatible grading server on 127.0.0.1 in a background thread (see module doc)."""

    def __init__(self, mode: str = "scripted", fault_rate: float = 0.0, seed: int = 0,
                 faults: tuple[str, ...] = FAULT_KINDS, hang_s: float = 5.0, retry_after_s: float = 1.0,
                 latency_s: float = 0.0, models: tuple[str, ...] = ("teacher",),
                 fixed_scores: dict[str, int] | None = None, refuse_response_format: bool = False,
                 refuse_logprobs: bool = False, reasoning_field: str | None = None,
                 models_endpoint: bool = True, refuse_max_tokens: bool = False, port: int = 0,
                 fault_script: tuple[str | None, ...] = (), die_after: int | None = None,
                 huge_chars: int = 2_000_000, require_auth: str | None = None, refuse_json_schema: bool = False,
                 serial: bool = False, switch_mode: tuple[int, str] | None = None, prefix_cache: bool = False,
                 cache_block: int = 16):
        for m in (mode, *(switch_mode[1:] if switch_mode else ())):
            if m not in MODES:
                raise ValueError(f"mode must be one of {', '.join(MODES)}, not {m!r}")
        _check_faults((*faults, *(f for f in fault_script if f is not None)))
        self.mode, self.fault_rate, self.faults = mode, fault_rate, tuple(faults)
        self.fault_script = list(fault_script)  # faults of the next chat requests, in arrival order; None: no fault
        self.die_after, self.huge_chars, self.switch_mode = die_after, huge_chars, switch_mode
        self.hang_s, self.retry_after_s, self.latency_s = hang_s, retry_after_s, latency_s
        self.models = tuple(models)
        self.fixed_scores = dict(fixed_scores or {c: 7 for c in SEED_CRITERIA})
        self.refuse_response_format, self.refuse_logprobs = refuse_response_format, refuse_logprobs
        self.refuse_json_schema = refuse_json_schema  # as llama.cpp's server: json_object (with a schema) is taken
        # serial: grade one request at a time and queue the rest, skipping those whose client left while queued
        # (llama.cpp's server does both).
        self.serial, self._serial_lock = serial, threading.Lock()
        self.reasoning_field, self.models_endpoint, self.port = reasoning_field, models_endpoint, port
        self.refuse_max_tokens = refuse_max_tokens  # as OpenAI's newer models do
        self.require_auth = require_auth  # the exact Authorization header every request must carry; else 401
        # prefix_cache: report usage.prompt_tokens_details.cached_tokens as vLLM's prefix cache would: the leading
        # whole blocks of cache_block prompt tokens (here: words) that an earlier request's prompt began with.
        self.prefix_cache, self.cache_block = prefix_cache, max(1, int(cache_block))
        self._blocks: set[int] = set()  # hashes of every cached prefix, one per block boundary
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._dead = threading.Event()
        self._served = 0  # chat requests finished, for die_after
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset_stats()

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> TeacherServer:
        """Bind 127.0.0.1 (never another interface) and serve in a daemon thread."""
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = _Server(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False  # hung handlers are woken by _stopping instead
        self.port = self._httpd.server_address[1]
        self._stopping.clear()
        self._dead.clear()
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),  # poll often: stop() waits for it
                                        name="teacher-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and release the port."""
        self._stopping.set()
        self._close_listener()

    def _close_listener(self) -> None:
        with self._lock:
            httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            self._thread.join(timeout=5)

    def kill(self) -> None:
        """Die as a killed process does: refuse new connections and drop every open one without an answer."""
        self._dead.set()
        self._close_listener()

    @property
    def dead(self) -> bool:
        return self._dead.is_set()

    def set_faults(self, fault_rate: float | None = None, faults: tuple[str, ...] | None = None,
                   script: tuple[str | None, ...] | None = None) -> None:
        """Change the fault rate, the kinds, or the scripted faults of the next requests while serving."""
        _check_faults((*(faults or ()), *(f for f in (script or ()) if f is not None)))
        with self._lock:
            if fault_rate is not None:
                self.fault_rate = fault_rate
            if faults is not None:
                self.faults = tuple(faults)
            if script is not None:
                self.fault_script = list(script)

    def __enter__(self) -> TeacherServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"http://127.0.0.1:{self.port}/v1"

    # ---- bookkeeping -------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Forget all counts and the request log."""
        with self._lock:
            kinds = dict.fromkeys((*FAULT_KINDS, *self.faults, *(f for f in self.fault_script if f)), 0)
            self._stats = {"requests": 0, "chat_requests": 0, "model_requests": 0, "faults": kinds,
                           "responses": {}, "in_flight": 0, "max_in_flight": 0, "dropped_dead": 0, "log": []}

    def stats(self) -> dict:
        """A copy of the counters and the per-request log (also served at GET /stats)."""
        with self._lock:
            return json.loads(json.dumps(self._stats))

    def _count(self, path: str) -> None:
        with self._lock:
            self._stats["requests"] += 1
            if path.endswith("/chat/completions"):
                self._stats["chat_requests"] += 1
            elif path.endswith("/models"):
                self._stats["model_requests"] += 1

    def _enter_chat(self, body: dict, authorization: str | None) -> dict:
        """Record a chat request and decide its fault. The log keeps a digest of the API key, never the key."""
        key = request_key(body.get("messages"))
        token = (authorization or "").removeprefix("Bearer ").strip()
        auth = hashlib.sha256(token.encode()).hexdigest()[:16] if token else None
        with self._lock:
            fault = None
            if self.fault_script:
                fault = self.fault_script.pop(0)
            elif self.faults and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.faults)
            if fault is not None:
                self._stats["faults"][fault] = self._stats["faults"].get(fault, 0) + 1
            s = self._stats
            if self.switch_mode is not None and s["chat_requests"] > self.switch_mode[0]:
                self.mode, self.switch_mode = self.switch_mode[1], None
            s["in_flight"] += 1
            s["max_in_flight"] = max(s["max_in_flight"], s["in_flight"])
            entry = {"i": len(s["log"]), "t": time.monotonic(), "key": key, "fault": fault, "status": None, "auth": auth,
                     "structured": "response_format" in body, "logprobs": bool(body.get("logprobs"))}
            entry["queued"] = s["in_flight"] - 1  # requests ahead of this one (all of them, when serial)
            s["log"].append(entry)
            return entry

    def _leave_chat(self, entry: dict, status: int | None) -> None:
        with self._lock:
            self._stats["in_flight"] -= 1
            entry["status"] = status
            entry["t_done"] = time.monotonic()
            self._served += 1
            dying = self.die_after is not None and self._served >= self.die_after and not self._dead.is_set()
        if dying:  # from another thread: shutdown() waits for the serving loop, which must not be us
            self._dead.set()
            threading.Thread(target=self._close_listener, name="teacher-server-death", daemon=True).start()

    def _dropped_dead(self) -> None:
        with self._lock:
            self._stats["dropped_dead"] += 1

    def _responded(self, status: int) -> None:
        with self._lock:
            self._stats["responses"][str(status)] = self._stats["responses"].get(str(status), 0) + 1

    # ---- grading -----------------------------------------------------------------------------
    def completion(self, body: dict, fault: str | None, number: int = 0) -> dict:
        """The chat.completion object for a request (faults that still answer 200 applied)."""
        payload = completion_object(body, fault, number, self.mode, self.fixed_scores, self.huge_chars,
                                    self.reasoning_field)
        if self.prefix_cache:
            payload["usage"]["prompt_tokens_details"] = {"cached_tokens": self._cached_prefix(body)}
        return payload

    def _cached_prefix(self, body: dict) -> int:
        """Prompt tokens (words, as prompt_tokens counts them) found in the prefix cache; this prompt's blocks
        are cached from now on. Blocks are chained by hash, so a block counts only after all those before it."""
        words = "\n".join(_text(m.get("content")) for m in body.get("messages", [])).split()
        hashes, h = [], 0
        for start in range(0, len(words) - self.cache_block + 1, self.cache_block):
            h = hash((h, tuple(words[start:start + self.cache_block])))
            hashes.append(h)
        with self._lock:
            hit = 0
            while hit < len(hashes) and hashes[hit] in self._blocks:
                hit += 1
            self._blocks.update(hashes)
        return hit * self.cache_block


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connections under a burst of concurrent calls; the client then
    # waits a SYN retransmit (1 s) and reports a timeout the server never saw.
    request_queue_size = 256


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    timeout = 60  # drop idle keep-alive connections eventually
    app: TeacherServer

    def log_message(self, fmt: str, *args) -> None:
        logger.debug("teacher-server: " + fmt, *args)

    def _send(self, status: int, payload, headers: dict | None = None, trickle_s: float = 0.0) -> None:
        data = json.dumps(payload).encode()
        self.app._responded(status)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if trickle_s <= 0:
                self.wfile.write(data)
                return
            pieces = 20
            step = max(1, -(-len(data) // pieces))
            for i in range(0, len(data), step):
                self.wfile.write(data[i:i + step])
                self.wfile.flush()
                if self.app._stopping.wait(trickle_s / pieces):
                    return
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("teacher-server: client went away before the response")

    def _drop(self) -> None:
        """Close the connection without an answer (the client sees the server disconnect)."""
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _unauthorized(self) -> bool:
        """Answer 401 (and say so) when the server requires credentials the request lacks."""
        if self.app.require_auth is None or self.headers.get("Authorization") == self.app.require_auth:
            return False
        self._send(401, _error("Incorrect API key or credentials", "invalid_request_error", code="invalid_api_key"))
        return True

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.app.dead:
            self.app._dropped_dead()
            return self._drop()
        path = self.path.split("?")[0].rstrip("/")
        self.app._count(path)
        if path != "/stats" and self._unauthorized():
            return
        if path == "/stats":
            self._send(200, self.app.stats())
        elif path == "/v1/models" and self.app.models_endpoint:
            self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "teacher-server"} for m in self.app.models]})
        else:
            self._send(404, _error(f"no route {path}", "not_found"))

    def do_POST(self) -> None:  # noqa: N802
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.app.dead:
            self.app._dropped_dead()
            return self._drop()
        path = self.path.split("?")[0].rstrip("/")
        self.app._count(path)
        if self._unauthorized():
            return
        if path != "/v1/chat/completions":
            return self._send(404, _error(f"no route {path}", "not_found"))
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            return self._send(400, _error("request body is not JSON", "invalid_request_error"))
        app = self.app
        if body.get("model") not in app.models:
            return self._send(404, _error(f"The model `{body.get('model')}` does not exist", "invalid_request_error",
                                          "model", "model_not_found"))
        if app.refuse_response_format and body.get("response_format"):
            return self._send(400, _error("response_format json_schema is not supported by this server",
                                          "invalid_request_error", "response_format"))
        if app.refuse_json_schema and (body.get("response_format") or {}).get("type") == "json_schema":
            return self._send(400, _error("response_format type json_schema is not supported; use json_object",
                                          "invalid_request_error", "response_format"))
        if app.refuse_logprobs and body.get("logprobs"):
            return self._send(400, _error("logprobs are not supported by this server", "invalid_request_error", "logprobs"))
        if app.refuse_max_tokens and "max_tokens" in body:
            return self._send(400, _error("Unsupported parameter: 'max_tokens' is not supported with this model. "
                                          "Use 'max_completion_tokens' instead.", "invalid_request_error", "max_tokens"))
        entry = app._enter_chat(body, self.headers.get("Authorization"))
        fault, status = entry["fault"], 200
        if fault == "drop":
            app._leave_chat(entry, None)
            return self._drop()
        with app._serial_lock if app.serial else contextlib.nullcontext():
            if app.serial and self._client_gone():
                app._leave_chat(entry, None)
                return self._drop()
            status, payload, headers = self._answer(body, entry)
        # Leave before writing, so the next request a client sends after reading this answer is never
        # counted as overlapping with it (keeps max_in_flight exact).
        app._leave_chat(entry, status)
        self._send(status, payload, headers, trickle_s=app.hang_s if fault == "trickle" else 0.0)

    def _client_gone(self) -> bool:
        """Whether the client closed the connection (readable with nothing to read), e.g. after its timeout."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _answer(self, body: dict, entry: dict) -> tuple[int, dict, dict | None]:
        app, fault, status = self.app, entry["fault"], 200
        try:
            app._stopping.wait(app.latency_s + (app.hang_s if fault == "hang" else 0.0))
            if fault == "500":
                status, payload, headers = 500, _error("injected internal server error", "server_error"), None
            elif fault == "429":
                wait = app.retry_after_s
                status, headers = 429, {"Retry-After": str(int(wait)) if float(wait).is_integer() else str(wait)}
                payload = _error("Rate limit reached (injected)", "rate_limit_error", code="rate_limit_exceeded")
            else:
                payload, headers = app.completion(body, fault, entry["i"]), None
                entry["usage"] = payload["usage"]
        except Exception as exc:  # a bug in the fake must still answer, or the client hangs
            logger.exception("teacher-server: failed to build a response")
            status, payload, headers = 500, _error(f"teacher-server bug: {type(exc).__name__}", "server_error"), None
        return status, payload, headers


def main(argv: list[str] | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    p = argparse.ArgumentParser(description="Fault-injecting OpenAI-compatible teacher server (loopback only).")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--mode", choices=MODES, default="scripted")
    for flag, kind, default in [("--fault-rate", float, 0.0), ("--seed", int, 0), ("--hang-s", float, 5.0),
                                ("--retry-after-s", float, 1.0), ("--latency-s", float, 0.0),
                                ("--die-after", int, None), ("--huge-chars", int, 2_000_000)]:
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--faults", default=",".join(FAULT_KINDS), help="comma list from " + ",".join(ALL_FAULTS))
    p.add_argument("--models", default="teacher", help="comma list of served model names")
    p.add_argument("--fixed-scores", default="", help="e.g. thought_process=7,answer=7,format=7")
    p.add_argument("--refuse-response-format", action="store_true")
    p.add_argument("--refuse-logprobs", action="store_true")
    p.add_argument("--refuse-json-schema", action="store_true", help="refuse response_format json_schema only")
    p.add_argument("--serial", action="store_true", help="grade one request at a time, queue the rest")
    p.add_argument("--reasoning-field", default=None, help="also return reasoning text in this message field")
    a = p.parse_args(argv)
    fixed = {k: int(v) for k, v in (kv.split("=") for kv in a.fixed_scores.split(",") if kv)} or None
    srv = TeacherServer(mode=a.mode, fault_rate=a.fault_rate, seed=a.seed, faults=tuple(f for f in a.faults.split(",") if f),
                        hang_s=a.hang_s, retry_after_s=a.retry_after_s, latency_s=a.latency_s,
                        models=tuple(a.models.split(",")), fixed_scores=fixed, refuse_response_format=a.refuse_response_format,
                        refuse_logprobs=a.refuse_logprobs, refuse_json_schema=a.refuse_json_schema,
                        serial=a.serial, reasoning_field=a.reasoning_field, port=a.port,
                        die_after=a.die_after, huge_chars=a.huge_chars)
    srv.start()
    print(f"teacher server at {srv.base_url} (mode={a.mode}, fault_rate={a.fault_rate}); Ctrl-C to stop", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
