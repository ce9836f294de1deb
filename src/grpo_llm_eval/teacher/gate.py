"""What every teacher request passes just before it is sent: the budget, then requests and tokens per minute.

The concurrency slot is taken first (`limits.AdaptiveConcurrency`), so a request stamps the rate windows
when it really leaves, not while it waits for a slot: stamps taken early and sent late would bunch up at
the server and break its per-minute limit. Retries pass the gate again: they are requests too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from grpo_llm_eval.teacher.limits import MINUTE_S, SlidingWindow, estimate_tokens, per_process
from grpo_llm_eval.teacher.usage import UsageMeter


@dataclass
class Ticket:
    """One request let through: its (prompt, completion) token estimate and its place in the tokens-per-minute window."""

    estimate: tuple[int, int]
    rpm_entry: list | int | None = None
    tpm_entry: list | int | None = None
    rpm: object = None  # the windows the entries are in (they change once, to the run's shared windows)
    tpm: object = None


def cached_tokens(usage) -> int:
    """The prompt tokens a response's usage says were read from the server's prompt cache (0 when not reported):
    ``usage.prompt_tokens_details.cached_tokens`` (OpenAI, vLLM, llama.cpp's server and most hosted APIs)."""
    details = getattr(usage, "prompt_tokens_details", None)
    if isinstance(details, dict):
        return int(details.get("cached_tokens") or 0)
    return int(getattr(details, "cached_tokens", 0) or 0)


class CallGate:
    """Budget check and per-minute limits of one process (shared by all its event loops)."""

    def __init__(self, cfg, meter: UsageMeter, processes: int, window_s: float = MINUTE_S):
        self.meter = meter
        self.cfg, self.window_s = cfg, window_s
        self._shared = False
        meter.share = 1.0 / max(1, processes)
        self.rpm = SlidingWindow(per_process(cfg.teacher_rpm, processes), window_s, "requests") if cfg.teacher_rpm else None
        self.tpm = SlidingWindow(per_process(cfg.teacher_tpm, processes), window_s, "tokens") if cfg.teacher_tpm else None

    async def enter(self, messages: list[dict], max_tokens: int) -> Ticket:
        """Wait for the rate limits, then for room in the budget (raises usage.BudgetSpent); the request may go."""
        self._share_windows()
        ticket = Ticket(estimate_tokens(messages, max_tokens), rpm=self.rpm, tpm=self.tpm)
        try:
            if ticket.rpm is not None:
                ticket.rpm_entry = await ticket.rpm.acquire(1)
            if ticket.tpm is not None:
                ticket.tpm_entry = await ticket.tpm.acquire(sum(ticket.estimate))
            while not self.meter.admit(*ticket.estimate):  # after the waits: the budget may be spent meanwhile
                await asyncio.sleep(0.02)
        except BaseException:  # refused by the budget, or cancelled: not sent, but it took its place
            self._end_windows(ticket, None)
            raise
        return ticket

    def _share_windows(self) -> None:
        """Once the processes share the spend ledger (training; see JudgeSpend.on_train_begin), the per-minute
        limits hold for the run as a whole in that file, instead of limit / processes in each process: no
        process waits while the others leave their part unused, and a limit below the process count holds."""
        ledger = self.meter.ledger
        if self._shared or not self.meter.aggregate or ledger is None:
            return
        from grpo_llm_eval.teacher.spend_ledger import SharedWindow

        self._shared = True
        cfg = self.cfg
        if cfg.teacher_rpm:
            self.rpm = SharedWindow(ledger.path, "requests", cfg.teacher_rpm, self.window_s, ledger.session_start)
        if cfg.teacher_tpm:
            self.tpm = SharedWindow(ledger.path, "tokens", cfg.teacher_tpm, self.window_s, ledger.session_start)

    def _end_windows(self, ticket: Ticket, usage) -> None:
        if ticket.rpm_entry is not None:
            ticket.rpm.finish(ticket.rpm_entry)
        if ticket.tpm_entry is not None:
            used = None if usage is None else (usage.prompt_tokens or 0) + (usage.completion_tokens or 0)
            ticket.tpm.finish(ticket.tpm_entry, used)

    def leave(self, ticket: Ticket, usage) -> None:
        """Count the request (USAGE: the response's `usage`, or None when there was no answer)."""
        prompt = getattr(usage, "prompt_tokens", 0) or 0
        completion = getattr(usage, "completion_tokens", 0) or 0
        self.meter.add(1, prompt, completion, cached_tokens(usage))
        self.meter.release(*ticket.estimate)
        self._end_windows(ticket, usage)
