"""A fault-injecting OpenAI-compatible teacher server on loopback (stdlib only).

Serves `GET /v1/models`, `POST /v1/chat/completions` (non-streaming) and `GET /stats`. In `scripted`
mode it grades like a correct teacher: answer and thought_process 10 when the student's last number
equals the ground truth's, else 0; format 10 when the response has a think block. In `fixed` mode it
always gives the same scores. Faults ("500", "429", "hang", "garbage", "empty") are injected at
`fault_rate` with a seeded RNG, and every request and fault is counted so tests can compare the
server's view with the client's metrics.

    with TeacherServer(mode="scripted", fault_rate=0.3, seed=0) as srv:
        srv.base_url   # http://127.0.0.1:PORT/v1

CLI: python -m grpo_llm_eval.testing.teacher_server --port 8011 --mode scripted --latency-s 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import re
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

FAULT_KINDS = ("500", "429", "hang", "garbage", "empty")
SEED_CRITERIA = ("thought_process", "answer", "format")
GARBAGE = "I am unable to follow the requested format. Here are some thoughts about the weather instead."
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_TOKEN = re.compile(r"\d+|[A-Za-z_]+|\s+|[^\w\s]")
# Probability mass the fake sampler puts on the emitted score token and on its neighbours, so that a
# logprob-weighted score differs from the parsed one (10 -> 9.75) and tests can tell them apart.
_SCORE_MASS = (0.8, 0.15, 0.05)


def request_key(messages) -> str:
    """The id the request log gives a chat request: a digest of its messages (retries share it)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def _block(text: str, tag: str) -> str | None:
    """The last `<tag>...</tag>` block; tolerant of attributes, case and a missing closing tag."""
    found = re.findall(rf"<{tag}\b[^>]*>(.*?)</{tag}\s*>", text, re.S | re.I)
    if found:
        return found[-1].strip()
    unclosed = re.search(rf"<{tag}\b[^>]*>(.*?)(?=<(?:student_response|ground_truth)\b|\Z)", text, re.S | re.I)
    return unclosed.group(1).strip() if unclosed else None


def extract_fields(prompt: str) -> tuple[str | None, str | None]:
    """(student response, ground truth) from a rendered rubric prompt; None where not found."""
    response, truth = _block(prompt, "student_response"), _block(prompt, "ground_truth")
    if response is None:  # the seed's unfenced layout
        m = re.search(r"Student Response:\s*\n(.*?)\n\s*Ground Truth:\s*\n(.*)\Z", prompt, re.S)
        if m:
            response, truth = m.group(1).strip(), truth or m.group(2).strip()
    return response, truth


def last_number(text: str | None) -> Fraction | None:
    """The last number in `text` as an exact fraction ("1,000" and "3/4" included)."""
    found = _NUMBER.findall(text or "")
    try:
        return Fraction(found[-1].replace(",", "")) if found else None
    except (ValueError, ZeroDivisionError):  # "1/0", "1.5/2"
        return None


def criteria_in(prompt: str) -> list[str]:
    """Criterion names from the XML format a rubric prompt shows (`<name><score>`); the seed's if none."""
    names = [n for n in re.findall(r"<([A-Za-z_]\w*)>\s*<score>", prompt) if n != "evaluation"]
    return list(dict.fromkeys(names)) or list(SEED_CRITERIA)


def scripted_grade(prompt: str, think_open: str = "<think>", think_close: str = "</think>") -> dict:
    """A correct teacher's grade: {criterion: (score, explanation)} for the criteria the prompt names.

    "format" is 10 when the response has a think block; every other criterion is 10 when the student's
    last number equals the ground truth's last number, else 0. Without a response to find, all are 0.
    """
    names = criteria_in(prompt)
    response, truth = extract_fields(prompt)
    if response is None:
        return {c: (0, "could not find the student's response in the prompt") for c in names}
    got, want = last_number(response), last_number(truth)
    right = got is not None and want is not None and got == want
    verdict = (10 if right else 0, f"The final number {got} {'matches' if right else 'does not match'} "
                                   f"the ground truth {want}.")
    has_think = re.search(re.escape(think_open) + r".*?" + re.escape(think_close), response, re.S) is not None
    form = (10, "Think block present.") if has_think else (0, "No think block.")
    return {c: form if c == "format" else verdict for c in names}


def _xml(grade: dict) -> str:
    parts = [f"  <{c}><score>{s}</score><explanation>{e}</explanation></{c}>" for c, (s, e) in grade.items()]
    return "<evaluation>\n" + "\n".join(parts) + "\n</evaluation>"


def _fill(schema: dict, root: dict, grade: dict, crit: str | None = None, key: str | None = None):
    """An instance of a JSON schema whose score/explanation fields carry `grade` (the fake constrained decoder)."""
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    for combo in ("anyOf", "oneOf", "allOf"):
        if combo in schema:
            options = [s for s in schema[combo] if s.get("type") != "null"] or schema[combo]
            return _fill(options[0], root, grade, crit, key)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        choices = schema["enum"]
        bare = {k: v for k, v in schema.items() if k != "enum"}
        if "type" not in bare and all(isinstance(c, (int, float)) for c in choices):
            bare["type"] = "number"
        wanted = _fill(bare, root, grade, crit, key)
        return wanted if wanted in choices else crit if crit in choices else choices[0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {k: _fill(s, root, grade, k if k in grade else crit, k) for k, s in schema.get("properties", {}).items()}
    if kind == "array":
        item = schema.get("items", {})
        props = item.get("properties", {})
        if any(k in props for k in ("name", "criterion")):  # a list of per-criterion objects
            return [_fill(item, root, grade, c, None) for c in grade]
        return []
    if kind in ("integer", "number"):
        score = grade[crit][0] if crit else 0
        score = min(max(score, schema.get("minimum", score)), schema.get("maximum", score))
        return int(score) if kind == "integer" else float(score)
    if kind in ("boolean", "null"):
        return True if kind == "boolean" else None
    if crit and key in ("name", "criterion"):
        return crit
    return grade[crit][1] if crit else " ".join(e for _, e in grade.values())


def _json(grade: dict, response_format: dict) -> str:
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema")
    if not schema:  # json_object mode: the seed's structure as JSON
        return json.dumps({c: {"score": s, "explanation": e} for c, (s, e) in grade.items()})
    return json.dumps(_fill(schema, schema, grade))


def _logprobs(tokens: list[str], top_n: int) -> list[dict]:
    """OpenAI-style `logprobs.content`: numbers in 0..10 get some mass on their neighbours."""
    out = []
    for tok in tokens:
        if tok.isdigit() and int(tok) <= 10:
            v = int(tok)
            alts = [v] + [a for a in (v - 1, v + 1, v - 2, v + 2) if 0 <= a <= 10][:2]
            if 1 in alts and 10 not in alts:
                # Real tokenizers have a "10" token too; without it a "1" could be the start of "10".
                alts[-1] = 10
            tops = [(str(a), math.log(p)) for a, p in zip(alts, _SCORE_MASS, strict=True)]
        else:
            tops = [(tok, -0.01), (" ", -5.0), ("the", -6.0)]
        entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in tops[:max(top_n, 1)]]
        out.append({**entries[0], "top_logprobs": entries[:top_n]})
    return out


class TeacherServer:
    """An OpenAI-compatible grading server on 127.0.0.1 in a background thread (see module doc)."""

    def __init__(self, mode: str = "scripted", fault_rate: float = 0.0, seed: int = 0,
                 faults: tuple[str, ...] = FAULT_KINDS, hang_s: float = 5.0, retry_after_s: float = 1.0,
                 latency_s: float = 0.0, models: tuple[str, ...] = ("teacher",),
                 fixed_scores: dict[str, int] | None = None, refuse_response_format: bool = False,
                 refuse_logprobs: bool = False, reasoning_field: str | None = None,
                 models_endpoint: bool = True, refuse_max_tokens: bool = False, port: int = 0):
        if mode not in ("scripted", "fixed"):
            raise ValueError(f"mode must be 'scripted' or 'fixed', not {mode!r}")
        unknown = set(faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; choose from {FAULT_KINDS}")
        self.mode, self.fault_rate, self.faults = mode, fault_rate, tuple(faults)
        self.hang_s, self.retry_after_s, self.latency_s = hang_s, retry_after_s, latency_s
        self.models = tuple(models)
        self.fixed_scores = dict(fixed_scores or {c: 7 for c in SEED_CRITERIA})
        self.refuse_response_format, self.refuse_logprobs = refuse_response_format, refuse_logprobs
        self.reasoning_field, self.models_endpoint, self.port = reasoning_field, models_endpoint, port
        self.refuse_max_tokens = refuse_max_tokens  # as OpenAI's newer models do
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
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
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),  # poll often: stop() waits for it
                                        name="teacher-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers and release the port."""
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

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
            self._stats = {"requests": 0, "chat_requests": 0, "model_requests": 0, "faults": {k: 0 for k in FAULT_KINDS},
                           "responses": {}, "in_flight": 0, "max_in_flight": 0, "log": []}

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
            if self.faults and self._rng.random() < self.fault_rate:
                fault = self._rng.choice(self.faults)
                self._stats["faults"][fault] += 1
            s = self._stats
            s["in_flight"] += 1
            s["max_in_flight"] = max(s["max_in_flight"], s["in_flight"])
            entry = {"i": len(s["log"]), "t": time.monotonic(), "key": key, "fault": fault, "status": None, "auth": auth,
                     "structured": "response_format" in body, "logprobs": bool(body.get("logprobs"))}
            s["log"].append(entry)
            return entry

    def _leave_chat(self, entry: dict, status: int) -> None:
        with self._lock:
            self._stats["in_flight"] -= 1
            entry["status"] = status
            entry["t_done"] = time.monotonic()

    def _responded(self, status: int) -> None:
        with self._lock:
            self._stats["responses"][str(status)] = self._stats["responses"].get(str(status), 0) + 1

    # ---- grading -----------------------------------------------------------------------------
    def completion(self, body: dict, fault: str | None, number: int = 0) -> dict:
        """The chat.completion object for a request (faults that still answer 200 applied)."""
        prompt = "\n".join(_text(m.get("content")) for m in body.get("messages", []))
        grade = ({c: (s, f"Fixed grade {s} for {c}.") for c, s in self.fixed_scores.items()} if self.mode == "fixed"
                 else scripted_grade(prompt))
        fmt = body.get("response_format") or {}
        content = _json(grade, fmt) if fmt.get("type") in ("json_schema", "json_object") else _xml(grade)
        content = {"garbage": GARBAGE, "empty": ""}.get(fault, content)
        tokens = _TOKEN.findall(content)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        finish = "stop"
        if limit and len(tokens) > int(limit):
            tokens, finish = tokens[: int(limit)], "length"
            content = "".join(tokens)
        message = {"role": "assistant", "content": content}
        if self.reasoning_field:
            # A draft with different scores: a client that parses reasoning instead of content is caught.
            message[self.reasoning_field] = ("First impression: <answer><score>5</score><explanation>draft"
                                             "</explanation></answer>. Checking the final number carefully.")
        logprobs = {"content": _logprobs(tokens, int(body.get("top_logprobs") or 0))} if body.get("logprobs") else None
        words = len(prompt.split())
        return {"id": f"chatcmpl-{number}", "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}],
                "usage": {"prompt_tokens": words, "completion_tokens": len(tokens), "total_tokens": words + len(tokens)}}


def _text(content) -> str:
    if isinstance(content, list):  # content parts
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _error(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        self.app._responded(status)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("teacher-server: client went away before the response")

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0].rstrip("/")
        self.app._count(path)
        if path == "/stats":
            self._send(200, self.app.stats())
        elif path == "/v1/models" and self.app.models_endpoint:
            self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "teacher-server"} for m in self.app.models]})
        else:
            self._send(404, _error(f"no route {path}", "not_found"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        self.app._count(path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
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
        if app.refuse_logprobs and body.get("logprobs"):
            return self._send(400, _error("logprobs are not supported by this server", "invalid_request_error", "logprobs"))
        if app.refuse_max_tokens and "max_tokens" in body:
            return self._send(400, _error("Unsupported parameter: 'max_tokens' is not supported with this model. "
                                          "Use 'max_completion_tokens' instead.", "invalid_request_error", "max_tokens"))
        entry = app._enter_chat(body, self.headers.get("Authorization"))
        fault, status = entry["fault"], 200
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
        except Exception as exc:  # a bug in the fake must still answer, or the client hangs
            logger.exception("teacher-server: failed to build a response")
            status, payload, headers = 500, _error(f"teacher-server bug: {type(exc).__name__}", "server_error"), None
        # Leave before writing, so the next request a client sends after reading this answer is never
        # counted as overlapping with it (keeps max_in_flight exact).
        app._leave_chat(entry, status)
        self._send(status, payload, headers)


def main(argv: list[str] | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    p = argparse.ArgumentParser(description="Fault-injecting OpenAI-compatible teacher server (loopback only).")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--mode", choices=("scripted", "fixed"), default="scripted")
    for flag, kind, default in [("--fault-rate", float, 0.0), ("--seed", int, 0), ("--hang-s", float, 5.0),
                                ("--retry-after-s", float, 1.0), ("--latency-s", float, 0.0)]:
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--faults", default=",".join(FAULT_KINDS), help="comma list from " + ",".join(FAULT_KINDS))
    p.add_argument("--models", default="teacher", help="comma list of served model names")
    p.add_argument("--fixed-scores", default="", help="e.g. thought_process=7,answer=7,format=7")
    p.add_argument("--refuse-response-format", action="store_true")
    p.add_argument("--refuse-logprobs", action="store_true")
    p.add_argument("--reasoning-field", default=None, help="also return reasoning text in this message field")
    a = p.parse_args(argv)
    fixed = {k: int(v) for k, v in (kv.split("=") for kv in a.fixed_scores.split(",") if kv)} or None
    srv = TeacherServer(mode=a.mode, fault_rate=a.fault_rate, seed=a.seed, faults=tuple(f for f in a.faults.split(",") if f),
                        hang_s=a.hang_s, retry_after_s=a.retry_after_s, latency_s=a.latency_s,
                        models=tuple(a.models.split(",")), fixed_scores=fixed, refuse_response_format=a.refuse_response_format,
                        refuse_logprobs=a.refuse_logprobs, reasoning_field=a.reasoning_field, port=a.port)
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
