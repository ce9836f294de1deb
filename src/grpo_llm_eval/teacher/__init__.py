"""The teacher: one interface (`types.Teacher`), two backends (openai, local), a rubric and a cache."""

from __future__ import annotations

from pathlib import Path

# One registry of backends; config help and errors are built from its keys.
BACKENDS = ("openai", "local")
# How a batch is graded: one call per completion, or one call per group of completions of the same prompt.
JUDGE_MODES = ("pointwise", "group")


def build_teacher(cfg, rubric, cache_path: Path | None = None):
    """The configured backend, wrapped in the persistent judgement cache when `cache_path` is given; with
    `judge_mode: group`, wrapped in a GroupTeacher (one call per group; it keeps the cache itself); outermost, in
    `samples.SampledTeacher` when `teacher_samples` > 1 (it asks the teachers inside for each repeat apart)."""
    teacher = _build_inner(cfg, rubric, cache_path)
    if cfg.teacher_samples > 1:
        from grpo_llm_eval.teacher.samples import SampledTeacher

        teacher = SampledTeacher(teacher, cfg.teacher_samples, rubric)
    return teacher


def _build_inner(cfg, rubric, cache_path: Path | None):
    if cfg.teacher_backend == "openai":
        from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher

        teacher = OpenAITeacher(cfg, rubric)
    elif cfg.teacher_backend == "local":
        from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher

        teacher = LocalTeacher(cfg, rubric, process=True)  # the model in a process of its own (local_worker.py)
    else:  # validated earlier; kept for library callers
        raise ValueError(f"teacher_backend {cfg.teacher_backend!r}: use one of {', '.join(BACKENDS)}")
    if cfg.judge_mode == "group":
        from grpo_llm_eval.teacher.cache import JudgementCache, flags_from_config
        from grpo_llm_eval.teacher.group import GroupTeacher

        cache = JudgementCache(cache_path) if cache_path is not None and cfg.teacher_cache else None
        return GroupTeacher(teacher, rubric, cfg, cache, flags_from_config(cfg))
    if cache_path is None or not cfg.teacher_cache:
        return teacher
    from grpo_llm_eval.teacher.cache import CachedTeacher, JudgementCache, flags_from_config

    return CachedTeacher(teacher, JudgementCache(cache_path), cfg.teacher_model_name, rubric, flags_from_config(cfg))
