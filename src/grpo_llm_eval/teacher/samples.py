"""`teacher_samples: k`: every completion (or group) graded k times at `teacher_temperature`, scores averaged.

One grade of a sampled teacher is a draw; the mean of k draws is a less noisy reward, and their spread says how
much a single grade could be trusted. The wrapper sends all k x n requests in ONE call to the teacher it wraps,
so the concurrency cap, the rate limits, the cache and group judging see every one of them. Each repeat is
marked by `JudgeRequest.sample` (0..k-1): the cache files the repeats apart, and the local backend seeds its
sampler with it (otherwise its fixed seed would draw the same grade k times).
"""

from __future__ import annotations

import dataclasses
import statistics

from grpo_llm_eval.teacher.types import Judgement, JudgeRequest


def combine(samples: list[Judgement], rubric, items: tuple = ()) -> Judgement:
    """One Judgement from the k grades of one completion: each criterion averaged over the ok samples.

    The result is ok when at least one sample is: a failed sample (a timeout, an unparseable grade) says nothing
    about the completion, so it is left out of the mean rather than masking a completion that holds a valid
    grade; averaging fewer draws is noisier, not biased. Feedback and raw text come from the first ok sample.
    `extra["samples"]` keeps each sample's scores and status, `extra["sample_spread"]` is the population standard
    deviation of the rubric reward over the ok samples (None with fewer than two), `extra["usage"]` sums theirs.
    """
    ok = [j for j in samples if j.ok]
    first = ok[0] if ok else samples[0]
    extra = dict(first.extra)
    extra["samples"] = [{"scores": dict(j.scores), "status": j.status} for j in samples]
    rewards = [r for r in (rubric.reward(j.scores, items) for j in ok) if r is not None]
    extra["sample_spread"] = statistics.pstdev(rewards) if len(rewards) >= 2 else None
    usages = [j.extra.get("usage") for j in samples if not j.cached and j.extra.get("usage")]
    if usages:
        extra["usage"] = {key: sum(u.get(key, 0) or 0 for u in usages) for key in usages[0]}
    else:
        extra.pop("usage", None)
    if ok:
        scores = {}
        for name in first.scores:
            values = [j.scores[name] for j in ok if j.scores.get(name) is not None]
            scores[name] = statistics.fmean(values) if values else None
        status, error = first.status, None
    else:
        scores, status, error = dict(first.scores), first.status, first.error
    return Judgement(scores=scores, feedback=first.feedback, raw=first.raw, status=status,
                     latency_s=max(j.latency_s for j in samples),  # the repeats run side by side
                     attempts=sum(j.attempts for j in samples), cached=all(j.cached for j in samples),
                     error=error, extra=extra)


class SampledTeacher:
    """Any Teacher, asked k times per request; one averaged Judgement per request (see `combine`)."""

    def __init__(self, inner, k: int, rubric):
        if k < 1:
            raise ValueError(f"teacher_samples {k}: must be at least 1")
        self.inner = inner
        self.k = k
        self.rubric = rubric

    @property
    def usage(self):
        """The wrapped teacher's usage meter (every sample is a call of its own)."""
        return self.inner.usage

    async def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """Grade every request k times in one call to the wrapped teacher; results in the order of REQUESTS."""
        if self.k == 1:
            return await self.inner.judge(requests)
        n = len(requests)
        # Sample-major order: the requests of one group stay next to each other within each repeat.
        repeated = [dataclasses.replace(r, sample=s) for s in range(self.k) for r in requests]
        graded = await self.inner.judge(repeated)
        return [combine([graded[s * n + i] for s in range(self.k)], self.rubric, requests[i].rubric) for i in range(n)]

    async def health_check(self) -> None:
        """The wrapped teacher's health check."""
        await self.inner.health_check()

    async def aclose(self) -> None:
        """Close the wrapped teacher."""
        await self.inner.aclose()
