"""`grpo_llm_eval evaluate`: any model's answers to held-out prompts, graded by the teacher and the verifiers.

For each model: K responses per prompt of the held-out split (greedy when K = 1, else sampled with the
config's temperature/top_p/top_k, seeded with `seed`), generated with transformers in left-padded batches;
every response is graded by the teacher (through the judgement cache `DIR/judgements.sqlite`) and by the
verifiers. Writes `DIR/eval_rollouts.jsonl` (one row per response) and `DIR/eval_summary.json` (per model:
means with 95 % intervals; for several models, each one paired against the first). See `stats.py` for
the statistical choices.

A model is a Hub id, a folder (a checkpoint-N folder too), `bundled:NAME`, or `run:DIR` (that run's
`final/` model). A LoRA adapter folder is loaded with peft on the base named in its adapter_config.json
(or its `merged/` copy when there is one).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from grpo_llm_eval import data as data_mod
from grpo_llm_eval.data.rubrics import from_json
from grpo_llm_eval.evaluation import stats
from grpo_llm_eval.evaluation.items import all_met, checklist_score
from grpo_llm_eval.models import ModelError, resolve_model_path
from grpo_llm_eval.rewards import TeacherRubricReward
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.teacher.usage import usage_summary
from grpo_llm_eval.training.records import JsonlWriter, dumps, read_jsonl

logger = logging.getLogger(__name__)

ROLLOUTS_FILE = "eval_rollouts.jsonl"
SUMMARY_FILE = "eval_summary.json"
PROPORTIONS = ("answer_accuracy", "format_rate", "judge_failure_rate")
RUN_PREFIX = "run:"
JUDGE_CHUNK = 256  # responses per teacher call batch: progress lines and bounded memory, concurrency unchanged


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec's weights are: `path` is a full model, or with `adapter` the base of that adapter."""

    spec: str
    path: str
    adapter: str | None = None
    tokenizer_path: str | None = None


# ---- models --------------------------------------------------------------------------------------


def resolve_eval_model(spec: str, cache_dir: str) -> ResolvedModel:
    """Resolve a model spec (Hub id, folder, checkpoint, bundled:NAME, run:DIR) without loading it."""
    folder = Path(spec[len(RUN_PREFIX):]).expanduser() if spec.startswith(RUN_PREFIX) else None
    if folder is not None:
        if not folder.is_dir():
            raise ModelError(f"{spec}: no run folder {folder}.")
        final = folder / "final"
        if not final.is_dir():
            checkpoints = sorted(folder.glob("checkpoint-*"), key=lambda p: p.name)
            hint = f"; evaluate a checkpoint instead, e.g. {checkpoints[-1]}" if checkpoints else ""
            raise ModelError(f"{spec}: the run has no final/ model (it may have stopped early){hint}.")
        folder = final
    else:
        local = Path(spec).expanduser()
        folder = local if local.is_dir() else None
    if folder is not None and (folder / "merged" / "config.json").is_file():
        return ResolvedModel(spec, str(folder / "merged"))
    if folder is not None and (folder / "adapter_config.json").is_file():
        adapter_cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        base = adapter_cfg.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{spec}: {folder}/adapter_config.json names no base_model_name_or_path.")
        tokenizer = str(folder) if (folder / "tokenizer_config.json").is_file() else None
        return ResolvedModel(spec, resolve_model_path(base, cache_dir), adapter=str(folder), tokenizer_path=tokenizer)
    return ResolvedModel(spec, resolve_model_path(str(folder) if folder is not None else spec, cache_dir))


def load_eval_model(resolved: ResolvedModel):
    """(model in eval mode on the best device, tokenizer) for RESOLVED; ModelError when it cannot be loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.tokenizer_path or resolved.path)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype)
        if resolved.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, resolved.adapter).merge_and_unload()
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"model {resolved.spec!r}: cannot be loaded ({first}); offline, use a local folder, "
                         "run:DIR, or a bundled model.") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to("cuda" if cuda else "cpu").eval()
    return model, tokenizer


# ---- generation ----------------------------------------------------------------------------------


def generate_responses(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                       max_prompt_tokens: int, samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                       top_k: int = 0, repetition_penalty: float = 1.0, batch_size: int = 16,
                       seed: int | None = None, synced_gpus: bool = False) -> list[list[str]]:
    """SAMPLES responses per conversation (greedy when SAMPLES is 1 or temperature is 0), in left-padded batches.

    Prompts are rendered with the chat template (generation prompt added) and cut from the left to
    MAX_PROMPT_TOKENS. The tokenizer is not modified (padding is done here), so a trainer's tokenizer is safe.
    """
    import torch
    from transformers import GenerationConfig

    greedy = samples == 1 or temperature <= 0
    if greedy and samples > 1:
        logger.warning("temperature 0 with %d samples per prompt: every sample is the same greedy response", samples)
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, num_return_sequences=samples,
                           pad_token_id=pad, eos_token_id=eos, repetition_penalty=repetition_penalty)
    if not greedy:
        gen.temperature, gen.top_p, gen.top_k = temperature, top_p, top_k
        if seed is not None:
            torch.manual_seed(seed)
    device = next(model.parameters()).device
    out: list[list[str]] = []
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        ids = []
        for conv in batch:
            text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_tokens:])
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            generated = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gen,
                                       synced_gpus=synced_gpus)
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        out.extend(texts[i * samples:(i + 1) * samples] for i in range(len(batch)))
    return out


# ---- grading -------------------------------------------------------------------------------------


def grade_rows(cfg, rubric, judgements, questions, responses, truths, own=None) -> list[dict]:
    """Per response: scores, feedback, status, teacher reward (the rubric's, unvetoed), verifier checks, reward;
    with an example's own rubric (OWN: per response, its items), each item's grade and check, and the share of
    checkable items met (``constraint_share``).

    `reward` is what training would have used (TeacherRubricReward's weighting, veto included).
    """
    scorer = TeacherRubricReward(cfg, rubric, teacher=None)
    rows = []
    own = own or [()] * len(responses)
    for j, q, text, truth, items in zip(judgements, questions, responses, truths, own, strict=True):
        # Training's own scoring, so the eval reward cannot drift from the training reward.
        scored = scorer.score(j, text, truth, items)
        per_item = {}
        if items:
            per_item = {"items": scored["items"], "rubric_score": scored["rubric_score"],
                        "constraint_share": checklist_score(items, text, cfg.think_close_string)}
        rows.append({"question": q, "ground_truth": truth, "response": text, "scores": j.scores,
                     "feedback": j.feedback, "judge_status": j.status, **per_item,
                     "teacher_reward": rubric.reward(j.scores, items) if j.ok else None,
                     "answer_correct": scored["answer_correct"], "format_correct": scored["format_correct"],
                     "reward": scored["reward"], "judge_latency_s": j.latency_s, "cached": j.cached,
                     "judge_call_id": j.extra.get("call_id"), "judge_group_id": j.extra.get("group_id"),
                     "position_flip": j.extra.get("position_flip")})
    return rows


# ---- summary -------------------------------------------------------------------------------------


def metric_value(row: dict, metric: str) -> float | None:
    """The value a rollout row contributes to METRIC (None: it does not count)."""
    if metric == "answer_accuracy":
        return None if row["answer_correct"] is None else float(row["answer_correct"])
    if metric == "format_rate":
        return float(bool(row["format_correct"]))
    if metric == "judge_failure_rate":
        return float(row["judge_status"] != "ok")
    if metric.startswith("criteria/"):
        value = (row["scores"] or {}).get(metric.split("/", 1)[1]) if row["judge_status"] == "ok" else None
        return None if value is None else float(value)
    if metric.startswith("items/"):  # items/<id>/check (the program's verdict) or items/<id>/met (the teacher's)
        _, item_id, source = metric.split("/")
        value = ((row.get("items") or {}).get(item_id) or {}).get(source)
        return None if value is None else float(value)
    if metric == "all_checks_met":
        value = all_met(row)
        return None if value is None else float(value)
    return None if row.get(metric) is None else float(row[metric])


def metric_names(criteria: list[str], item_ids: list[str] = ()) -> list[str]:
    """The summary's metrics; with examples' own rubrics (ITEM_IDS), the share of checkable items met, whether all
    were, the teacher's rubric score, and per item id the check's and the teacher's pass rates."""
    names = ["teacher_reward", *[f"criteria/{c}" for c in criteria], "reward", *PROPORTIONS]
    if item_ids:
        names += ["constraint_share", "all_checks_met", "rubric_score"]
        names += [f"items/{i}/{source}" for i in item_ids for source in ("check", "met")]
    return names


def is_proportion(metric: str) -> bool:
    """Whether METRIC is a 0/1 rate per response (Wilson intervals and the exact sign test apply)."""
    return metric in PROPORTIONS or metric == "all_checks_met" or metric.startswith("items/")


def clusters(rows: list[dict], metric: str, prompts: list[int]) -> list[list[float | None]]:
    """One list per prompt index (in PROMPTS order) of METRIC's values over that prompt's samples."""
    by_prompt: dict[int, list[float | None]] = {p: [] for p in prompts}
    for row in rows:
        by_prompt[row["prompt_index"]].append(metric_value(row, metric))
    return [by_prompt[p] for p in prompts]


def metric_interval(values: list[list[float | None]], metric: str, samples: int, seed: int) -> dict:
    """Estimate with its 95 % interval and the method used (see stats.py for the choice)."""
    flat = [v for cluster in values for v in cluster if v is not None]
    entry = {"mean": stats.pooled_mean(values), "ci_low": None, "ci_high": None, "n": len(flat),
             "n_prompts": sum(1 for c in values if any(v is not None for v in c))}
    if is_proportion(metric) and samples == 1:
        ci, entry["method"] = stats.wilson_interval(int(sum(flat)), len(flat)), "wilson"
    else:
        ci = stats.cluster_bootstrap_ci(values, seed=seed)
        entry["method"] = "bootstrap-percentile" if samples == 1 else "cluster-bootstrap-percentile"
    if ci is not None:
        entry["ci_low"], entry["ci_high"] = ci
    return entry


def paired_comparison(base: list[list[float | None]], other: list[list[float | None]], metric: str,
                      seed: int) -> dict:
    """OTHER - BASE on the prompts where both have a value: mean difference, paired interval, p-value."""
    diffs = []
    for a, b in zip(base, other, strict=True):
        ma, mb = stats.pooled_mean([a]), stats.pooled_mean([b])
        if ma is not None and mb is not None:
            diffs.append(mb - ma)
    proportion = is_proportion(metric)
    result = (stats.paired_sign if proportion else stats.paired_bootstrap)(diffs, seed=seed)
    entry = {"diff": None, "ci_low": None, "ci_high": None, "p_value": None, "n_prompts": len(diffs),
             "test": "exact-sign-test" if proportion else "paired-bootstrap"}
    if result is not None:
        entry.update(diff=result.diff, ci_low=result.low, ci_high=result.high, p_value=result.p_value)
    return entry


def summarize(rows: list[dict], models: list[str], criteria: list[str], samples: int, seed: int) -> dict:
    """eval_summary.json's content from the rollout rows (pure: the tests recompute it from the file)."""
    prompts = sorted({r["prompt_index"] for r in rows})
    per_model = {m: [r for r in rows if r["model"] == m] for m in models}
    item_ids = sorted({i for r in rows for i in (r.get("items") or {})})
    names = metric_names(criteria, item_ids)
    values = {m: {k: clusters(per_model[m], k, prompts) for k in names} for m in models}
    summary = {
        "samples": samples, "n_prompts": len(prompts), "confidence": stats.CONFIDENCE,
        "bootstrap_resamples": stats.BOOTSTRAP_RESAMPLES, "seed": seed,
        "methods": {
            "intervals": "proportions with 1 sample per prompt: Wilson score; otherwise percentile bootstrap over "
                         "prompts (cluster bootstrap: a prompt's samples are resampled together)",
            "comparisons": "per-prompt differences against the first model; paired percentile bootstrap interval; "
                           "p-value: exact sign test for proportions (exact McNemar with 1 sample), paired "
                           "bootstrap test for scores",
        },
        "models": [{"model": m, "n": len(per_model[m]),
                    "metrics": {k: metric_interval(v, k, samples, seed) for k, v in values[m].items()}}
                   for m in models],
        "comparisons": [],
    }
    for m in models[1:]:
        summary["comparisons"].append({
            "model": m, "baseline": models[0],
            "metrics": {k: paired_comparison(values[models[0]][k], values[m][k], k, seed) for k in values[m]},
        })
    return summary


def format_table(summary: dict) -> str:
    """A plain-text table: one row per metric, one column per model, then the paired differences."""
    def cell(e: dict) -> str:
        if e.get("mean") is None:
            return "n/a"
        return f"{e['mean']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"

    models = summary["models"]
    names = list(models[0]["metrics"]) if models else []
    header = ["metric", *[m["model"] for m in models]]
    body = [[k, *[cell(m["metrics"][k]) for m in models]] for k in names]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *body]]
    for comp in summary["comparisons"]:
        lines.append(f"\n{comp['model']} - {comp['baseline']} (paired over prompts):")
        for k, e in comp["metrics"].items():
            if e["diff"] is not None:
                lines.append(f"  {k}: {e['diff']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] "
                             f"p={e['p_value']:.3g} ({e['test']}, {e['n_prompts']} prompts)")
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------


def evaluate(cfg, models: list[str], output: str | Path, split: str | None = None, limit: int = 0,
             samples: int = 1, batch_size: int = 16) -> dict:
    """Evaluate MODELS on the held-out split; write eval_rollouts.jsonl and eval_summary.json; return the summary."""
    if not models:
        raise ValueError("evaluate: give at least one model")
    if len(set(models)) != len(models):
        raise ValueError(f"evaluate: a model is named twice in {models}")
    if samples < 1:
        raise ValueError(f"--samples {samples}: must be at least 1")
    out = Path(output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    split = split or cfg.eval_split
    loaded = data_mod.load_rows(cfg, split)
    dataset = loaded.dataset.select(range(min(limit, len(loaded.dataset)))) if limit > 0 else loaded.dataset
    dataset = data_mod.build_prompts(dataset, cfg)
    questions, truths, conversations = list(dataset["question"]), list(dataset["answer"]), list(dataset["prompt"])
    truths = [t if t and t.strip() else None for t in truths]  # rows with their own rubric may have none
    own = [from_json(r) for r in dataset["rubric"]] if "rubric" in dataset.column_names else [()] * len(questions)
    resolved = [resolve_eval_model(m, cfg.cache_dir) for m in models]  # bad specs fail before anything loads
    rubric = Rubric.from_config(cfg)
    teacher = build_teacher(cfg, rubric, cache_path=out / "judgements.sqlite")
    tmp = out / (ROLLOUTS_FILE + ".partial")
    tmp.unlink(missing_ok=True)
    writer = JsonlWriter(tmp)
    loop = asyncio.new_event_loop()  # one loop for every call: the teacher's client is bound to its loop
    try:
        loop.run_until_complete(teacher.health_check())  # fail fast, before any model is loaded
        for spec, res in zip(models, resolved, strict=True):
            logger.info("Evaluating %s on %d prompts of split %s, %d sample(s) each", spec, len(dataset), split,
                        samples)
            model, tokenizer = load_eval_model(res)
            responses = generate_responses(
                model, tokenizer, conversations, max_new_tokens=cfg.max_new_tokens,
                max_prompt_tokens=cfg.max_seq_length, samples=samples, temperature=cfg.temperature,
                top_p=cfg.top_p, top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty,
                batch_size=batch_size, seed=cfg.seed)
            del model
            _free_memory()
            flat = [(p, s, text) for p, texts in enumerate(responses) for s, text in enumerate(texts)]
            requests = [JudgeRequest(questions[p], text, truths[p], rubric=own[p]) for p, _, text in flat]
            judgements = []
            for start in range(0, len(requests), JUDGE_CHUNK):
                judgements += loop.run_until_complete(teacher.judge(requests[start:start + JUDGE_CHUNK]))
                logger.info("%s: graded %d/%d responses", spec, len(judgements), len(requests))
            graded = grade_rows(cfg, rubric, judgements, [questions[p] for p, _, _ in flat],
                                [t for _, _, t in flat], [truths[p] for p, _, _ in flat], [own[p] for p, _, _ in flat])
            writer.write_many([{"model": spec, "prompt_index": p, "sample_index": s, **row}
                               for (p, s, _), row in zip(flat, graded, strict=True)])
            writer.sync()
    finally:
        try:
            loop.run_until_complete(teacher.aclose())
        finally:
            loop.close()
            writer.close()
    os.replace(tmp, out / ROLLOUTS_FILE)
    rows = read_jsonl(out / ROLLOUTS_FILE)
    summary = summarize(rows, models, rubric.names, samples, cfg.seed)
    summary.update(split=split, limit=limit, dataset=cfg.dataset_name,
                   model_paths={r.spec: r.adapter or r.path for r in resolved},
                   teacher_usage=usage_summary(teacher.usage))
    part = out / (SUMMARY_FILE + ".partial")
    part.write_text(json.dumps(json.loads(dumps(summary)), indent=2) + "\n", encoding="utf-8")
    os.replace(part, out / SUMMARY_FILE)
    return summary


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
