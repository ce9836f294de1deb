"""How good a judge is the offline default's teacher? Share of parseable grades, tied groups, latency and
ROC AUC of its answer score against the verifier, under three settings of the local backend and one reference teacher.

The responses are synthetic and labelled by the verifier (math-verify): for each of --questions bundled
test problems, two right and two wrong answers (with and without a think block), one GRPO group of 4.
Each setting grades all of them with the bundled SmolLM2-135M-Instruct teacher in-process (llama.cpp),
configured as configs/offline.yaml says (max_feedback_new_tokens, temperature 0, the seed rubric):

    plain        free-text grade, parsed (XML or JSON), with the seed's prompt (which shows the XML format)
    structured   JSON-schema-constrained grade (llama.cpp grammar)
    logprob      forced JSON keys, probability-weighted scores from the digit tokens (teacher/backends/local_scores.py;
                 the offline default)
    scripted-api a correct scripted teacher over the OpenAI API (our test server on loopback, structured
                 output), as the ablation's scripted_teacher arm uses: the reference of a judge that can teach

Reported per setting: ok share (grades that parse with every criterion in range), the share of groups whose
ok teacher rewards are all equal (no GRPO signal; groups with fewer than 2 ok grades are counted apart),
mean seconds per grade, and the ROC AUC of the answer score (ok grades) against right/wrong (0.5 is chance).

    python bench/teacher_ok_share.py                    # 8 questions x 4 responses x 4 settings (~5 min, 2 cores)
    python bench/teacher_ok_share.py --questions 4 --settings structured
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time

SETTINGS = {"plain": (False, False), "structured": (True, False), "logprob": (True, True), "scripted-api": (True, False)}


def responses(rows: list[dict]) -> list[tuple[int, str, str, str]]:
    """(group, question, response, ground truth): two right and two wrong answers per question."""
    out = []
    for g, row in enumerate(rows):
        truth = row["answer"]
        wrong = str(int(truth) + 1 + g % 3) if truth.lstrip("-").isdigit() else truth + "0"
        for text in (f"<think>Working it out step by step.</think> {truth}", f"The answer is {truth}.",
                     f"<think>Working it out step by step.</think> {wrong}", f"The answer is {wrong}."):
            out.append((g, row["question"], text, truth))
    return out


def roc_auc(scores: list[float], labels: list[bool]) -> float | None:
    """P(score of a right answer > score of a wrong one), ties counting half (Mann-Whitney U / n1 n0)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def run_setting(base_cfg, name: str, items, labels) -> dict:
    import dataclasses

    from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher
    from grpo_llm_eval.teacher.grading.rubric import Rubric
    from grpo_llm_eval.teacher.types import JudgeRequest

    structured, logprobs = SETTINGS[name]
    cfg = dataclasses.replace(base_cfg, teacher_structured_output=structured, teacher_logprob_scores=logprobs)
    if name == "plain":
        from grpo_llm_eval.config import SEED_EVALUATION_PROMPT

        cfg = dataclasses.replace(cfg, evaluation_prompt=SEED_EVALUATION_PROMPT)
    server = None
    if name == "scripted-api":
        from grpo_llm_eval.teacher import build_teacher
        from grpo_llm_eval.testing.teacher_server import TeacherServer

        server = TeacherServer(mode="scripted").start()
        os.environ.setdefault("OPENAI_API_KEY", "local")
        cfg = dataclasses.replace(cfg, teacher_backend="openai", teacher_model_name="teacher",
                                  openai_base_url=server.base_url, teacher_cache=False, max_feedback_new_tokens=512)
    rubric = Rubric.from_config(cfg)
    teacher = build_teacher(cfg, rubric) if server is not None else LocalTeacher(cfg, rubric)

    async def go():
        try:
            await teacher.health_check()  # loads the model (not timed per grade)
            return await teacher.judge([JudgeRequest(q, r, t) for _, q, r, t in items])
        finally:
            await teacher.aclose()

    start = time.perf_counter()
    try:
        judgements = asyncio.run(go())
    finally:
        if server is not None:
            server.stop()
    wall = time.perf_counter() - start
    ok = [j.ok for j in judgements]
    groups: dict[int, list[float]] = {}
    for (g, *_), j in zip(items, judgements, strict=True):
        if j.ok:
            groups.setdefault(g, []).append(rubric.reward(j.scores))
    n_groups = len({g for g, *_ in items})
    usable = [v for v in groups.values() if len(v) >= 2]
    answer = [(j.scores["answer"], y) for j, y in zip(judgements, labels, strict=True) if j.ok]
    sources = [s for j in judgements if j.ok for s in j.extra.get("score_source", {}).values()]
    return {
        "setting": name, "grades": len(judgements), "ok_share": sum(ok) / len(ok),
        "tied_share": (sum(statistics.pstdev(v) == 0 for v in usable) / len(usable)) if usable else None,
        "unusable_groups": n_groups - len(usable),
        "latency_s": statistics.fmean(j.latency_s for j in judgements), "wall_s": wall,
        "auc_answer": roc_auc([s for s, _ in answer], [y for _, y in answer]),
        "logprob_share": (sources.count("logprob") / len(sources)) if sources else None,
        "statuses": {s: [j.status for j in judgements].count(s) for s in sorted({j.status for j in judgements})},
    }


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8, help="bundled test problems (4 responses each)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list from " + ",".join(SETTINGS))
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from grpo_llm_eval.config.load import load_config
    from grpo_llm_eval.data.bundled import read_bundled
    from grpo_llm_eval.verifiers import answer_correct

    cfg = load_config(None)  # the embedded offline default, the same text as configs/offline.yaml
    rows = [r for r in read_bundled("arithmetic", "test") if r["answer"].lstrip("-").isdigit()][: a.questions]
    items = responses(rows)
    labels = [bool(answer_correct(r, t, cfg.think_close_string)) for _, _, r, t in items]
    assert labels == [True, True, False, False] * len(rows), "the verifier disagrees with the synthetic labels"
    print(f"# {len(items)} responses ({len(rows)} groups of 4, half right); teacher {cfg.teacher_model_name}, "
          f"local backend, max_feedback_new_tokens {cfg.max_feedback_new_tokens}; {platform.processor() or 'cpu'}, "
          f"{os.cpu_count()} cores; python {sys.version.split()[0]}", flush=True)
    print("| setting | ok share | tied groups | groups < 2 ok | s / grade | answer ROC AUC | logprob-scored | statuses |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for name in a.settings.split(","):
        r = run_setting(cfg, name, items, labels)
        statuses = ", ".join(f"{k} {v}" for k, v in r["statuses"].items())
        print(f"| {name} | {r['ok_share']:.2f} | {fmt(r['tied_share'], '.2f')} | {r['unusable_groups']} | "
              f"{r['latency_s']:.2f} | {fmt(r['auc_answer'], '.2f')} | {fmt(r['logprob_share'], '.2f')} | {statuses} |",
              flush=True)


if __name__ == "__main__":
    main()
