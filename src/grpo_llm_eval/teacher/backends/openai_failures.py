"""How the openai backend reads a failed call: its status, whether to retry and when, and which refused option
to switch off (a mixin of ``OpenAITeacher``; it uses the teacher's lock, stats, url and options)."""

from __future__ import annotations

import asyncio
import logging
import random

import openai

from grpo_llm_eval.teacher.backends.transport import retry_after_seconds

logger = logging.getLogger("grpo_llm_eval.teacher.backends.openai_backend")  # the backend's logger: one place to filter

# Statuses worth another attempt; anything else (a 400, a 404 model) will fail the same way again.
_RETRY_CODES = frozenset({408, 409, 429})
_MAX_RETRY_AFTER_S = 120.0  # a server asking for longer is treated as this, so a run cannot stall for hours
_BACKOFF_CAP_S = 30.0


class FailureHandling:
    """Failure classification, backoff and option fallback for ``OpenAITeacher``."""

    def _classify(self, exc: Exception) -> tuple[str, bool, float | None]:
        """(status, retryable, server-requested wait in seconds)."""
        if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
            return "timeout", True, None
        if isinstance(exc, openai.APIConnectionError):
            return "connection_error", True, None
        if isinstance(exc, openai.APIStatusError):
            code = exc.status_code
            wait = retry_after_seconds(exc.response.headers) if code in (429, 503) else None
            status = "rate_limited" if code == 429 else "http_error"
            return status, code in _RETRY_CODES or code >= 500, wait
        return "error", False, None

    def _replica_failure(self, exc: Exception) -> str | None:
        """What says the server itself is dead or broken (connection refused or dropped, a timeout, HTTP 5xx that
        is not a refused option), or None: a reason to take a replica out (endpoints.py)."""
        if isinstance(exc, (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError)):
            return "timeout"
        if isinstance(exc, openai.APIConnectionError):
            return "connection error"
        if isinstance(exc, openai.APIStatusError) and exc.status_code >= 500 and "validation error" not in str(exc).lower():
            return f"HTTP {exc.status_code}"
        return None

    def _delay(self, retry: int, wait: float | None) -> float:
        if wait is not None:
            # Never earlier than asked; a little jitter on top so a crowd of callers does not return at once.
            wait = min(wait, _MAX_RETRY_AFTER_S)
            return wait + random.uniform(0.0, 0.1 * wait + 0.05)
        backoff = min(_BACKOFF_CAP_S, self.backoff_base_s * 2 ** (retry - 1))
        return backoff * random.uniform(0.5, 1.0)

    def _fall_back(self, exc: Exception, structured: bool, logprobs: bool, fmt: str = "json_schema") -> bool:
        """Switch off an option the server refused; True when the call should be re-sent.

        A refusal is a 400/422 naming the option, or a 500 reporting a request "validation error" that names
        it (llama-cpp-python's server answers a request it cannot validate with 500).
        """
        refused = isinstance(exc, (openai.BadRequestError, openai.UnprocessableEntityError)) or (
            isinstance(exc, openai.InternalServerError) and "validation error" in str(exc).lower())
        if not refused:
            return False
        text = str(exc).lower()
        if "max_completion_tokens" in text and self._max_tokens_param == "max_tokens":
            # Newer OpenAI models reject max_tokens and name its replacement.
            logger.info("the teacher at %s wants max_completion_tokens instead of max_tokens; switching", self.url)
            with self._lock:
                self._max_tokens_param = "max_completion_tokens"
            return True
        if logprobs and "logprob" in text:
            return self._switch_off("logprobs", "logprob scores (top_logprobs)", exc)
        if structured and fmt == "json_schema" and ("response_format" in text or "json_schema" in text):
            with self._lock:
                first = self.structured_format == "json_schema"
                self.structured_format = "json_object"
            if first:
                logger.info("the teacher at %s refused response_format json_schema; asking for json_object with "
                            "the schema instead", self.url)
            return True
        if structured and any(w in text for w in ("response_format", "json_schema", "json_object", "structured",
                                                  "guided", "not supported", "unsupported")):
            return self._switch_off("structured", "structured output (response_format)", exc)
        return False

    def _switch_off(self, attr: str, what: str, exc: Exception) -> bool:
        with self._lock:
            first = getattr(self, attr)
            setattr(self, attr, False)
            if first:
                self.stats["fallbacks"].append(attr)
        if first:  # one warning per run, however many calls were refused at the same moment
            logger.warning("the teacher at %s refused %s (%s); continuing without it for the rest of the run",
                           self.url, what, self._redact(str(exc), 160))
        return True
