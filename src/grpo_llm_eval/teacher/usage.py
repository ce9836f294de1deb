"""What the teacher costs: calls, prompt and completion tokens, their price, and the run's budgets on them.

Counted per call (every request sent, retries and refused options included; a cached grade sends none),
so a call that grades several completions at once counts once. Backends add to a `UsageMeter`; the
trainer reads its totals at each step end (summed over processes), writes them to metrics.jsonl and
stops the run when a budget is spent. The meter also refuses new calls once the budget is spent, so the
calls of batches judged ahead cannot run far past it: during training it reads the whole run's spend from
the spend ledger (spend_ledger.py) that every process writes, elsewhere this process's share.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

# Metric names, per step and as run totals.
USAGE_KEYS = ("calls", "prompt_tokens", "completion_tokens", "cached_prompt_tokens")


@dataclass(frozen=True)
class Usage:
    """Counts of teacher calls and tokens; `cached_prompt_tokens` is the part of `prompt_tokens` the server
    reported as read from its prompt cache (``usage.prompt_tokens_details.cached_tokens``).

    >>> Usage(2, 300, 40) + Usage(1, 100, 10, 64)
    Usage(calls=3, prompt_tokens=400, completion_tokens=50, cached_prompt_tokens=64)
    """

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*(a - b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, int, int, int]:
        return self.calls, self.prompt_tokens, self.completion_tokens, self.cached_prompt_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Usage:
        data = data or {}
        return cls(*(int(data.get(k, 0) or 0) for k in USAGE_KEYS))


@dataclass(frozen=True)
class Prices:
    """US dollars per million input (prompt) and output (completion) tokens; both 0: not priced. Cached prompt
    tokens cost `cached_input_per_mtok`; None: the input price (what a bill without a cache discount says)."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    cached_input_per_mtok: float | None = None

    @property
    def priced(self) -> bool:
        return self.input_per_mtok > 0 or self.output_per_mtok > 0

    def cost_usd(self, usage: Usage) -> float:
        """
        >>> round(Prices(0.5, 1.5).cost_usd(Usage(1, 2_000_000, 1_000_000)), 6)
        2.5
        >>> round(Prices(0.5, 1.5, 0.125).cost_usd(Usage(1, 2_000_000, 1_000_000, 1_000_000)), 6)  # half cached
        2.125
        """
        cached = min(usage.cached_prompt_tokens, usage.prompt_tokens)
        cached_price = self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        return ((usage.prompt_tokens - cached) * self.input_per_mtok + cached * cached_price
                + usage.completion_tokens * self.output_per_mtok) / 1e6


@dataclass(frozen=True)
class Budgets:
    """The run's limits on teacher spend; 0: off."""

    max_total_tokens: int = 0
    max_cost_usd: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> Budgets:
        return cls(cfg.teacher_max_total_tokens, cfg.teacher_max_cost_usd)

    def spent(self, usage: Usage, prices: Prices, share: float = 1.0) -> str | None:
        """Which budget USAGE has reached (a line naming it), or None. SHARE: this process's part of each budget."""
        if self.max_total_tokens > 0 and usage.total_tokens >= self.max_total_tokens * share:
            return (f"teacher_max_total_tokens ({self.max_total_tokens:,} tokens) spent: "
                    f"{usage.total_tokens:,} tokens in {usage.calls:,} calls")
        if self.max_cost_usd > 0 and prices.priced and prices.cost_usd(usage) >= self.max_cost_usd * share:
            return (f"teacher_max_cost_usd (${self.max_cost_usd:.4g}) spent: ${prices.cost_usd(usage):.4g} in "
                    f"{usage.calls:,} calls")
        return None


def usage_metrics(usage: Usage, prices: Prices, prefix: str) -> dict[str, float]:
    """{prefix}calls, {prefix}prompt_tokens, {prefix}completion_tokens, {prefix}cached_prompt_tokens, and
    {prefix}cost_usd when priced."""
    out = {f"{prefix}{k}": float(v) for k, v in zip(USAGE_KEYS, usage.as_tuple(), strict=True)}
    if prices.priced:
        out[f"{prefix}cost_usd"] = prices.cost_usd(usage)
    return out


def describe(usage: Usage, prices: Prices) -> str:
    """One line for people: calls, tokens and, when priced, dollars."""
    text = (f"{usage.calls:,} teacher calls, {usage.prompt_tokens:,} prompt + {usage.completion_tokens:,} "
            f"completion tokens")
    if usage.cached_prompt_tokens:
        text += f" ({usage.cached_prompt_tokens / max(1, usage.prompt_tokens):.0%} of the prompt tokens cached)"
    return text + (f", ${prices.cost_usd(usage):.4f}" if prices.priced else "")


def usage_summary(meter: UsageMeter) -> dict:
    """A meter's totals as plain data (for eval_summary.json and the `judge` summary), with `text` for people."""
    usage = meter.usage
    out = {**usage.to_dict(), "text": describe(usage, meter.prices)}
    if meter.prices.priced:
        out["cost_usd"] = meter.prices.cost_usd(usage)
    return out


class BudgetSpent(Exception):
    """Raised by `UsageMeter.check` when this process's share of a budget is spent; the call is not sent."""


class UsageMeter:
    """Running totals of one process's teacher calls (thread-safe), and the gate that enforces the budgets.

    `before` is what a resumed run had spent (the whole run's). With a `ledger` (training) every process reads
    the run's spend from it and checks the whole budget; without one, `share` is this process's part of each
    budget (1 / processes), so the processes together stop near the budget without talking to each other.
    """

    def __init__(self, prices: Prices | None = None, budgets: Budgets | None = None):
        self.prices = prices or Prices()
        self.budgets = budgets or Budgets()
        self.before = Usage()
        self.share = 1.0
        self._usage = Usage()
        self._reserved = Usage()  # estimates of the calls in flight (see admit)
        # Requests per teacher replica; sized by the openai backend when it has several (the same on every process).
        self.endpoint_calls: list[int] = []
        self.ledger = None  # spend_ledger.SpendLedger, during training: every call written down as it is counted
        self.aggregate = False  # check the run's total from the ledger (every process writes to the same file)
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg) -> UsageMeter:
        return cls(Prices(cfg.teacher_price_input_per_mtok, cfg.teacher_price_output_per_mtok,
                          cfg.teacher_price_cached_input_per_mtok), Budgets.from_config(cfg))

    def add(self, calls: int = 1, prompt_tokens: int = 0, completion_tokens: int = 0, cached_prompt_tokens: int = 0) -> None:
        """Count CALLS calls that used these tokens (CACHED_PROMPT_TOKENS: the part of the prompt the server had cached)."""
        with self._lock:
            self._usage = self._usage + Usage(calls, int(prompt_tokens or 0), int(completion_tokens or 0),
                                              int(cached_prompt_tokens or 0))
            if self.ledger is not None:  # durably, before anything else can happen (spend_ledger.py)
                self.ledger.record(self._usage)

    @property
    def usage(self) -> Usage:
        """This process's calls and tokens so far (not counting `before`)."""
        with self._lock:
            return self._usage

    def _mine(self) -> tuple[Usage, float]:
        """(the spend this process checks against the budgets, the part of each budget it checks it against).

        With a ledger (training): the whole run's spend, every process's calls as written so far, against the
        whole budget. Without: this process's share of `before` plus its own calls, against its share."""
        if self.aggregate and self.ledger is not None and self._budgeted():  # no budget: no read
            return self.before + self.ledger.session_total(), 1.0
        return Usage(*(round(v * self.share) for v in self.before.as_tuple())) + self._usage, self.share

    def _budgeted(self) -> bool:
        return self.budgets.max_total_tokens > 0 or (self.budgets.max_cost_usd > 0 and self.prices.priced)

    def check(self) -> None:
        """Raise BudgetSpent when this process's part of a budget is spent (see `_mine`)."""
        with self._lock:
            mine, share = self._mine()
            reason = self.budgets.spent(mine, self.prices, share)
        if reason is not None:
            raise BudgetSpent(reason)

    def admit(self, prompt_tokens: int, completion_tokens: int) -> bool:
        """Reserve the estimate of a call about to be sent: True. False: the calls in flight may already fill
        the budget, so wait for them and ask again. Raises BudgetSpent once the budget is spent.

        Without the reservation every call of a batch would pass the check at once, and a run would end a
        whole batch past its budget; with it, it ends at most about one call past.
        """
        with self._lock:
            mine, share = self._mine()
            reason = self.budgets.spent(mine, self.prices, share)
            if reason is not None:
                raise BudgetSpent(reason)
            if self._reserved.calls and self.budgets.spent(mine + self._reserved, self.prices, share):
                return False
            self._reserved = self._reserved + Usage(1, prompt_tokens, completion_tokens)
            return True

    def add_endpoint_call(self, index: int) -> None:
        """Count one request sent to replica INDEX (for judge/calls_by_endpoint/<i>; only with several replicas)."""
        with self._lock:
            if index < len(self.endpoint_calls):
                self.endpoint_calls[index] += 1

    def release(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Drop the reservation `admit` made for a call that has ended."""
        with self._lock:
            self._reserved = self._reserved - Usage(1, prompt_tokens, completion_tokens)
