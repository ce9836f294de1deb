"""Teacher calls and tokens for one batch, pointwise vs group judging, through the real OpenAITeacher.

One batch of 4 prompts x 8 completions (the bundled arithmetic problems; synthetic student completions in the
system prompt's format, half right, of varied length; or the first groups of a run's rollouts.jsonl with
--rollouts) is graded by the test server (`scripted`, a correct teacher) twice: `judge_mode: pointwise` (one call
per completion) and `judge_mode: group` (one call per prompt's group), caches off. Printed per arm: calls, the
server's prompt and completion tokens (its usage: prompt words, grade tokens as the fake sampler splits them),
the same prompts counted with the bundled SmolLM2 tokenizer, the share of `ok` grades, and whether every
completion got the same answer score in both arms; then the group/pointwise ratios.

    python bench/group_judging.py
    python bench/group_judging.py --rollouts runs/run/rollouts.jsonl --passes 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from pathlib import Path

from grpo_llm_eval.config import Config
from grpo_llm_eval.data.bundled import read_bundled
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.grading.group_prompt import GroupPrompt
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.group import partition
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.testing import TeacherServer

TOKENIZER = Path(__file__).resolve().parent / "assets" / "smollm2-tokenizer"


def synthetic_batch(prompts: int, per_prompt: int, seed: int = 0) -> list[JudgeRequest]:
    """PROMPTS bundled problems x PER_PROMPT completions: think block of 10-60 words, boxed answer, half right."""
    rng = random.Random(seed)
    rows = read_bundled("arithmetic", "train")[:prompts]
    out = []
    for row in rows:
        for _ in range(per_prompt):
            right = rng.random() < 0.5
            answer = int(row["answer"]) + (0 if right else rng.randint(1, 9))
            words = " ".join(rng.choice(["add", "the", "numbers", "carry", "one", "so", "we", "get", "check"])
                             for _ in range(rng.randint(10, 60)))
            out.append(JudgeRequest(row["question"], f"<think>\n{words}\n</think>\n$\\boxed{{{answer}}}$", row["answer"]))
    return out


def rollouts_batch(path: str, groups: int) -> list[JudgeRequest]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    first_step = [r for r in rows if r["step"] == rows[0]["step"] and r["group"] < groups]
    return [JudgeRequest(r["question"], r["completion"], r["ground_truth"]) for r in first_step]


def prompt_tokens(cfg, rubric, requests: list[JudgeRequest], tokenizer) -> int:
    """The batch's prompts as this arm renders them, counted with the SmolLM2 tokenizer (no chat template)."""
    if cfg.judge_mode == "pointwise":
        texts = [m["content"] for r in requests for m in rubric.messages(r.question, r.response, r.ground_truth)]
    else:
        group = GroupPrompt(rubric)
        texts = [m["content"] for c in partition(requests, cfg.num_return_sequences) for _ in range(cfg.group_judge_passes)
                 for m in group.messages(c.question, c.ground_truth, c.uniques, json_mode=False)]
    return sum(len(tokenizer(t)["input_ids"]) for t in texts)


def arm(url: str, mode: str, passes: int, requests: list[JudgeRequest], per_prompt: int, tokenizer) -> dict:
    cfg = Config(teacher_backend="openai", teacher_model_name="teacher", openai_base_url=url, judge_mode=mode,
                 group_judge_passes=passes if mode == "group" else 1, num_return_sequences=per_prompt,
                 teacher_cache=False, max_feedback_new_tokens=512)
    rubric = Rubric.from_config(cfg)
    teacher = build_teacher(cfg, rubric)

    async def go():
        try:
            return await teacher.judge(requests)
        finally:
            await teacher.aclose()

    judgements = asyncio.run(go())
    usage = teacher.usage.usage
    return {"calls": usage.calls, "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "smollm2_prompt_tokens": prompt_tokens(cfg, rubric, requests, tokenizer),
            "ok": sum(j.ok for j in judgements) / len(judgements), "answers": [j.scores.get("answer") for j in judgements]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--passes", type=int, default=1, choices=(1, 2))
    p.add_argument("--rollouts", default=None, help="take the first --prompts groups of this rollouts.jsonl")
    a = p.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    requests = rollouts_batch(a.rollouts, a.prompts) if a.rollouts else synthetic_batch(a.prompts, a.per_prompt)
    results = {}
    with TeacherServer(mode="scripted") as server:
        for mode in ("pointwise", "group"):
            results[mode] = arm(server.base_url, mode, a.passes, requests, a.per_prompt, tokenizer)
    print(f"batch: {len(requests)} completions of {a.prompts} prompts; group passes: {a.passes}")
    for mode, r in results.items():
        print(f"{mode:9s} calls {r['calls']:4d}  prompt_tokens {r['prompt_tokens']:7d}  completion_tokens "
              f"{r['completion_tokens']:6d}  smollm2_prompt_tokens {r['smollm2_prompt_tokens']:7d}  ok {r['ok']:.0%}")
    g, pw = results["group"], results["pointwise"]
    for key in ("calls", "prompt_tokens", "completion_tokens", "smollm2_prompt_tokens"):
        print(f"ratio_group_vs_pointwise {key} {g[key] / max(1, pw[key]):.3f}")
    print(f"same_answer_scores {g['answers'] == pw['answers']}")


if __name__ == "__main__":
    main()
