"""In-process teacher on llama.cpp's Python bindings (the offline default's engine).

Why llama.cpp rather than transformers: it loads the bundled GGUF file as is (no conversion), its chat API
answers in the OpenAI format (so grading shares `grading.py` with the openai backend), and it constrains
output to a JSON schema with a grammar, which a 135M model needs to produce parseable grades at all.
Requests of a batch run one after another in one worker thread (the bindings are not thread-safe and have
no multi-sequence batch API); llama.cpp reuses the KV cache of the prompt prefix the requests share.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

from grpo_llm_eval.teacher.grading import judgement_from_completion
from grpo_llm_eval.teacher.types import Judgement, JudgeRequest, TeacherUnavailable

logger = logging.getLogger(__name__)


def resolve_gguf(name: str) -> Path:
    """bundled:NAME or a path to a .gguf file."""
    from grpo_llm_eval.models import ModelError, bundled_gguf_path

    if name.startswith("bundled:"):
        try:
            return bundled_gguf_path(name.split(":", 1)[1])
        except ModelError as exc:
            raise TeacherUnavailable(str(exc)) from None
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    raise TeacherUnavailable(
        f"teacher_model_name {name!r}: the local backend runs a GGUF file or a bundled model (bundled:NAME); "
        "for other models serve them (vLLM, ollama, llama.cpp server) and set teacher_backend: openai.")


def default_threads() -> int:
    """Half the usable cores (llama.cpp's own default: about the physical cores), at least 1.

    llama.cpp's threads wait for each other at every layer; when one of them is descheduled (the machine
    is shared, or the trainer runs beside it) all wait. Measured on a shared 2-core machine: 2 s per grade
    with 1 thread, 229 s with 2. One spare core costs far less than that risk.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


class LocalTeacher:
    """Teacher protocol over an in-process llama.cpp model."""

    def __init__(self, cfg, rubric, n_ctx: int = 4096, n_threads: int | None = None):
        self.cfg = cfg
        self.rubric = rubric
        self.path = resolve_gguf(cfg.teacher_model_name)
        self.n_ctx = n_ctx
        self.n_threads = n_threads or default_threads()
        self._llm = None
        self._lock = threading.Lock()
        self._closing = threading.Event()  # set by aclose: a batch in progress stops after its current grade

    def _model(self):
        if self._llm is None:
            from llama_cpp import Llama

            self._llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads,
                              n_threads_batch=self.n_threads, logits_all=bool(self.cfg.teacher_logprob_scores),
                              seed=self.cfg.seed, verbose=False)
        return self._llm

    async def health_check(self) -> None:
        try:
            await asyncio.to_thread(self._model)
        except Exception as exc:  # a corrupt or unsupported file
            raise TeacherUnavailable(f"cannot load the local teacher {self.path}: {exc}") from None

    async def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        return await asyncio.to_thread(self._judge_all, requests)

    def _judge_all(self, requests: list[JudgeRequest]) -> list[Judgement]:
        with self._lock:
            return [self._judge_one(r) if not self._closing.is_set()
                    else Judgement.failed("error", self.rubric.names, error="the teacher was closed")
                    for r in requests]

    def _judge_one(self, req: JudgeRequest) -> Judgement:
        cfg = self.cfg
        structured = cfg.teacher_structured_output
        kwargs: dict = dict(
            messages=self.rubric.messages(req.question, req.response, req.ground_truth, json_mode=structured,
                                           compact=True),
            temperature=cfg.teacher_temperature, max_tokens=cfg.max_feedback_new_tokens, seed=cfg.seed,
        )
        if structured:
            # Compact grades with a short explanation: a 135M model rambles until max_tokens otherwise.
            schema = self.rubric.json_schema(max_explanation_chars=32, compact=True)
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
        if cfg.teacher_logprob_scores:
            kwargs.update(logprobs=True, top_logprobs=20)
        start = time.perf_counter()
        try:
            out = self._model().create_chat_completion(**kwargs)
        except Exception as exc:  # e.g. a prompt longer than the context: this grade fails, the run goes on
            return Judgement.failed("error", self.rubric.names, error=str(exc)[:300],
                                    latency_s=time.perf_counter() - start)
        choice = out["choices"][0]
        logprobs = (choice.get("logprobs") or {}).get("content") if cfg.teacher_logprob_scores else None
        return judgement_from_completion(
            self.rubric, choice["message"].get("content"), None, logprobs, bool(cfg.teacher_logprob_scores),
            cfg.think_open_string, cfg.think_close_string, latency_s=time.perf_counter() - start, attempts=1)

    async def aclose(self) -> None:
        """Stop a batch in progress after its current grade (a thread cannot be interrupted), then free the model."""
        self._closing.set()
        await asyncio.to_thread(self._close_model)

    def _close_model(self) -> None:
        with self._lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None
