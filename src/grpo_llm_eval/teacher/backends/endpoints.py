"""Several replicas of one teacher behind `openai_base_url` (a list): which one a call goes to, and which are out.

A call goes to the healthy replica with the fewest calls in flight (ties: the one that has had fewest calls).
A replica whose call fails as a dead or broken server fails (connection refused or dropped, a timeout, HTTP 5xx)
is taken out at once, and the call is sent again to another replica without waiting and without using up one
of its retries (see ``OpenAITeacher._call``): a dead replica costs its in-flight calls one more request each,
never a grade. A replica that is out is probed back in with `GET /models`, first `probe_s` after it went out,
then at doubling intervals up to `PROBE_CAP_S`; the probe is not a chat call, so it costs nothing. With one
URL nothing is ever taken out: the call's own retries (with backoff) are all there is, as before.

Thread-safe: the teacher may grade from several event loops; the counts here are the process's, over all of
them. The rate limits and budgets are not per replica: the gate (gate.py) sits before the choice of replica.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from grpo_llm_eval.teacher.backends.transport import display_url, split_credentials

logger = logging.getLogger("grpo_llm_eval.teacher.backends.openai_backend")  # the backend's logger: one place to filter

PROBE_CAP_S = 30.0


def base_urls(value) -> list[str]:
    """`openai_base_url` as a list: a string is one URL (empty: the openai library's default, ``[""]``).

    >>> base_urls("http://a/v1"), base_urls(["http://a/v1", "http://b/v1"]), base_urls("")
    (['http://a/v1'], ['http://a/v1', 'http://b/v1'], [''])
    """
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value] or [""]
    return [str(value or "").strip()]


@dataclass
class Endpoint:
    """One replica: its URL without credentials, its headers (credentials as Basic auth), and its health."""

    index: int
    base_url: str | None  # None: the openai library's default (OPENAI_BASE_URL or api.openai.com)
    headers: dict = field(default_factory=dict)
    shown: str = ""
    in_flight: int = 0
    calls: int = 0
    down: bool = False
    probing: bool = False
    next_probe: float = 0.0
    probe_wait_s: float = 0.0
    reason: str = ""


class EndpointPool:
    """The replicas of one teacher, least-loaded choice, taking out and probing back in (module doc)."""

    def __init__(self, urls: list[str], default_url: str, probe_s: float = 1.0):
        self.endpoints = []
        for i, url in enumerate(urls):
            base, headers = split_credentials(url) if url else (None, {})
            self.endpoints.append(Endpoint(i, base, headers, display_url(base or default_url)))
        self.probe_s = probe_s
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.endpoints)

    def where(self, ep: Endpoint) -> str:
        """How messages name a replica: 'the teacher at URL', or 'teacher replica 2 of 3 at URL'."""
        if len(self.endpoints) == 1:
            return f"the teacher at {ep.shown}"
        return f"teacher replica {ep.index + 1} of {len(self.endpoints)} at {ep.shown}"

    def pick(self, tried: set[int]) -> Endpoint:
        """The replica for the next request and count it in flight (release with `done`): the least loaded healthy
        one not yet TRIED by this call; else any healthy one; else, all out, the one due to be probed first."""
        with self._lock:
            healthy = [e for e in self.endpoints if not e.down]
            fresh = [e for e in healthy if e.index not in tried]
            pool = fresh or healthy
            if pool:
                ep = min(pool, key=lambda e: (e.in_flight, e.calls, e.index))
            else:
                ep = min(self.endpoints, key=lambda e: (e.next_probe, e.index))
            ep.in_flight += 1
            ep.calls += 1
            return ep

    def done(self, ep: Endpoint) -> None:
        with self._lock:
            ep.in_flight -= 1

    def has_other(self, tried: set[int]) -> bool:
        """Whether a healthy replica is left that this call has not tried (where a failover can go now)."""
        with self._lock:
            return any(not e.down and e.index not in tried for e in self.endpoints)

    def take_out(self, ep: Endpoint, reason: str) -> None:
        """Take EP out after a failure saying it is dead or broken (never with a single replica)."""
        if len(self.endpoints) == 1:
            return
        with self._lock:
            if ep.down:
                return
            ep.down, ep.reason = True, reason
            ep.probe_wait_s = self.probe_s
            ep.next_probe = time.monotonic() + self.probe_s
            left = sum(not e.down for e in self.endpoints)
        logger.warning("%s failed (%s): taking it out, its calls go to the other %d healthy replica(s); probing "
                       "it back in every %.3g s or more", self.where(ep), reason, left, self.probe_s)

    def due_probes(self) -> list[Endpoint]:
        """Replicas that are out and due for a probe, each marked as being probed (report with `probed`)."""
        now = time.monotonic()
        with self._lock:
            due = [e for e in self.endpoints if e.down and not e.probing and e.next_probe <= now]
            for e in due:
                e.probing = True
            return due

    def probed(self, ep: Endpoint, alive: bool) -> None:
        """The outcome of a probe of EP: back in, or out for twice as long before the next probe."""
        with self._lock:
            ep.probing = False
            if alive:
                ep.down = False
            else:
                ep.probe_wait_s = min(PROBE_CAP_S, ep.probe_wait_s * 2)
                ep.next_probe = time.monotonic() + ep.probe_wait_s
        if alive:
            logger.warning("%s answers again: back in", self.where(ep))

    def calls_by_endpoint(self) -> list[int]:
        """Requests sent to each replica so far (this process), in the order of openai_base_url."""
        with self._lock:
            return [e.calls for e in self.endpoints]
