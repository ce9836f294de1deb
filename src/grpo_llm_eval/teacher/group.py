"""Group judging behind the ordinary Teacher interface (``judge_mode: group``).

``GroupTeacher.judge(requests)`` returns one Judgement per request, in order, as every teacher does, so the reward
function, ``judge``, ``evaluate``, ``calibrate``, SFT on feedback and judging ahead work unchanged. Underneath:

* **Groups.** Requests are partitioned by (question, ground truth, sample) in order of first appearance; a group
  larger than ``num_return_sequences`` is split into chunks of that size. Identical responses in a chunk are
  presented once and share the grade (a copy each). A chunk of one (``judge`` on a file of distinct questions)
  is still a group call of one: the same prompt and format in every case (its parser also takes the pointwise
  format), so a run's grades never change kind with the data's shape.
* **Order.** Each call shows the responses in an order shuffled by ``random.Random`` seeded from (seed, the
  chunk's content digest, pass): prompts are deterministic, hence cacheable and reproducible, yet no position
  systematically holds the first completion sampled. Labels map back to the original positions.
* **Mismatch.** A call answered with the wrong labels or count (``group_mismatch``) is sent once more in another
  shuffled order; if that fails too, every completion of the chunk is masked with status ``group_mismatch``. With
  two passes a mismatch in either re-sends BOTH, as a fresh order and its reverse: re-sending one pass alone would
  pair a fresh shuffle with the other pass's order, and ``position_flip`` would then compare two random orders.
* **Two passes** (``group_judge_passes: 2``): the second call shows the first order reversed; scores are averaged
  per criterion. A completion is ``ok`` only when BOTH passes graded it: a single pass keeps the position bias the
  second cancels, and within one GRPO group an averaged reward beside a single-pass one would compare numbers of
  different bias. ``extra["position_flip"]`` says whether the chunk's ranking by rubric reward flipped (some pair
  strictly ordered one way in pass 1 and the other way in pass 2); None when fewer than two completions compare.
* **Cache.** A completion's key carries its chunk's digest and the pass count (a group grade is relative to the
  group); a chunk whose members are all cached costs no call. Only ok grades are stored.
* **Records.** ``extra["call_id"]`` names the call(s) that graded a completion ("a+b" with two passes),
  ``extra["usage"]`` is every call the chunk took (retries included) divided evenly over its completions, so that
  per-completion usage sums to what was spent; ``extra["group_id"]`` is the chunk's digest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import uuid
from dataclasses import dataclass, field

from grpo_llm_eval.teacher.cache import cache_key
from grpo_llm_eval.teacher.types import GroupCall, Judgement, JudgeRequest

# Bump when the group prompt or its reading changes meaning, so cached group grades are not reused.
GROUP_PROMPT_VERSION = 1


@dataclass
class Chunk:
    """Requests (by position) of one question graded in one call; ``uniques`` in canonical (sorted) order."""

    question: str
    ground_truth: str | None
    sample: int
    rubric: tuple = ()  # the example's own rubric items (JudgeRequest.rubric)
    positions: list[int] = field(default_factory=list)
    responses: list[str] = field(default_factory=list)  # one per position

    @property
    def uniques(self) -> list[str]:
        return sorted(set(self.responses))

    @property
    def digest(self) -> str:
        payload = [self.question, self.ground_truth, self.sample, self.uniques]
        if self.rubric:  # only then, so the digests (and cache keys) of rows without items stay as they were
            payload.append([[i.id, i.text, i.weight] for i in self.rubric])
        return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()[:16]


def partition(requests: list[JudgeRequest], size: int) -> list[Chunk]:
    """Chunks of at most SIZE requests sharing (question, ground truth, sample, own rubric), in order of first
    appearance.

    >>> [c.positions for c in partition([JudgeRequest("a", "1"), JudgeRequest("b", "2"), JudgeRequest("a", "3")], 8)]
    [[0, 2], [1]]
    """
    groups: dict[tuple, list[Chunk]] = {}
    for i, r in enumerate(requests):
        chunks = groups.setdefault((r.question, r.ground_truth, r.sample, r.rubric), [])
        if not chunks or len(chunks[-1].positions) >= size:
            chunks.append(Chunk(r.question, r.ground_truth, r.sample, r.rubric))
        chunks[-1].positions.append(i)
        chunks[-1].responses.append(r.response)
    return [c for chunks in groups.values() for c in chunks]


def flipped(first: list[float | None], second: list[float | None]) -> bool | None:
    """Whether some pair is strictly ordered one way in FIRST and the other way in SECOND (None: < 2 comparable).

    >>> flipped([3, 1, 2], [1, 3, 2]), flipped([3, 1], [3, 3]), flipped([1, None], [2, 0])
    (True, False, None)
    """
    both = [(a, b) for a, b in zip(first, second, strict=True) if a is not None and b is not None]
    if len(both) < 2:
        return None
    return any((a1 - a2) * (b1 - b2) < 0 for i, (a1, b1) in enumerate(both) for a2, b2 in both[i + 1:])


def _copy(j: Judgement) -> Judgement:
    return dataclasses.replace(j, scores=dict(j.scores), extra=dict(j.extra))


class GroupTeacher:
    """A backend with ``judge_group`` (and optionally a JudgementCache) as a Teacher; see the module doc."""

    def __init__(self, backend, rubric, cfg, cache=None, flags: dict | None = None):
        self.backend = backend
        self.rubric = rubric
        self.group_size = cfg.num_return_sequences
        self.passes = cfg.group_judge_passes
        self.seed = cfg.seed
        self.cache = cache
        self.model_name = cfg.teacher_model_name
        self.flags = {**(flags or {}), "judge_mode": "group", "group_prompt": GROUP_PROMPT_VERSION,
                      "passes": self.passes}

    @property
    def usage(self):
        """The backend's usage meter: a grade answered from the cache costs nothing."""
        return self.backend.usage

    async def health_check(self) -> None:
        """The backend's health check."""
        await self.backend.health_check()

    async def aclose(self) -> None:
        """Close the backend and the cache."""
        try:
            await self.backend.aclose()
        finally:
            if self.cache is not None:
                self.cache.close()

    # ---- ordering --------------------------------------------------------------------------------

    def order(self, chunk: Chunk, pass_index: int, retry: bool = False) -> list[int]:
        """Presentation order (indices into ``chunk.uniques``) of a pass: seeded shuffle; pass 2 reverses pass 1."""
        if pass_index == 1:  # on a retry too: the retried pair is again an order and its reverse
            return self.order(chunk, 0, retry)[::-1]
        rng = random.Random(f"{self.seed}:{chunk.digest}:{pass_index}:{'retry' if retry else 'first'}")
        order = list(range(len(chunk.uniques)))
        rng.shuffle(order)
        return order

    # ---- judging ---------------------------------------------------------------------------------

    def key(self, chunk: Chunk, request: JudgeRequest) -> str:
        """The cache key of a request graded within CHUNK."""
        fingerprint = self.rubric.for_items(request.rubric).fingerprint
        return cache_key(self.model_name, fingerprint, {**self.flags, "group": chunk.digest}, request)

    async def judge(self, requests: list[JudgeRequest]) -> list[Judgement]:
        """One Judgement per request, in order (see the module doc). Never raises for a failed call."""
        chunks = partition(requests, self.group_size)
        out: list[Judgement | None] = [None] * len(requests)
        todo: list[Chunk] = []
        keys = {id(c): [self.key(c, requests[p]) for p in c.positions] for c in chunks}
        found = {}
        if self.cache is not None:
            found = await asyncio.to_thread(self.cache.get_many, [k for ks in keys.values() for k in ks])
        for chunk in chunks:
            if all(k in found for k in keys[id(chunk)]):
                for p, k in zip(chunk.positions, keys[id(chunk)], strict=True):
                    out[p] = _copy(found[k])
            else:
                todo.append(chunk)
        graded = await self._grade(todo)
        fresh = []
        for chunk, judgements in zip(todo, graded, strict=True):
            for p, k, j in zip(chunk.positions, keys[id(chunk)], judgements, strict=True):
                out[p] = j
                fresh.append((k, j))
        if self.cache is not None and fresh:
            await asyncio.to_thread(self.cache.put_many, fresh)
        return out

    async def _calls(self, plans: list[tuple[Chunk, list[int]]]) -> list[list[Judgement]]:
        """Send one call per (chunk, order); per plan, the Judgements indexed like ``chunk.uniques``."""
        if not plans:
            return []
        calls = [GroupCall(c.question, c.ground_truth, tuple(c.uniques[i] for i in order), uuid.uuid4().hex[:16],
                           c.sample, c.rubric)
                 for c, order in plans]
        answers = await self.backend.judge_group(calls)
        out = []
        for (chunk, order), answer in zip(plans, answers, strict=True):
            by_unique: list[Judgement | None] = [None] * len(chunk.uniques)
            for shown, j in zip(order, answer, strict=True):
                by_unique[shown] = j
            out.append(by_unique)
        return out

    async def _grade(self, chunks: list[Chunk]) -> list[list[Judgement]]:
        """Per chunk, one Judgement per position: every pass of every chunk sent at once, mismatches once more."""
        plans = [(ci, p) for ci in range(len(chunks)) for p in range(self.passes)]
        results = dict(zip(plans, await self._calls([(chunks[ci], self.order(chunks[ci], p)) for ci, p in plans]),
                           strict=True))
        spent = {ci: [results[(ci, p)] for p in range(self.passes)] for ci in range(len(chunks))}
        mismatched = sorted({ci for (ci, _), js in results.items() if any(j.status == "group_mismatch" for j in js)})
        again = [(ci, p) for ci in mismatched for p in range(self.passes)]  # every pass of the chunk, see the doc
        retried = await self._calls([(chunks[ci], self.order(chunks[ci], p, retry=True)) for ci, p in again])
        for (ci, p), js in zip(again, retried, strict=True):
            results[(ci, p)] = js
            spent[ci].append(js)
        return [self._combine(chunk, [results[(ci, p)] for p in range(self.passes)], spent[ci])
                for ci, chunk in enumerate(chunks)]

    def _combine(self, chunk: Chunk, passes: list[list[Judgement]], spent: list[list[Judgement]]) -> list[Judgement]:
        """Per position: the passes' grades of its unique response merged, with the chunk's extras."""
        uniques = chunk.uniques
        merged = [self._merge([p[u] for p in passes]) for u in range(len(uniques))]
        flip = None
        if len(passes) == 2:
            rewards = [[self.rubric.reward(j.scores, chunk.rubric) if j.ok else None for j in p] for p in passes]
            both = [a is not None and b is not None for a, b in zip(*rewards, strict=True)]
            flip = flipped(*([r if ok else None for r, ok in zip(rs, both, strict=True)] for rs in rewards))
        m = len(chunk.positions)
        usage = {}
        for js in spent:  # every call the chunk took; each call's per-response usages sum to the call's
            for j in js:
                for name, value in (j.extra.get("usage") or {}).items():
                    usage[name] = usage.get(name, 0) + value
        call_id = "+".join(p[0].extra.get("call_id", "") for p in passes)
        out = []
        for response in chunk.responses:
            j = _copy(merged[uniques.index(response)])
            j.extra.update(call_id=call_id, group_id=chunk.digest, group_size=len(uniques),
                           usage={k: v / m for k, v in usage.items()})
            if flip is not None:
                j.extra["position_flip"] = flip
            out.append(j)
        return out

    def _merge(self, grades: list[Judgement]) -> Judgement:
        """One response's grades over the passes: averaged per criterion when all are ok, else the first failure."""
        if len(grades) == 1:
            return grades[0]
        failed = next((j for j in grades if not j.ok), None)
        latency, attempts = max(j.latency_s for j in grades), sum(j.attempts for j in grades)
        if failed is not None:
            return dataclasses.replace(failed, latency_s=latency, attempts=attempts, extra=dict(failed.extra))
        first = grades[0]
        values = {c: [j.scores.get(c) for j in grades] for c in first.scores}
        scores = {c: None if None in v else sum(v) / len(v) for c, v in values.items()}
        extra = {**first.extra, "pass_scores": [dict(j.scores) for j in grades],
                 "second_pass_feedback": grades[1].feedback}
        return dataclasses.replace(first, scores=scores, latency_s=latency, attempts=attempts, extra=extra)
