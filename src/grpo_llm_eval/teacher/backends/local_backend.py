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

from grpo_llm_eval.teacher.backends import local_group
from grpo_llm_eval.teacher.backends.local_scores import ForcedScorer
from grpo_llm_eval.teacher.backends.local_worker import TeacherWorker, WorkerCrashed
from grpo_llm_eval.teacher.backends.probe import check_in_child
from grpo_llm_eval.teacher.grading.completion import TruncationCheck, judgement_from_completion
from grpo_llm_eval.teacher.grading.group_grading import failed_group
from grpo_llm_eval.teacher.grading.group_prompt import GroupPrompt
from grpo_llm_eval.teacher.limits import process_count
from grpo_llm_eval.teacher.types import GroupCall, Judgement, JudgeRequest, TeacherUnavailable
from grpo_llm_eval.teacher.usage import BudgetSpent, UsageMeter

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


def control_texts(llm) -> list[str]:
    """The texts of the model's control tokens (``<|im_end|>``, ...): what tokenizing with special tokens on
    turns into those tokens."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    texts = []
    for token in range(llm.n_vocab()):
        if llama_cpp.llama_vocab_get_attr(vocab, token) & llama_cpp.LLAMA_TOKEN_ATTR_CONTROL:
            text = llm.detokenize([token], special=True).decode("utf-8", "replace")
            if text.strip():
                texts.append(text)
    return texts


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cores_per_process() -> int:
    """This process's share of the machine's cores: the usable cores over the processes launched on this machine
    (torchrun and accelerate set LOCAL_WORLD_SIZE). Two processes that each took every core for llama.cpp and
    torch spun at each other's barriers: the README's two-process CPU command wrote no step in 8 minutes."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, usable_cores() // local)


def default_threads(concurrent: bool = True) -> int:
    """llama.cpp threads: half this process's cores where the teacher grades while torch trains, else all of them.

    llama.cpp's threads wait for each other at every layer; when one of them is descheduled (the machine
    is shared, or the trainer runs beside it) all wait. Measured on a shared 2-core machine with the trainer
    beside it: 2 s per grade with 1 thread, 229 s with 2. So a teacher that grades while the trainer works
    (``judge_ahead_steps`` > 0) takes half the cores; one that grades while the trainer waits takes them all
    (0.48 s against 0.80 s per grade on 2 cores, the offline default's forced-key scores). With several
    processes on one machine, each process's share (`cores_per_process`) is what is split.
    """
    cores = cores_per_process()
    return max(1, cores // 2) if concurrent else cores


class LocalTeacher:
    """Teacher protocol over a llama.cpp model: in this process, or (``process=True``, what build_teacher makes) in
    a process of its own that grades what this one sends (local_worker.py)."""

    def __init__(self, cfg, rubric, n_ctx: int = 4096, n_threads: int | None = None, verbose: bool = False,
                 process: bool = False):
        self.cfg = cfg
        self.rubric = rubric
        self.group_prompt = GroupPrompt(rubric)  # judge_mode: group (teacher/backends/local_group.py)
        self.path = resolve_gguf(cfg.teacher_model_name)
        self.n_ctx = n_ctx
        self.verbose = verbose  # llama.cpp's own load and timing log on stderr
        self.n_threads = n_threads or default_threads(concurrent=cfg.judge_ahead_steps != 0)
        self._llm = None
        self._scorer: ForcedScorer | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()  # set by aclose: a batch in progress stops after its current grade
        self.check_first_in_child = True  # health_check grades once in a child process first (teacher/backends/probe.py)
        self._truncation = TruncationCheck(rubric, cfg.max_feedback_new_tokens)  # decoded grades only
        self.usage = UsageMeter.from_config(cfg)  # tokens counted with the model's own tokenizer (usage.py)
        # PROCESS: the model lives in a child process and grades there (teacher/backends/local_worker.py: faster
        # beside torch, a native crash contained); what build_teacher makes. Else in this process (benches, tests).
        self._worker = TeacherWorker(self) if process else None

    def _load(self, logits_all: bool):
        from grpo_llm_eval.teacher.backends.llamacpp import load_llama

        return load_llama(str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads, n_threads_batch=self.n_threads,
                          logits_all=logits_all, seed=self.cfg.seed, verbose=self.verbose)

    def load(self):
        """The model, loaded on first use (with the forced-key scorer where it applies)."""
        return self._model()

    def _model(self):
        if self._llm is None:
            self._llm = self._load(logits_all=False)
            logger.info("Local teacher %s: %d llama.cpp threads.", self.path.name, self.n_threads)
            # The prompt is tokenized with special tokens on: their texts inside a response must stay text.
            self.rubric.set_control_strings(control_texts(self._llm))
            if self.cfg.teacher_logprob_scores:
                scorer = ForcedScorer(self._llm, self.rubric, self.cfg.max_feedback_new_tokens)
                if scorer.supports:
                    self._scorer = scorer
                elif self.cfg.max_feedback_new_tokens == 0:  # llama.cpp reads max_tokens 0 as "up to the context"
                    self._llm.close()
                    self._llm = None
                    raise TeacherUnavailable(
                        f"max_feedback_new_tokens: 0 writes scores only, which needs the forced-key scorer, and it does "
                        f"not apply to {self.path.name} with this rubric (see teacher/backends/local_scores.py); set "
                        "max_feedback_new_tokens to hold a whole grade, e.g. 512.")
                else:  # decoded grades with top_logprobs need logits for every position
                    logger.info("Logprob scores by grammar decoding: the forced-key scorer does not apply to %s "
                                "(see teacher/backends/local_scores.py).", self.path.name)
                    self._llm.close()
                    self._llm = self._load(logits_all=True)
        return self._llm

    async def health_check(self) -> None:
        """Grade a test response in a child process first (a native crash there ends nothing but the child;
        teacher/backends/probe.py), then load the model here; in process mode, start the teacher's process, which
        loads the model and grades the test response (local_worker.py)."""
        if self._worker is not None:
            await asyncio.to_thread(self._worker.start)
            return
        if self.check_first_in_child and self._llm is None:
            await asyncio.to_thread(check_in_child, self.cfg, self.n_ctx, self.n_threads, self.path)
        try:
            await asyncio.to_thread(self._model)
        except Exception as exc:  # a corrupt or unsupported file
            raise TeacherUnavailable(f"cannot load the local teacher {self.path}: {exc}") from None

    async def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        return await asyncio.to_thread(self._judge_all, requests)

    async def judge_group(self, calls: list[GroupCall]) -> list[list[Judgement]]:
        """Grade each call's responses in ONE local call (``judge_mode: group``, teacher/backends/local_group.py), the calls
        one after another; per call one Judgement per response in presentation order (a failed call fails each)."""
        return await asyncio.to_thread(self._judge_groups, calls)

    def _judge_groups(self, calls: list[GroupCall]) -> list[list[Judgement]]:
        self.usage.share = 1.0 / process_count()
        with self._lock:
            return [self._judge_group_gated(c) if not self._closing.is_set()
                    else local_group.closed_group(c, self.rubric.names) for c in calls]

    def _judge_group_gated(self, call: GroupCall) -> list[Judgement]:
        names = self.rubric.for_items(call.rubric).names
        try:
            self.usage.check()
        except BudgetSpent as exc:
            return failed_group(call, names, "budget_spent", str(exc), attempts=0)
        if self._worker is not None:
            try:
                return self._worker.grade("group", call)
            except WorkerCrashed as exc:
                return failed_group(call, names, "error", str(exc))
        return self._grade_group(call)

    def _grade_group(self, call: GroupCall) -> list[Judgement]:
        """Grade one group call with the model in this process (what the teacher's process runs in process mode)."""
        rubric = self.rubric.for_items(call.rubric)  # the example's own items, if it has them
        group = self.group_prompt if rubric is self.rubric else GroupPrompt(rubric)
        names = rubric.names
        self._model()
        start = time.perf_counter()
        try:
            if self._scorer is not None:
                out, tokens = local_group.forced_group(self._scorer, group, call)
            else:
                out, tokens = local_group.decoded_group(self._llm, group, self.cfg, call)
        except Exception as exc:  # e.g. a group longer than the context: this call fails, the run goes on
            self.usage.add(1)
            return failed_group(call, names, "error", str(exc)[:300], latency_s=time.perf_counter() - start)
        self.usage.add(1, *tokens)
        return out

    def grade_now(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """Grade REQUESTS in this thread, one after another (what `judge` runs in a worker thread)."""
        return self._judge_all(requests)

    def _judge_all(self, requests: list[JudgeRequest]) -> list[Judgement]:
        self.usage.share = 1.0 / process_count()
        with self._lock:
            return [self._judge_gated(r) if not self._closing.is_set()
                    else Judgement.failed("error", self.rubric.names, error="the teacher was closed")
                    for r in requests]

    def _judge_gated(self, req: JudgeRequest) -> Judgement:
        try:
            self.usage.check()
        except BudgetSpent as exc:
            return Judgement.failed("budget_spent", self.rubric.for_items(req.rubric).names, error=str(exc), attempts=0)
        if self._worker is not None:
            try:
                return self._worker.grade("one", req)
            except WorkerCrashed as exc:
                return Judgement.failed("error", self.rubric.for_items(req.rubric).names, error=str(exc))
        return self._judge_one(req)

    def _judge_one(self, req: JudgeRequest) -> Judgement:
        self._model()
        rubric = self.rubric.for_items(req.rubric)  # the example's own items, if it has them
        if self._scorer is not None:
            return self._judge_forced(req, rubric)
        cfg = self.cfg
        structured = cfg.teacher_structured_output
        kwargs: dict = dict(
            messages=rubric.messages(req.question, req.response, req.ground_truth, json_mode=structured,
                                           compact=True),
            # A seed per sample: with the run's seed alone, teacher_samples repeats would draw the same grade.
            temperature=cfg.teacher_temperature, max_tokens=cfg.max_feedback_new_tokens, seed=cfg.seed + req.sample,
        )
        if structured:
            # Compact grades with a short explanation: a 135M model rambles until max_tokens otherwise.
            schema = rubric.json_schema(max_explanation_chars=32, compact=True)
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
        if cfg.teacher_logprob_scores:
            kwargs.update(logprobs=True, top_logprobs=20)
        start = time.perf_counter()
        try:
            out = self._model().create_chat_completion(**kwargs)
        except Exception as exc:  # e.g. a prompt longer than the context: this grade fails, the run goes on
            self.usage.add(1)
            return Judgement.failed("error", rubric.names, error=str(exc)[:300],
                                    latency_s=time.perf_counter() - start)
        used = out.get("usage") or {}
        self.usage.add(1, used.get("prompt_tokens", 0), used.get("completion_tokens", 0))
        attributed = {"calls": 1, "prompt_tokens": used.get("prompt_tokens", 0),
                      "completion_tokens": used.get("completion_tokens", 0)}
        choice = out["choices"][0]
        logprobs = (choice.get("logprobs") or {}).get("content") if cfg.teacher_logprob_scores else None
        judgement = judgement_from_completion(
            rubric, choice["message"].get("content"), None, logprobs, bool(cfg.teacher_logprob_scores),
            cfg.think_open_string, cfg.think_close_string, latency_s=time.perf_counter() - start, attempts=1)
        judgement.extra["finish_reason"] = choice.get("finish_reason")
        judgement.extra["usage"] = attributed
        return self._truncation.apply(judgement, choice.get("finish_reason"), structured, compact=True)

    def _judge_forced(self, req: JudgeRequest, rubric) -> Judgement:
        """Scores read from digit probabilities after forced JSON keys (teacher/backends/local_scores.py)."""
        start = time.perf_counter()
        messages = rubric.messages(req.question, req.response, req.ground_truth, json_mode=True, compact=True)
        try:
            text, scores = self._scorer.grade(messages, rubric.criteria)
        except Exception as exc:  # e.g. a prompt longer than the context: this grade fails, the run goes on
            self.usage.add(1)
            return Judgement.failed("error", rubric.names, error=str(exc)[:300],
                                    latency_s=time.perf_counter() - start)
        prompt_tokens, completion_tokens = self._scorer.token_counts(messages, text)
        self.usage.add(1, prompt_tokens, completion_tokens)
        judgement = judgement_from_completion(rubric, text, None, None, False, self.cfg.think_open_string,
                                              self.cfg.think_close_string, latency_s=time.perf_counter() - start,
                                              attempts=1)
        judgement.extra["usage"] = {"calls": 1, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        missing = [name for name in rubric.names if scores.get(name) is None]
        if judgement.ok and missing:
            return Judgement.failed("incomplete", rubric.names, raw=text, latency_s=judgement.latency_s,
                                    error=f"the teacher put no probability on the scale of: {', '.join(missing)}")
        if judgement.ok:
            judgement.scores = {name: scores[name] for name in rubric.names}
            judgement.extra["score_source"] = {name: "logprob" for name in rubric.names}
        return judgement

    async def aclose(self) -> None:
        """Stop a batch in progress after its current grade (a thread cannot be interrupted), then free the model."""
        self._closing.set()
        await asyncio.to_thread(self._close_model)

    def close_now(self) -> None:
        """Free the model in this thread (what `aclose` does in a worker thread)."""
        self._close_model()

    def _close_model(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.close()
            if self._llm is not None:
                self._llm.close()
                self._llm = None
                self._scorer = None
