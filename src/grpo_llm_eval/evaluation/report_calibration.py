"""The report's calibration section: the judge measured against the verifier by `grpo_llm_eval calibrate`.

It shows the verdict, calibration.json's numbers with their intervals and reasons for nulls, a ROC curve of the
teacher's answer score against the verifier's answer check, and the teacher's reward against response length
(right and wrong answers apart: a judge without length bias gives flat clouds), read from the
calibration_rollouts.jsonl beside calibration.json.
"""

from __future__ import annotations

import json
import logging
import math
from html import escape
from pathlib import Path

from grpo_llm_eval.evaluation.report_assets import svg_figure
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.run_dir import RunDirError

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
ROLLOUTS_FILE = "calibration_rollouts.jsonl"
SHOWN = ("answer_auc", "reward_auc", "length_bias", "self_disagreement", "position_flip_rate", "master_key_pass_rate",
         "judge_failure_rate")


def load_calibration(run: Path, calibration_dir, eval_dir) -> dict | None:
    """calibration.json (with its rollouts under "_rows") from CALIBRATION_DIR, else EVAL_DIR, else RUN; or None.

    A given CALIBRATION_DIR (a folder or the file) without one is an error that says how to make one.
    """
    candidates = []
    for given in (calibration_dir, eval_dir):
        if given is not None:
            path = Path(given).expanduser()
            candidates.append(path if path.is_file() and path.name == CALIBRATION_FILE else path / CALIBRATION_FILE)
    candidates.append(run / CALIBRATION_FILE)
    for path in candidates:
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                logger.warning("report: cannot read %s (%s); calibration left out", path, exc)
                return None
            data["_rows"] = read_jsonl(path.parent / ROLLOUTS_FILE)
            return data
    if calibration_dir is not None:
        raise RunDirError(f"report: --calibration {calibration_dir}: no {CALIBRATION_FILE} there; run "
                          "`grpo_llm_eval calibrate --output DIR` first.")
    return None


def _num(value, signed: bool = False) -> str:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "null"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _roc_svg(points: list) -> str:
    def draw(ax):
        ax.plot([0, 1], [0, 1], linestyle="--", linewidth=1, color="grey", label="chance")
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, linewidth=1.4,
                label="teacher's answer score")
        ax.set_xlabel("false positive rate (wrong answers scored at or above the threshold)")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, frameon=False)

    return svg_figure(draw, size=(5.6, 3.6))


def _length_svg(rows: list[dict]) -> str:
    def draw(ax):
        for label, right, marker in (("right (verifier)", True, "o"), ("wrong (verifier)", False, "x")):
            pts = [(len(r.get("response") or ""), r["teacher_reward"]) for r in rows
                   if r.get("answer_correct") is right and isinstance(r.get("teacher_reward"), (int, float))]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, marker=marker, alpha=0.6, label=label)
        ax.set_xlabel("response length (characters)")
        ax.set_ylabel("teacher reward")
        ax.legend(fontsize=8, frameon=False)

    return svg_figure(draw, size=(5.6, 3.6))


def calibration_section(cal: dict) -> str:
    """The section's HTML: verdict, table, ROC curve and reward vs length (charts only where there is data)."""
    reasons = cal.get("null_reasons") or {}
    rows = []
    for key in SHOWN:
        value = _num(cal.get(key), signed=key == "length_bias")
        ci = cal.get(f"{key}_ci")
        if ci:
            value += f" [{_num(ci[0])}, {_num(ci[1])}]"
        note = reasons.get(key, "")
        if key == "master_key_pass_rate" and cal.get("master_keys_passed"):
            note = "passed: " + ", ".join(repr(k) for k in cal["master_keys_passed"])
        if key == "answer_auc":
            note = (f"{cal.get('n_right', 0)} right, {cal.get('n_wrong', 0)} wrong responses; " + note).strip("; ")
        rows.append(f"<tr><td>{escape(key)}</td><td class=\"num\">{escape(value)}</td><td>{escape(note)}</td></tr>")
    source = cal.get("responses") or f"{cal.get('model')} ({cal.get('samples')} samples per prompt)"
    parts = [
        "<h2 id=\"calibration\">Judge calibration</h2>",
        f"<p><b>{escape(str(cal.get('verdict', '')))}</b></p>",
        f"<p class=\"muted\">teacher {escape(str(cal.get('teacher')))} ({escape(str(cal.get('teacher_backend')))}, "
        f"{escape(str(cal.get('judge_mode', 'pointwise')))}), responses of {escape(str(source))} to "
        f"{escape(str(cal.get('n_prompts')))} prompts; answer score: {escape(str(cal.get('answer_score')))}; "
        "95 % intervals by bootstrap over prompts.</p>",
        "<table class=\"calibration\"><thead><tr><th>measure</th><th>value</th><th>note</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>",
    ]
    charts = []
    if cal.get("answer_roc"):
        charts.append(f"<div class=\"plot\"><h3>ROC: teacher's answer score vs the verifier</h3>"
                      f"{_roc_svg(cal['answer_roc'])}</div>")
    samples = [r for r in cal.get("_rows", []) if r.get("kind") == "sample"]
    if any(isinstance(r.get("teacher_reward"), (int, float)) and r.get("answer_correct") is not None for r in samples):
        charts.append(f"<div class=\"plot\"><h3>Teacher reward vs response length</h3>{_length_svg(samples)}</div>")
    if charts:
        parts.append("<div class=\"plots\">" + "".join(charts) + "</div>")
    return "\n".join(parts)
