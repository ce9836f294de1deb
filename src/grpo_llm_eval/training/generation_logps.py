"""Sampling log-probs recorded while transformers generates, so judging ahead needs no second forward pass.

TRL's `old_per_token_logps` are `log_softmax(logits / temperature)` of the model's own logits (its fused LM
head: no top-k, top-p, min-p or repetition penalty), at each completion token. Generation sees exactly those
logits: every decoding step is one forward of the model whose output's last position predicts the next token,
and the next forward's input shows which token was sampled. So a forward hook on the model keeps the last
step's log-softmax row and, at the next forward, gathers it at the token just sampled; the last token's row is
gathered once generation returns. A logits processor would not do: transformers appends custom processors
after its own warpers, so it would see top-k/top-p-filtered scores, not the raw logits TRL scores.

The recording is checked against what TRL returned (every gathered token must be the completion's token at that
position); anything else (a chunked prefill, several generate calls, a model without input_ids) gives None and
the caller falls back to a forward pass (`judge_ahead.sampling_logps`). The fallback is agreed across processes
(`agree_fallback`): under ZeRO-3 or FSDP that forward pass all-gathers weights, so a process that ran it alone
would wait for partners that never come. A process whose own recording was fine then has both, and the mean
|recorded - forward| log-prob difference over its completion tokens is logged (`judge_ahead/logps_abs_diff`).
"""

from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger(__name__)


class GenerationLogps:
    """Forward hook state: one gathered log-prob column per decoding step, plus the last step's pending row."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.columns: list[torch.Tensor] = []  # (B,) log-prob of the token sampled at step j
        self.tokens: list[torch.Tensor] = []  # (B,) that token, as the next forward's input showed it
        self.pending: torch.Tensor | None = None  # (B, V) log-softmax of the last forward, not yet gathered
        self.problem: str | None = None
        self._decoding = False

    def hook(self, module, args, kwargs, output) -> None:
        if self.problem is not None:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        logits = getattr(output, "logits", None)
        if ids is None or logits is None:
            self.problem = "the model was called without input_ids or returned no logits"
            return
        if self.pending is not None:
            if ids.size(1) != 1 and self._decoding:
                self.problem = "a second prefill (several generate calls or a chunked prefill)"
                return
            self._decoding = self._decoding or ids.size(1) == 1
            token = ids[:, -1]
            self.columns.append(self.pending.gather(1, token[:, None])[:, 0])
            self.tokens.append(token)
        # float32 as generation's own sampling; the division and log_softmax as TRL's fused head.
        self.pending = torch.log_softmax(logits[:, -1].float() / self.temperature, dim=-1)

    def result(self, completion_ids: list[list[int]], width: int) -> torch.Tensor | None:
        """(B, WIDTH) log-probs at COMPLETION_IDS (zero past each end), or None where the recording does not fit."""
        if self.problem is None and self.pending is None:
            self.problem = "the forward hook never fired (generation did not call the hooked module)"
        if self.problem is not None:
            return None
        steps = len(self.columns) + 1
        if len(completion_ids) != self.pending.size(0) or max(map(len, completion_ids), default=0) > steps:
            self.problem = "the recorded batch does not match the returned completions"
            return None
        device = self.pending.device
        last = torch.tensor([c[steps - 1] if len(c) == steps else 0 for c in completion_ids], device=device)
        columns = [*self.columns, self.pending.gather(1, last[:, None])[:, 0]]
        out = torch.zeros(len(completion_ids), max(width, steps), device=device)
        out[:, :steps] = torch.stack(columns, dim=1)
        seen = torch.stack(self.tokens, dim=1).tolist() if self.tokens else [[] for _ in completion_ids]
        for row, (ids, sampled) in enumerate(zip(completion_ids, seen, strict=True)):
            n = min(len(ids), steps - 1)
            if ids[:n] != sampled[:n]:
                self.problem = f"row {row}: the tokens seen while generating differ from the returned completion"
                return None
            out[row, len(ids):] = 0.0
        return out[:, :width]


OTHER_PROCESS = "another process's recording failed"


def agree_fallback(accelerator, reason: str | None) -> str | None:
    """Why every process falls back to a forward pass, or None where every process's recording is usable.

    REASON is this process's own (None: its recording is fine). One all-reduce, called by every process.
    """
    from grpo_llm_eval.training.agreement import agree_max

    anyone = agree_max(accelerator, [reason is not None])[0]
    return reason if reason is not None else (OTHER_PROCESS if anyone else None)


def mean_abs_difference(recorded: torch.Tensor, computed: torch.Tensor, completion_ids: list[list[int]]) -> float:
    """Mean |RECORDED - COMPUTED| over the completion tokens (padding excluded)."""
    width = min(recorded.size(1), computed.size(1))
    mask = torch.zeros(len(completion_ids), width, device=computed.device)
    for row, ids in enumerate(completion_ids):
        mask[row, :min(len(ids), width)] = 1.0
    diff = (recorded[:, :width].to(computed.device, computed.dtype) - computed[:, :width]).abs() * mask
    return float(diff.sum() / mask.sum().clamp(min=1.0))


def generating_model(trainer):
    """The module whose forward transformers' generate calls: the causal LM under PEFT and accelerate wrappers."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported(trainer) -> str | None:
    """Why the recording cannot be used with TRAINER's generation path, or None where it can."""
    if trainer.use_vllm:
        return "vLLM generates (TRL's importance sampling correction covers the lag)"
    if getattr(trainer, "use_transformers_continuous_batching", False):
        return "transformers continuous batching generates outside the model's forward"
    if trainer.rollout_func is not None:
        return "a custom rollout_func generates"
    if trainer.tools:
        return "tool calls generate several times per batch"
    if trainer._compiled_generation:
        return "compiled generation: a hook would run inside the compiled step (untested there)"
    return None


@contextlib.contextmanager
def recording(trainer):
    """Record sampling log-probs while the body generates; yields the GenerationLogps (its result() after)."""
    recorder = GenerationLogps(trainer.temperature)
    handle = generating_model(trainer).register_forward_hook(recorder.hook, with_kwargs=True)
    try:
        yield recorder
    finally:
        handle.remove()
