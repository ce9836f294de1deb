"""The model card of a run, written with `huggingface_hub.ModelCard` into final/README.md and the run folder.

`final/` is what a user pushes to the Hub, so its README.md says what the model is and how it was made: the
student it started from (`base_model`: the Hub id, or for a bundled model the model it was made from), the
teacher (model, backend, and its URL without credentials or query), the rubric's criteria and weights, the
reward mix, the data, the steps, what the teacher was paid in calls and tokens (metrics.jsonl's `judge/total_*`),
and the last `evaluate` summary and `calibrate` verdict where the run has them. It is built from the run folder's
own files (config.yaml, metrics.jsonl, final/), so `grpo_llm_eval report --eval/--calibration` can write it again
later. The run folder's README.md is the same card (TRL's generic card, which names base model "None", is no
longer written: see TeacherGRPOTrainer.create_model_card).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from grpo_llm_eval.config import Config
from grpo_llm_eval.config.load import to_dict

logger = logging.getLogger(__name__)


class PushError(Exception):
    """The upload of final/ to the Hub failed; the message names the repo, where the model is, and how to retry."""

CARD_TAGS = ["grpo", "trl", "llm-judge"]
# The Hub model each bundled model was converted from (models.BUNDLED_MODELS holds where its file is).
BUNDLED_ORIGINS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DATA_FILE = re.compile(r"\.(jsonl|json|csv|parquet|arrow|txt)$", re.IGNORECASE)


def base_model_of(name: str) -> str | None:
    """The Hub id a student came from: its own for a Hub model, the origin of a bundled one, the `base_model` of a
    local folder's own card (a previous run's final/); None where no Hub id is known."""
    if name.startswith("bundled:"):
        return BUNDLED_ORIGINS.get(name.split(":", 1)[1])
    local = Path(name).expanduser()
    if local.exists():
        return _card_base_model(local / "README.md")
    return name if _HUB_ID.fullmatch(name) else None


def _card_base_model(path: Path) -> str | None:
    from huggingface_hub import ModelCard

    if not path.is_file():
        return None
    try:
        base = ModelCard.load(path).data.base_model
    except Exception:  # not a card: a plain README
        return None
    base = base[0] if isinstance(base, list) and base else base
    return base if isinstance(base, str) and _HUB_ID.fullmatch(base) else None


def hub_dataset_of(name: str) -> str | None:
    """NAME when it is a Hub dataset id (not bundled, not a local file or folder), else None."""
    if name.startswith("bundled:") or _DATA_FILE.search(name) or Path(name).expanduser().exists():
        return None
    return name if _HUB_ID.fullmatch(name) else None


def safe_url(url: str) -> str:
    """A URL fit to publish: no user:password@, no query or fragment (where API keys hide)."""
    parts = urlsplit(url.strip())
    if not parts.scheme or not parts.hostname:
        return ""
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _urls(value) -> list[str]:
    """One URL or several (a list, or separated by commas or spaces), each made safe."""
    items = value if isinstance(value, list) else re.split(r"[,\s]+", str(value or ""))
    return [u for u in (safe_url(str(v)) for v in items if str(v).strip()) if u]


# ---- what the run folder holds ------------------------------------------------------------------------------


def _settings(run: Path) -> dict:
    """The run's config.yaml over the defaults (a run from an older release may lack newer keys)."""
    data = {}
    try:
        data = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        logger.warning("model card: cannot read %s/config.yaml (%s); the card leaves the settings out", run, exc)
    return {**to_dict(Config()), **(data if isinstance(data, dict) else {})}


def _metrics(run: Path) -> tuple[int, dict]:
    """(steps trained, the run's last teacher totals) from metrics.jsonl."""
    from grpo_llm_eval.training.records import read_jsonl

    steps, spend = 0, {}
    for row in read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []:
        if isinstance(row.get("step"), (int, float)):
            steps = max(steps, int(row["step"]))
        totals = {k[len("judge/total_"):]: v for k, v in row.items() if k.startswith("judge/total_")}
        if totals:
            spend = totals
    return steps, spend


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("model card: cannot read %s (%s); left out", path, exc)
        return None
    return data if isinstance(data, dict) else None


# ---- the card -------------------------------------------------------------------------------------------


def build_card(run: str | Path, final_dir: str | Path | None = None, eval_summary: dict | None = None,
               calibration: dict | None = None):
    """The card of RUN's final model (FINAL_DIR: where it is now, by default RUN/final) as a
    `huggingface_hub.ModelCard`. EVAL_SUMMARY and CALIBRATION default to the run's eval_summary.json and
    calibration.json."""
    from huggingface_hub import ModelCard, ModelCardData

    run = Path(run)
    final = Path(final_dir) if final_dir is not None else run / "final"
    s = _settings(run)
    steps, spend = _metrics(run)
    eval_summary = eval_summary if eval_summary is not None else _read_json(run / "eval_summary.json")
    calibration = calibration if calibration is not None else _read_json(run / "calibration.json")
    base = base_model_of(str(s["student_model_name"]))
    dataset = hub_dataset_of(str(s["dataset_name"]))
    tags = CARD_TAGS + (["lora"] if s["lora"].get("enabled") else [])
    data = ModelCardData(base_model=base, datasets=[dataset] if dataset else None, library_name="transformers",
                         tags=tags, pipeline_tag="text-generation")
    sections = [
        f"# {run.name}\n\nA student LLM improved with GRPO (TRL's `GRPOTrainer`) on the grades a teacher LLM gave its "
        "answers against a rubric, trained with `grpo_llm_eval`.",
        _models_section(s, base, final),
        _rubric_section(s),
        _training_section(s, steps, dataset),
        _spend_section(spend),
        _eval_section(eval_summary),
        _calibration_section(calibration),
        _quick_start(s, run),
    ]
    text = "\n\n".join(part for part in sections if part)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}\n")


def _models_section(s: dict, base: str | None, final: Path) -> str:
    student = s["student_model_name"]
    origin = f" (made from [{base}](https://huggingface.co/{base}))" if base and base != student else ""
    lora = s["lora"]
    if lora.get("enabled"):
        how = f"LoRA adapter (r {lora.get('r')}, alpha {lora.get('alpha')})"
        if (final / "merged").is_dir():
            how += "; the merged full model is in `merged/`"
    else:
        how = "full fine-tune"
    lines = ["## Student and teacher", "", f"- Student: `{student}`{origin}; {how}."]
    if float(s["teacher_weight"]) > 0:
        urls = _urls(s["openai_base_url"]) if s["teacher_backend"] == "openai" else []
        where = f", served at {', '.join(urls)}" if urls else ""
        lines.append(f"- Teacher: `{s['teacher_model_name']}`, backend `{s['teacher_backend']}`{where}; "
                     f"judge mode `{s['judge_mode']}`.")
    else:
        lines.append("- Teacher: none (teacher_weight 0: verifier rewards only).")
    return "\n".join(lines)


def _criteria(s: dict) -> list[tuple[str, float, str]]:
    from grpo_llm_eval.teacher.grading.rubric import seed_criteria

    if s.get("criteria"):
        return [(str(c.get("name")), float(c.get("weight", 1.0)), str(c.get("description", ""))) for c in s["criteria"]]
    return [(c.name, c.weight, c.description) for c in
            seed_criteria(s["thought_process_weight"], s["answer_weight"], s["format_weight"])]


def _cell(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace("|", "\\|").replace("\n", " ")


def _rubric_section(s: dict) -> str:
    if float(s["teacher_weight"]) <= 0:
        return ""
    rows = [f"| `{_cell(n)}` | {w:g} | {_cell(d)} |" for n, w, d in _criteria(s)]
    return "\n".join(["## Rubric", "", "The teacher scores each criterion; its reward is the sum of weight x score.",
                      "", "| criterion | weight | description |", "| --- | --- | --- |", *rows])


def _training_section(s: dict, steps: int, dataset: str | None) -> str:
    mix = [f"{float(s['teacher_weight']):g} x the teacher's rubric reward"] if float(s["teacher_weight"]) > 0 else []
    if float(s["verifier_answer_weight"]) > 0:
        mix.append(f"{float(s['verifier_answer_weight']):g} x the verifier's answer check (1 right, 0 wrong)")
    if float(s["verifier_format_weight"]) > 0:
        mix.append(f"{float(s['verifier_format_weight']):g} x the think-tag format check")
    name = f"[{dataset}](https://huggingface.co/datasets/{dataset})" if dataset else f"`{s['dataset_name']}`"
    lines = ["## Training", "",
             f"- Reward: {' + '.join(mix) or 'none'}; a failed grade is masked, not scored.",
             f"- Data: {name}, split `{s['dataset_split']}` (question `{s['dataset_question_column']}`, answer "
             f"`{s['dataset_answer_column']}`).",
             f"- Steps: {steps} of {s['total_steps']}; {s['prompts_per_step']} prompts x {s['num_return_sequences']} "
             f"completions a step, learning rate {s['learning_rate']:g}, KL beta {s['grpo_beta']:g}."]
    if float(s["sft_beta"]) > 0:
        lines.append(f"- SFT term: sft_beta {s['sft_beta']:g} on the `{s['sft_target']}` target.")
    trl = {k: v for k, v in (s.get("trl") or {}).items() if k != "hub_token"}
    if trl:
        lines.append("- TRL settings: " + ", ".join(f"`{k}: {v}`" for k, v in trl.items()) + ".")
    return "\n".join(lines)


def _spend_section(spend: dict) -> str:
    if not spend:
        return ""
    text = (f"{int(spend.get('calls', 0)):,} teacher calls, {int(spend.get('prompt_tokens', 0)):,} prompt + "
            f"{int(spend.get('completion_tokens', 0)):,} completion tokens")
    if spend.get("cost_usd") is not None:
        text += f", ${float(spend['cost_usd']):.4f}"
    return f"## Teacher spend\n\n{text} (the whole run, every process, resumes included)."


def _table(data: dict, format_table, what: str) -> str | None:
    """FORMAT_TABLE(DATA), or None (and a warning) when DATA has an unexpected shape."""
    try:
        return format_table(data)
    except (KeyError, TypeError, ValueError) as exc:
        logger.warning("model card: the %s has an unexpected shape (%s); left out", what, exc)
        return None


def _eval_section(summary: dict | None) -> str:
    from grpo_llm_eval.evaluation.evaluate import format_table

    table = _table(summary, format_table, "evaluation summary") if summary else None
    if table is None:
        return ""
    return ("## Evaluation\n\nThe last `grpo_llm_eval evaluate` (mean [95 % interval]; paired differences against "
            f"the first model):\n\n```text\n{table}\n```")


def _calibration_section(calibration: dict | None) -> str:
    from grpo_llm_eval.evaluation.calibrate import format_table

    table = _table(calibration, format_table, "calibration") if calibration else None
    if table is None:
        return ""
    return (f"## Teacher calibration\n\nVerdict: {calibration.get('verdict')}\n\nThe teacher measured against the "
            f"verifier by `grpo_llm_eval calibrate`:\n\n```text\n{table}\n```")


def _quick_start(s: dict, run: Path) -> str:
    hub_id = (s.get("trl") or {}).get("hub_model_id")
    path = hub_id or str((run / "final").resolve())
    question = "What is 12 * 7?"
    messages = ([{"role": "system", "content": s["system_prompt"]}] if s["system_prompt"] else []) + [
        {"role": "user", "content": question}]
    return "\n".join([
        "## Quick start", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"path = {path!r}  # this model's folder (or its Hub id once pushed)",
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        f"messages = {messages!r}",
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        f"output = model.generate(**inputs, max_new_tokens={int(s['max_new_tokens'])})",
        "print(tokenizer.decode(output[0][inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))",
        "```",
    ])


def write_card(run: str | Path, final_dir: str | Path | None = None, eval_summary: dict | None = None,
               calibration: dict | None = None) -> Path | None:
    """Write the card to FINAL_DIR/README.md (default RUN/final: save_final passes the folder it is staging) and
    RUN/README.md; returns the final folder's card, or None where there is no final model."""
    run = Path(run)
    final = Path(final_dir) if final_dir is not None else run / "final"
    if not final.is_dir():
        return None
    card = build_card(run, final, eval_summary, calibration)
    for path in (final / "README.md", run / "README.md"):
        tmp = path.with_name(path.name + ".partial")
        card.save(str(tmp))
        tmp.replace(path)
    return final / "README.md"


def push_final(final: str | Path, trl: dict) -> str:
    """Upload FINAL (the model with its card) to the Hub repo `trl.hub_model_id`, created if missing (private per
    `trl.hub_private_repo`), on branch `trl.hub_revision` if given. The token is the usual one: HF_TOKEN or
    `hf auth login`. Returns the commit's URL."""
    from huggingface_hub import HfApi

    final, repo, revision = Path(final), trl["hub_model_id"], trl.get("hub_revision")
    api = HfApi()
    try:
        api.create_repo(repo, private=trl.get("hub_private_repo"), exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(final), revision=revision,
                                 commit_message=f"grpo_llm_eval: the final model of run {final.parent.name}, with its card")
    except Exception as exc:  # the Hub's HTTP errors, offline mode, no token: all end the same way
        text = str(exc).strip().splitlines()
        raise PushError(f"push_to_hub: uploading {final} to {repo} failed ({text[0][:200] if text else type(exc).__name__}); "
                        f"the model and its card are saved there: push them later with `hf upload {repo} {final}`.") from None
    logger.info("Pushed %s with its card to %s", final, info.commit_url)
    return str(info.commit_url)
