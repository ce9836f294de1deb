"""Limits on teacher calls besides the budget: requests and tokens per minute, and adaptive concurrency.

- `SlidingWindow`: at most `limit` units (requests, or tokens) in any window of `window_s` seconds. A
  sliding log rather than a token bucket, because a bucket lets through up to twice its rate in one window
  (a full bucket plus its refill), which is exactly what a server's per-minute limit answers with 429s.
  Thread-safe and loop-agnostic (callers sleep with asyncio), so one window serves every event loop of a
  process.
- `AdaptiveConcurrency`: the calls in flight of one event loop, at most the configured cap, cut when a
  call times out and grown again by one per round of successes (AIMD, as TCP does). A server that grades
  one request at a time (llama.cpp's) queues the rest; calls that time out in its queue are better not
  sent again into the same queue at the same width. The cut is to half, or lower, to the number of calls
  the server answered within the last timeout: that many it can answer in time, so a queueing server is
  matched in one step rather than after several rounds of timeouts (each of them a wasted call). It grows
  again only on calls answered within half the timeout, so it does not probe its way back into the queue.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time

logger = logging.getLogger(__name__)

MINUTE_S = 60.0
_POLL_S = 0.05  # how often a request waiting only for calls in flight looks again


class SlidingWindow:
    """At most LIMIT units in any WINDOW_S seconds; one request larger than LIMIT goes alone in an empty window.

    A request counts from the moment it is let through until WINDOW_S after it *ends* (`finish`): the server
    sees it arrive somewhere in between, later than it left when a connection is being set up, so counting
    from the send alone would let two windows' worth arrive within one window at the server. Counted this
    way, any WINDOW_S of arrivals at the server holds at most LIMIT, whatever the network delays.
    """

    def __init__(self, limit: float, window_s: float = MINUTE_S, name: str = "requests"):
        self.limit = float(limit)
        self.window_s = float(window_s)
        self.name = name
        self._entries: list[list] = []  # [end time, or inf while in flight; amount]
        self._lock = threading.Lock()

    def _try(self, amount: float) -> tuple[float, list | None]:
        """Take AMOUNT now: (0, its entry); or (seconds to wait before trying again, None)."""
        with self._lock:
            now = time.monotonic()
            self._entries = [e for e in self._entries if e[0] > now - self.window_s]
            used = sum(e[1] for e in self._entries)
            if used + amount <= self.limit or not self._entries:
                entry = [math.inf, float(amount)]
                self._entries.append(entry)
                return 0.0, entry
            # Wait until enough ended entries leave the window; entries in flight leave only after they end.
            need, freed = used + amount - self.limit, 0.0
            for end, size in sorted(e for e in self._entries if e[0] < math.inf):
                freed += size
                if freed >= need:
                    return max(1e-3, end + self.window_s - now), None
            return _POLL_S, None

    async def acquire(self, amount: float = 1.0) -> list:
        """Wait until AMOUNT fits in the window and take it; returns its entry (for `finish`)."""
        while True:
            wait, entry = self._try(amount)
            if entry is not None:
                return entry
            await asyncio.sleep(wait)

    def finish(self, entry: list, amount: float | None = None) -> None:
        """The request of ENTRY has ended; AMOUNT: its real size, when known (tokens: the usage, not the estimate)."""
        with self._lock:
            entry[0] = time.monotonic()
            if amount is not None:
                entry[1] = float(amount)


class AdaptiveConcurrency:
    """Calls in flight on one event loop: at most `cap`; cut on a timeout, +1 per `limit` quick successes (module doc).

    A timeout lowers the limit only for a call sent after the last decrease: the calls that were already
    queued when the server fell behind time out together and say nothing new. TIMEOUT_S: the calls' timeout.
    """

    def __init__(self, cap: int, adaptive: bool = True, where: str = "the teacher", timeout_s: float | None = None):
        self.cap = max(1, int(cap))
        self.adaptive = adaptive
        self.where = where
        self.timeout_s = timeout_s
        self._answered: collections.deque[float] = collections.deque(maxlen=self.cap * 4)  # times of ok calls
        self.limit = float(self.cap)
        self.in_flight = 0
        self.max_in_flight = 0
        self.decreases = 0
        self._last_cut = float("-inf")
        self._cond = asyncio.Condition()

    async def acquire(self) -> float:
        """Wait for a free slot; returns the monotonic time the call was admitted (pass it to `release`)."""
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < int(self.limit))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return time.monotonic()

    def _roomy(self, latency_s: float) -> bool:
        """Whether a call came back well within the timeout (half of it): only then is there room to grow. A call
        that waited most of the timeout in a queue says one more in flight would time out."""
        return self.timeout_s is None or latency_s < self.timeout_s / 2

    async def release(self, admitted: float, outcome: str) -> None:
        """Free the slot of a call admitted at ADMITTED that ended with OUTCOME ("ok", "timeout" or other)."""
        # Bookkeeping before any await (one loop: nothing interleaves), so a cancellation cannot leak the slot.
        self.in_flight -= 1
        now = time.monotonic()
        if outcome == "ok":
            self._answered.append(now)
        if self.adaptive and outcome == "timeout" and admitted > self._last_cut:
            in_time = sum(1 for t in self._answered if t > now - self.timeout_s) if self.timeout_s else self.cap
            old, self.limit = self.limit, max(1.0, min(self.limit / 2, float(in_time)))
            self._last_cut = now
            self.decreases += 1
            if int(old) != int(self.limit):
                logger.info("calls to %s time out: lowering the calls in flight from %d to %d", self.where,
                            int(old), int(self.limit))
        elif self.adaptive and outcome == "ok" and self.limit < self.cap and self._roomy(now - admitted):
            self.limit = min(float(self.cap), self.limit + 1.0 / self.limit)
        async with self._cond:
            self._cond.notify_all()


def process_count() -> int:
    """Processes of this run: accelerate's count once its state is set up, else the launcher's WORLD_SIZE, else 1.

    Never sets accelerate's state up itself: a bare PartialState() would fix the device choice before
    the Trainer makes it (on CPU it would not even join the launched processes into one group).
    """
    from accelerate import PartialState

    if PartialState._shared_state:  # set up (transformers checks the same way)
        return PartialState().num_processes
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def per_process(limit: float, processes: int) -> float:
    """This process's part of a run-wide per-minute limit: LIMIT / PROCESSES, at least 1 (so never stuck).

    >>> per_process(100, 3)
    33.333333333333336
    """
    return max(1.0, limit / max(1, processes))


def estimate_tokens(messages: list[dict], max_tokens: int) -> tuple[int, int]:
    """(prompt, completion) tokens a call may use, before its usage is known: about 4 characters per prompt
    token (and a few per message), and the reply's cap.

    >>> estimate_tokens([{"role": "user", "content": "x" * 400}], 64)
    (108, 64)
    """
    chars = sum(len(str(m.get("content") or "")) for m in messages)
    return chars // 4 + 8 * len(messages), int(max_tokens)
