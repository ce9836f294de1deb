"""Teacher backend for any OpenAI-compatible server (OpenAI, vLLM, ollama, llama.cpp, ...).

Built on the official `openai.AsyncOpenAI` client with its own retries off (`max_retries=0`), because we
retry ourselves: that lets us honour `Retry-After` on 429/503, count retries for metrics, and turn the
final failure into a Judgement status instead of an exception. A completion that parses badly is NOT
re-asked: at the usual temperature 0 the server would answer the same text again, and it costs money.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

import openai

from grpo_llm_eval.teacher.backends.endpoints import Endpoint, EndpointPool, base_urls
from grpo_llm_eval.teacher.backends.openai_failures import FailureHandling
from grpo_llm_eval.teacher.backends.transport import display_url, retry_after_seconds, split_credentials  # noqa: F401 (tests import it from here)
from grpo_llm_eval.teacher.gate import CallGate
from grpo_llm_eval.teacher.grading.completion import TruncationCheck, judgement_from_completion
from grpo_llm_eval.teacher.grading.group_grading import failed_group, group_judgements, split_usage
from grpo_llm_eval.teacher.grading.group_prompt import GroupPrompt
from grpo_llm_eval.teacher.limits import AdaptiveConcurrency, process_count
from grpo_llm_eval.teacher.types import GroupCall, Judgement, JudgeRequest, TeacherUnavailable
from grpo_llm_eval.teacher.usage import BudgetSpent, UsageMeter

logger = logging.getLogger(__name__)

TOP_LOGPROBS = 20
# The health check's probe of what the server accepts (answered with one token).
PROBE = JudgeRequest("What is 1 + 1?", "<think>1 + 1 = 2</think> 2", "2")


@dataclass
class _LoopState:
    clients: list[openai.AsyncOpenAI]  # one per replica, in the order of openai_base_url
    slots: AdaptiveConcurrency
    closer: object = None
    probes: set = field(default_factory=set)  # probe tasks of replicas that are out (endpoints.py)


async def _close_at_loop_shutdown(clients: list[openai.AsyncOpenAI]):
    """Closes `client` when its loop finalizes async generators (asyncio.run does, before closing).

    A client left open past its loop is closed later by the openai library's __del__ in whatever loop
    runs then, where its sockets do not belong, which logs "Event loop is closed" errors.
    """
    try:
        yield
    finally:
        for client in clients:
            await client.close()


class OpenAITeacher(FailureHandling):
    """Grades through an OpenAI-compatible chat completions endpoint; see the module doc.

    `stats` holds counters for metrics: calls, attempts, retries, ok, failures by status, latency_s_total,
    fallbacks, failovers (calls sent again to another replica). Tokens are counted once, by the usage meter (`usage`, teacher/usage.py).
    """

    def __init__(self, cfg, rubric, backoff_base_s: float = 0.5, num_processes: int | None = None,
                 rate_window_s: float = 60.0, probe_s: float = 1.0):
        self.cfg = cfg
        self.rubric = rubric
        self.group_prompt = GroupPrompt(rubric)
        self.model = cfg.teacher_model_name
        self.max_retries = cfg.teacher_max_retries
        # 0 means "no timeout", as config validation allows 0.
        self.timeout_s = cfg.teacher_timeout_s if cfg.teacher_timeout_s > 0 else None
        self.backoff_base_s = backoff_base_s
        self.structured = cfg.teacher_structured_output
        # How structured output is asked for: OpenAI's json_schema first; servers that refuse it may take
        # {"type": "json_object", "schema": ...} (llama-cpp-python's server, Anyscale); then none.
        self.structured_format = "json_schema"
        self.logprobs = cfg.teacher_logprob_scores
        self._max_tokens_param = "max_tokens"
        self._truncation = TruncationCheck(rubric, cfg.max_feedback_new_tokens)
        # Local servers ignore the key but the client insists on one; never log or store it elsewhere.
        self._api_key = os.environ.get("OPENAI_API_KEY") or "EMPTY"
        urls = base_urls(cfg.openai_base_url)
        # The replicas (one, usually); probe_s: how soon a replica taken out is first probed (shorter in tests).
        self.endpoints = EndpointPool(urls, os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1", probe_s)
        self._secrets = [v for v in (urllib.parse.urlsplit(u).password for u in urls) if v]
        # None: the run's process count, read when the first loop state is made (see concurrency_per_process).
        self.num_processes = num_processes
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}
        self._lock = threading.Lock()
        self.usage = UsageMeter.from_config(cfg)  # every request sent, for metrics and budgets (usage.py)
        if len(self.endpoints) > 1:
            self.usage.endpoint_calls = [0] * len(self.endpoints)
        self.rate_window_s = rate_window_s  # per-minute limits' window; shorter only in tests
        self._gate: CallGate | None = None
        self.stats = {"calls": 0, "attempts": 0, "retries": 0, "ok": 0, "failures": {}, "latency_s_total": 0.0,
                      "fallbacks": [], "failovers": 0}

    # ---- per-event-loop client and concurrency cap ---------------------------------------------
    @property
    def concurrency_per_process(self) -> int:
        """This process's share of teacher_max_concurrency: ceil(cap / processes), so that the processes of a
        multi-GPU run together keep about cap calls in flight (at most processes - 1 more), not cap each."""
        processes = self.num_processes if self.num_processes is not None else process_count()
        return max(1, math.ceil(self.cfg.teacher_max_concurrency / max(1, processes)))

    async def _state(self) -> _LoopState:
        """Client and concurrency slots of the running loop; asyncio objects must not cross loops."""
        loop = asyncio.get_running_loop()
        with self._lock:
            for old in [lp for lp in self._states if lp.is_closed()]:
                del self._states[old]  # closed at that loop's shutdown (see _close_at_loop_shutdown)
            state = self._states.get(loop)
            created = state is None
            if created:
                clients = [openai.AsyncOpenAI(api_key=self._api_key, base_url=ep.base_url, timeout=self.timeout_s,
                                              max_retries=0, default_headers=ep.headers or None)
                           for ep in self.endpoints.endpoints]
                slots = AdaptiveConcurrency(self.concurrency_per_process, self.cfg.teacher_adaptive_concurrency,
                                            f"the teacher at {self.url}", self.timeout_s)
                state = self._states[loop] = _LoopState(clients, slots, _close_at_loop_shutdown(clients))
            if self._gate is None:
                processes = self.num_processes if self.num_processes is not None else process_count()
                self._gate = CallGate(self.cfg, self.usage, processes, self.rate_window_s)
        if created:
            await state.closer.__anext__()  # registers the generator with this loop
        return state

    @property
    def url(self) -> str:
        """The server's base URL as shown in messages (credentials stripped); with replicas, all of them."""
        shown = [ep.shown for ep in self.endpoints.endpoints]
        return shown[0] if len(shown) == 1 else f"{len(shown)} replicas ({', '.join(shown)})"

    def _redact(self, text: str, limit: int = 300) -> str:
        """Short error text that cannot carry the API key or a bearer token."""
        if self._api_key and self._api_key != "EMPTY":
            text = text.replace(self._api_key, "***")
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
        text = re.sub(r"\bsk-[A-Za-z0-9_\-]{8,}", "sk-***", text)
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def _bump(self, key: str, by: float = 1) -> None:
        with self._lock:  # judge() may run on loops in several threads
            self.stats[key] += by

    # ---- public API ------------------------------------------------------------------------------
    async def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """Grade all requests concurrently (at most `concurrency_per_process` in flight); results in order.

        Never raises for a failed request: it comes back as a Judgement with a failure status.
        """
        state = await self._state()
        return list(await asyncio.gather(*(self._judge_one(state, r) for r in requests)))

    async def judge_group(self, calls: list[GroupCall]) -> list[list[Judgement]]:
        """Grade each call's responses in ONE teacher call (``judge_mode: group``), the calls concurrently.

        Per call, one Judgement per response in presentation order (see ``group_grading.group_judgements``); a
        failed call fails each of its responses with its status. Retries and fallbacks as for ``judge``. The call
        may write up to group size x max_feedback_new_tokens; scores are parsed (logprob scores are pointwise only).
        """
        state = await self._state()
        return list(await asyncio.gather(*(self._judge_group_one(state, c) for c in calls)))

    async def health_check(self) -> None:
        """Fail fast with TeacherUnavailable if a replica is unreachable or does not serve the model (the message
        names the replica: a wrong URL in the list is a config mistake, better fixed than run around)."""
        state = await self._state()
        for ep in self.endpoints.endpoints:
            await self._check_endpoint(state, ep)
        await self._learn_options(state)

    async def _check_endpoint(self, state: _LoopState, ep: Endpoint) -> None:
        timeout = min(10.0, self.timeout_s or 10.0)
        where = self.endpoints.where(ep)
        fix = "start the server or fix openai_base_url" + (" (or drop it from the list)" if len(self.endpoints) > 1 else "")
        try:
            page = await state.clients[ep.index].models.list(timeout=timeout)
        except openai.NotFoundError:
            logger.warning("%s has no /models endpoint; cannot check that it serves %r", where, self.model)
            return
        except openai.APIConnectionError as exc:
            raise TeacherUnavailable(f"cannot reach {where}: {self._redact(str(exc))}; {fix}") from None
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise TeacherUnavailable(f"{where} refused the API key (HTTP {exc.status_code}); set OPENAI_API_KEY"
                                     + (" or put user:password@ in its URL" if len(self.endpoints) > 1 else "")) from None
        except openai.APIStatusError as exc:
            raise TeacherUnavailable(f"{where} answered HTTP {exc.status_code} to GET /models: "
                                     f"{self._redact(str(exc))}") from None
        served = [m.id for m in page.data]
        if self.model not in served:
            server = where.replace("the teacher at", "the server at", 1)
            raise TeacherUnavailable(f"{server} does not serve {self.model!r}; it serves: "
                                     f"{', '.join(served) or '(nothing)'}; set teacher_model_name to one of them")

    async def _learn_options(self, state: _LoopState) -> None:
        """Find out once, with one-token requests, which of structured output and logprobs the server takes, so
        that the first batch is not sent with an option that every one of its calls would have refused."""
        for _ in range(4):  # each refusal switches one option off or to its next form
            structured, logprobs, fmt = self.structured, self.logprobs, self.structured_format
            if not (structured or logprobs):
                return
            try:
                messages, response_format = self._pointwise(PROBE, structured, fmt)
                await self._send(state, messages, response_format, logprobs, max_tokens=1)
                return
            except Exception as exc:  # anything but a refusal is the batch's business, not the probe's
                if not self._fall_back(exc, structured, logprobs, fmt):
                    logger.debug("probing the teacher's options failed: %s", self._redact(str(exc), 160))
                    return

    async def aclose(self) -> None:
        """Close the client of the running loop and forget the others (their loops own their sockets)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            states, self._states = self._states, {}
        if loop in states:
            await states[loop].closer.aclose()  # runs its finally: closes the client

    # ---- one request -----------------------------------------------------------------------------
    async def _judge_one(self, state: _LoopState, req: JudgeRequest) -> Judgement:
        rubric = self.rubric.for_items(req.rubric)
        return await self._call(state, lambda structured, fmt: self._pointwise(req, structured, fmt),
                                self.cfg.max_feedback_new_tokens, True,
                                lambda *args: self._finish(*args, rubric=rubric),
                                lambda *args: self._failed(*args, names=rubric.names))

    async def _judge_group_one(self, state: _LoopState, call: GroupCall) -> list[Judgement]:
        rubric = self.rubric.for_items(call.rubric)
        group = self.group_prompt if rubric is self.rubric else GroupPrompt(rubric)
        n, names = len(call.responses), rubric.names
        max_tokens = n * self.cfg.max_feedback_new_tokens

        def request_for(structured: bool, fmt: str) -> tuple[list[dict], dict | None]:
            messages = group.messages(call.question, call.ground_truth, call.responses, json_mode=structured)
            if not structured:
                return messages, None
            chars = max(1, rubric.explanation_chars_within(self.cfg.max_feedback_new_tokens))
            return messages, (group.response_format(n) if fmt == "json_schema"
                              else {"type": "json_object", "schema": group.json_schema(n, max_explanation_chars=chars)})

        def finish(completion, _logprobs, start: float, attempts: int, _structured) -> list[Judgement]:
            latency, usage = time.monotonic() - start, getattr(completion, "usage", None)
            prompt, made = getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0
            if not completion.choices:
                out = failed_group(call, names, "empty", "the teacher returned no choices", latency, attempts,
                                   split_usage(attempts, prompt, made, n))
            else:
                choice = completion.choices[0]
                out = group_judgements(group, call, choice.message.content, latency, attempts, prompt, made,
                                       choice.finish_reason, max_tokens)
            return [self._record(j) for j in out]

        def fail(status: str, exc: Exception, start: float, attempts: int) -> list[Judgement]:
            first = self._failed(status, exc, start, attempts, names=names)
            out = failed_group(call, names, first.status, first.error, first.latency_s, attempts)
            return [out[0], *(self._record(j) for j in out[1:])]

        return await self._call(state, request_for, max_tokens, False, finish, fail)

    def _pointwise(self, req: JudgeRequest, structured: bool, fmt: str) -> tuple[list[dict], dict | None]:
        rubric = self.rubric.for_items(req.rubric)  # the example's own items, if it has them
        messages = rubric.messages(req.question, req.response, req.ground_truth, json_mode=structured)
        if not structured:
            return messages, None
        return messages, (rubric.response_format() if fmt == "json_schema"
                          else {"type": "json_object", "schema": self._grammar_schema(rubric)})

    async def _call(self, state: _LoopState, request_for, max_tokens: int, logprobs_ok: bool, finish, fail):
        """One teacher call with retries: `request_for(structured, fmt)` -> (messages, response_format), then
        `finish(completion, logprobs, start, attempts, structured)` or `fail(status, exc, start, attempts)`."""
        start, attempts, retries = time.monotonic(), 0, 0
        tried: set[int] = set()  # replicas this call was sent to
        self._bump("calls")
        while True:
            structured, logprobs, fmt = self.structured, self.logprobs and logprobs_ok, self.structured_format
            attempts += 1
            self._bump("attempts")
            try:
                messages, response_format = request_for(structured, fmt)
                completion = await self._send(state, messages, response_format, logprobs, max_tokens, tried)
                return finish(completion, logprobs, start, attempts, structured)
            except BudgetSpent as exc:
                return fail("budget_spent", exc, start, attempts)
            except Exception as exc:  # every failure becomes a status; CancelledError still propagates
                if self._fall_back(exc, structured, logprobs, fmt):
                    continue  # a refused option is not the server's fault: retry plainly, free of charge
                status, retryable, wait = self._classify(exc)
                if self._replica_failure(exc) and self.endpoints.has_other(tried):
                    self._bump("failovers")  # another replica takes it now: no backoff, no retry used up
                    logger.debug("teacher call failed (%s); sending it to another replica", status)
                    continue
                if retryable and retries < self.max_retries:
                    retries += 1
                    self._bump("retries")
                    delay = self._delay(retries, wait)
                    logger.debug("teacher call failed (%s: %s); retry %d/%d in %.2fs", status,
                                 self._redact(str(exc), 120), retries, self.max_retries, delay)
                    await asyncio.sleep(delay)  # outside the concurrency slot, so other calls proceed
                    continue
                return fail(status, exc, start, attempts)

    async def _send(self, state: _LoopState, messages: list[dict], response_format: dict | None, logprobs: bool,
                    max_tokens: int, tried: set[int] | None = None):
        """One request through the concurrency slot, the gate (budget, per-minute limits) and the usage meter, to
        the least-loaded healthy replica (endpoints.py); TRIED gets the replica's index. A replica that fails as
        a dead server does is taken out here."""
        admitted = await state.slots.acquire()
        outcome, completion, ticket, ep = "error", None, None, None
        try:
            ticket = await self._gate.enter(messages, max_tokens)
            ep = self.endpoints.pick(tried or set())
            self._probe_due(state)
            if tried is not None:
                tried.add(ep.index)
            self.usage.add_endpoint_call(ep.index)
            completion = await self._create(state.clients[ep.index], messages, response_format, logprobs, max_tokens)
            outcome = "ok"
            return completion
        except Exception as exc:
            outcome = self._classify(exc)[0]
            reason = self._replica_failure(exc)
            if ep is not None and reason:
                self.endpoints.take_out(ep, reason)
            raise
        finally:
            if ep is not None:
                self.endpoints.done(ep)
            if ticket is not None:
                self._gate.leave(ticket, getattr(completion, "usage", None))
            await state.slots.release(admitted, outcome)

    def _probe_due(self, state: _LoopState) -> None:
        """Start a probe (GET /models, not billed) of each replica that is out and due for one."""
        for ep in self.endpoints.due_probes():
            task = asyncio.get_running_loop().create_task(self._probe(state, ep))
            state.probes.add(task)  # a task nobody holds may be collected mid-flight
            task.add_done_callback(state.probes.discard)

    async def _probe(self, state: _LoopState, ep: Endpoint) -> None:
        alive = False
        try:
            await state.clients[ep.index].models.list(timeout=min(5.0, self.timeout_s or 5.0))
            alive = True
        except openai.APIStatusError as exc:  # it answers: only a 5xx says it is still broken
            alive = exc.status_code < 500
        except Exception as exc:  # unreachable, timed out
            logger.debug("probe of %s failed: %s", self.endpoints.where(ep), self._redact(str(exc), 120))
        finally:  # also when cancelled (the loop ends): the next loop probes it again
            self.endpoints.probed(ep, alive)

    async def _create(self, client: openai.AsyncOpenAI, messages: list[dict], response_format: dict | None,
                      logprobs: bool, max_tokens: int):
        kwargs = {"model": self.model, "temperature": self.cfg.teacher_temperature, "messages": messages,
                  self._max_tokens_param: max_tokens}
        if response_format is not None:
            kwargs["response_format"] = response_format
        if logprobs:
            kwargs.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        call = client.chat.completions.create(**kwargs)
        if self.timeout_s is None:
            return await call
        # httpx's timeout is per read; a server trickling bytes would never trip it, so also bound the whole call.
        return await asyncio.wait_for(call, self.timeout_s + 1.0)

    def _grammar_schema(self, rubric) -> dict:
        """The schema for a grammar engine, explanations bounded so a grade fits in max_feedback_new_tokens."""
        chars = rubric.explanation_chars_within(self.cfg.max_feedback_new_tokens)
        return rubric.json_schema(max_explanation_chars=max(1, chars))

    def _finish(self, completion, logprobs: bool, start: float, attempts: int, structured: bool = False,
                rubric=None) -> Judgement:
        rubric = rubric or self.rubric
        latency = time.monotonic() - start
        usage = getattr(completion, "usage", None)
        if not completion.choices:
            return self._record(Judgement.failed("empty", rubric.names, "the teacher returned no choices",
                                                 latency_s=latency, attempts=attempts))
        choice = completion.choices[0]
        message = choice.message
        reasoning = getattr(message, "reasoning_content", None) or getattr(message, "reasoning", None)
        tokens = None
        if logprobs and choice.logprobs is not None and choice.logprobs.content:
            tokens = [t.model_dump() for t in choice.logprobs.content]
        judgement = judgement_from_completion(
            rubric, message.content, reasoning if isinstance(reasoning, str) else None, tokens, logprobs,
            self.cfg.think_open_string, self.cfg.think_close_string, latency, attempts)
        judgement.extra["finish_reason"] = choice.finish_reason
        judgement.extra["usage"] = {"calls": attempts, "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                                    "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}
        return self._record(self._truncation.apply(judgement, choice.finish_reason, structured))

    def _failed(self, status: str, exc: Exception, start: float, attempts: int, names=None) -> Judgement:
        error = self._redact(f"{type(exc).__name__}: {exc}")
        if status == "error":  # not a transport failure: likely a bug, so say so loudly (without a traceback,
            logger.warning("unexpected error while grading: %s", error)  # whose text we cannot redact)
        return self._record(Judgement.failed(status, names or self.rubric.names, error,
                                             latency_s=time.monotonic() - start, attempts=attempts))

    def _record(self, judgement: Judgement) -> Judgement:
        with self._lock:
            self.stats["latency_s_total"] += judgement.latency_s
            if judgement.ok:
                self.stats["ok"] += 1
            else:
                failures = self.stats["failures"]
                failures[judgement.status] = failures.get(judgement.status, 0) + 1
        return judgement
