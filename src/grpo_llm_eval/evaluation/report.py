"""`grpo_llm_eval report RUN_DIR`: one self-contained HTML file (default RUN_DIR/report.html) about a run.

It opens offline and requests nothing: plots are matplotlib figures inlined as SVG, style and script are
inline, and the page's Content-Security-Policy forbids any network access. Sections: overview, plots over
steps from metrics.jsonl (only what the run recorded: one line names the plots left out), the judge's
calibration (calibration.json from `--calibration DIR`, `--eval DIR` or RUN_DIR; see report_calibration.py),
evaluation results (eval_summary.json in RUN_DIR or `--eval DIR`), and a filterable table of the last
`max_rows` rollouts from rollouts.jsonl (default 2000, so that a long run still gives a file a browser opens
quickly; the page says when rows were left out). Every text from the run is HTML-escaped: completions and
feedback are untrusted model output.
"""

from __future__ import annotations

import json
import logging
import math
import re
from html import escape
from pathlib import Path

import yaml

from grpo_llm_eval.evaluation.report_assets import page, svg_figure
from grpo_llm_eval.evaluation.report_calibration import calibration_section, load_calibration
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.run_dir import RunDirError

logger = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 2000
CRITERIA_KEY = re.compile(r"^criteria/(.+)/mean$")
ITEM_KEY = re.compile(r"^items/(.+)/(teacher|check)_pass_rate$")  # examples' own rubric items (evaluation/items.py)
# One registry of plots: (title, [(metric key, legend label)]). "criteria" expands to every criteria/<name>/mean;
# "agreement" is the verifier's accuracy beside the teacher's answer score divided by the answer scale's maximum.
PLOTS: list[tuple[str, list[tuple[str, str]] | str]] = [
    ("Reward (mean and std over completions)", [("reward", "mean"), ("reward_std", "std")]),
    ("Verifier answer accuracy beside the teacher's answer score (scaled to 0-1)", "agreement"),
    ("Judge monitors: teacher vs verifier answer AUC, reward-length rank correlation",
     [("monitor/answer_auc", "answer AUC"), ("monitor/length_corr", "reward-length corr")]),
    ("Rubric criteria (mean score)", "criteria"),
    ("Rubric items: the teacher's pass rate per item", "items_teacher"),
    ("Rubric items: the programmatic check's pass rate per item", "items_check"),
    ("KL to the reference model", [("kl", "kl")]),
    ("Policy loss", [("loss", "loss")]),
    ("SFT loss on teacher feedback", [("sft_loss", "sft_loss")]),
    ("Judge failure rate", [("judge/failure_rate", "failure rate")]),
    ("Judge latency (s, uncached calls)", [("judge/latency_mean_s", "latency")]),
    ("Teacher tokens per step", [("judge/prompt_tokens", "prompt"), ("judge/cached_prompt_tokens", "prompt, cached"),
                                 ("judge/completion_tokens", "completion")]),
    ("Teacher cost, run total (US$)", [("judge/total_cost_usd", "total"), ("judge/cost_usd", "per step")]),
    ("Share of groups with tied rewards", [("frac_reward_zero_std", "tied groups")]),
    ("Time per step (s)", [("step_time", "step"), ("time/generate_s", "generate"), ("time/judge_s", "judge")]),
    ("Evaluation during training", [("eval/answer_accuracy", "answer accuracy"), ("eval/teacher_reward", "teacher reward"),
                                    ("eval/judge_failure_rate", "judge failure rate"),
                                    ("eval/constraint_share", "checks met"), ("eval/all_checks_met", "all checks met")]),
]
TABLE_COLUMNS = ("step", "group", "question", "completion", "feedback", "scores", "reward", "advantage", "judge_status")


def build_report(run_dir: str | Path, output: str | Path | None = None, eval_dir: str | Path | None = None,
                 max_rows: int = DEFAULT_MAX_ROWS, calibration_dir: str | Path | None = None) -> Path:
    """Write the report of RUN_DIR to OUTPUT (default RUN_DIR/report.html); returns its path."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise RunDirError(f"report: {run} is not a folder; give a run folder (it holds metrics.jsonl).")
    if not (run / "metrics.jsonl").exists() and not (run / "rollouts.jsonl").exists():
        raise RunDirError(f"report: {run} holds neither metrics.jsonl nor rollouts.jsonl; is it a run folder?")
    metrics = read_jsonl(run / "metrics.jsonl")
    rollouts = read_jsonl(run / "rollouts.jsonl")
    calibration = load_calibration(run, calibration_dir, eval_dir)
    summary = load_eval_summary(run, eval_dir, required=calibration is None)
    cfg = _read_config(run)
    title = f"GRPO run report: {run.name}"
    body = "\n".join([
        f"<header><h1>{escape(title)}</h1><div class=\"muted\">{escape(str(run.resolve()))}</div></header><main>",
        overview(cfg, metrics, rollouts),
        "<h2 id=\"plots\">Training curves</h2>",
        judge_alarms(metrics),
        *render_plots(metrics, answer_max=_answer_max(cfg)),
        calibration_section(calibration) if calibration is not None else "",
        eval_section(summary),
        rollout_table(rollouts, max_rows),
        "</main>",
    ])
    out = Path(output).expanduser() if output else run / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text(page(escape(title), body), encoding="utf-8")
    tmp.replace(out)
    if eval_dir is not None or calibration_dir is not None:  # the card of final/ names the numbers given here
        from grpo_llm_eval.training.model_card import write_card

        card = write_card(run, eval_summary=summary, calibration=calibration)
        if card is not None:
            logger.info("Model card with this evaluation: %s", card)
    return out


# ---- data ----------------------------------------------------------------------------------------


def _read_config(run: Path) -> dict:
    try:
        data = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _answer_max(cfg: dict) -> float:
    """The top of the answer criterion's scale in the run's config (10 for the seed rubric)."""
    for c in cfg.get("criteria") or []:
        if isinstance(c, dict) and c.get("name") == "answer" and isinstance(c.get("max"), (int, float)):
            return float(c["max"]) or 10.0
    return 10.0


def load_eval_summary(run: Path, eval_dir: str | Path | None, required: bool = True) -> dict | None:
    """eval_summary.json from EVAL_DIR (a folder or the file itself), else from the run folder, else None.

    REQUIRED: a given EVAL_DIR without one is an error (not when it held a calibration instead)."""
    candidates = []
    if eval_dir is not None:
        path = Path(eval_dir).expanduser()
        candidates.append(path if path.is_file() else path / "eval_summary.json")
    candidates.append(run / "eval_summary.json")
    for path in candidates:
        if path.is_file():
            try:
                return json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                logger.warning("report: cannot read %s (%s); evaluation left out", path, exc)
                return None
    if eval_dir is not None and required:
        raise RunDirError(f"report: --eval {eval_dir}: no eval_summary.json there; run `grpo_llm_eval evaluate` first.")
    return None


def series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of KEY over the logged rows that carry a finite number for it."""
    steps, values = [], []
    for row in metrics:
        value, step = row.get(key), row.get("step")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and isinstance(step, (int, float)):
            steps.append(step)
            values.append(float(value))
    return steps, values


def judge_alarms(metrics: list[dict]) -> str:
    """The judge monitors' alarms (event rows of metrics.jsonl), one line each; nothing when none was raised."""
    alarms = [m for m in metrics if m.get("event") == "judge_alarm"]
    if not alarms:
        return ""
    items = "".join(f"<li><b>{escape(str(a.get('alarm')))}</b> ({escape(str(a.get('action')))}): "
                    f"{escape(str(a.get('message')))}</li>" for a in alarms)
    return f"<div class=\"alarms\"><h3>Judge alarms</h3><ul>{items}</ul></div>"


# ---- plots ---------------------------------------------------------------------------------------


def render_plots(metrics: list[dict], answer_max: float = 10.0) -> list[str]:
    """The plots the run recorded as inline SVG charts in a grid, then one line naming those left out."""
    criteria = sorted({m.group(1) for row in metrics for k in row if (m := CRITERIA_KEY.match(k))})
    blocks, absent = [], []
    for title, spec in PLOTS:
        lines = [(f"criteria/{c}/mean", c) for c in criteria] if spec == "criteria" else spec
        if spec in ("items_teacher", "items_check"):
            source = spec.split("_")[1]
            lines = sorted({(k, m.group(1)) for row in metrics for k in row
                            if (m := ITEM_KEY.match(k)) and m.group(2) == source})
        if spec == "agreement":
            lines = [("verifier/answer_accuracy", "verifier accuracy"), ("criteria/answer/mean", "teacher answer score")]
        data = [(label, *series(metrics, key)) for key, label in lines]
        data = [(label, steps, [v / answer_max for v in values] if label == "teacher answer score" else values)
                for label, steps, values in data if steps]
        if not data:
            absent.append(title)
            continue
        blocks.append(f"<div class=\"plot\"><h3>{escape(title)}</h3>{svg_chart(data)}</div>")
    out = ["<div class=\"plots\">" + "".join(blocks) + "</div>"]
    if absent:
        out.append(f"<p class=\"note\">Not recorded in this run: {escape('; '.join(absent))}.</p>")
    return out


def svg_chart(data: list[tuple[str, list[float], list[float]]]) -> str:
    """A line chart of (label, steps, values) series as an inline <svg> element."""
    from matplotlib.ticker import MaxNLocator

    def draw(ax):
        for label, steps, values in data:
            ax.plot(steps, values, marker="o" if len(steps) <= 40 else None, markersize=3, linewidth=1.4, label=label)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(data) > 1:
            ax.legend(fontsize=8, frameon=False)

    return svg_figure(draw)


# ---- sections ------------------------------------------------------------------------------------


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def overview(cfg: dict, metrics: list[dict], rollouts: list[dict]) -> str:
    """Cards with the run's headline facts."""
    steps = max((r["step"] for r in metrics if isinstance(r.get("step"), (int, float))), default=0)
    rewards = [r["reward"] for r in rollouts if isinstance(r.get("reward"), (int, float))]
    failed = sum(1 for r in rollouts if r.get("judge_status") not in (None, "ok"))
    cards = [
        ("student", cfg.get("student_model_name", "?")), ("teacher", cfg.get("teacher_model_name", "?")),
        ("teacher backend", cfg.get("teacher_backend", "?")), ("steps logged", steps),
        ("group size", cfg.get("num_return_sequences", "?")), ("rollouts", len(rollouts)),
        ("mean reward", sum(rewards) / len(rewards) if rewards else None),
        ("judge failures", f"{failed} / {len(rollouts)}"),
    ]
    spent = next((r for r in reversed(metrics) if isinstance(r.get("judge/total_calls"), (int, float))), None)
    if spent is not None:  # the run's teacher totals as of its last step
        cards += [("teacher calls", int(spent["judge/total_calls"])),
                  ("teacher tokens", int(spent.get("judge/total_prompt_tokens", 0)
                                         + spent.get("judge/total_completion_tokens", 0)))]
        prompt, cached = spent.get("judge/total_prompt_tokens", 0), spent.get("judge/total_cached_prompt_tokens")
        if isinstance(cached, (int, float)) and prompt:  # what the server read from its prompt cache
            cards.append(("cached prompt share", f"{cached / prompt:.1%}"))
        if isinstance(spent.get("judge/total_cost_usd"), (int, float)):
            cards.append(("teacher cost (US$)", spent["judge/total_cost_usd"]))
    switched = next((r["step"] for r in metrics if r.get("judge/verifier_only") and isinstance(r.get("step"), int)), None)
    if switched is not None:  # on_budget_end: verifier_only
        cards.append(("teacher budget spent: verifiers only from step", switched))
    inner = "".join(f"<div class=\"card\"><span class=\"muted\">{escape(k)}</span><b>{escape(_fmt(v) or 'n/a')}</b></div>"
                    for k, v in cards)
    return f"<h2 id=\"overview\">Overview</h2><div class=\"cards\">{inner}</div>"


def eval_section(summary: dict | None) -> str:
    """Evaluation results: per-model estimates with intervals, and the paired comparisons."""
    if not summary or not summary.get("models"):
        return ("<h2 id=\"evaluation\">Evaluation</h2><p class=\"note\">No evaluation results (run `grpo_llm_eval "
                "evaluate ... --output RUN_DIR`, or pass --eval DIR).</p>")
    models = summary["models"]
    names = list(models[0]["metrics"])

    def cell(e: dict) -> str:
        return "n/a" if e.get("mean") is None else f"{_fmt(e['mean'], 4)} {_interval(e)}".strip()

    head = "".join(f"<th>{escape(m['model'])}</th>" for m in models)
    rows = "".join(f"<tr><td>{escape(k)}</td>" + "".join(f"<td class=\"num\">{escape(cell(m['metrics'][k]))}</td>"
                                                          for m in models) + "</tr>" for k in names)
    parts = [
        "<h2 id=\"evaluation\">Evaluation</h2>",
        f"<p class=\"muted\">split {escape(str(summary.get('split', '?')))}, {escape(str(summary.get('n_prompts', '?')))} "
        f"prompts, {escape(str(summary.get('samples', '?')))} sample(s) per prompt; "
        f"{escape(str(round(100 * summary.get('confidence', 0.95))))} % intervals. "
        f"{escape(str(summary.get('methods', {}).get('intervals', '')))}</p>",
        f"<table class=\"eval\"><thead><tr><th>metric</th>{head}</tr></thead><tbody>{rows}</tbody></table>",
    ]
    for comp in summary.get("comparisons", []):
        body = "".join(
            f"<tr><td>{escape(k)}</td><td class=\"num\">{escape(_fmt(e['diff']))}</td><td class=\"num\">"
            f"{escape(_interval(e))}</td>"
            f"<td class=\"num\">{escape(_fmt(e['p_value'], 3))}</td><td>{escape(e['test'])}</td>"
            f"<td class=\"num\">{escape(str(e['n_prompts']))}</td></tr>"
            for k, e in comp["metrics"].items())
        parts.append(f"<h3>{escape(comp['model'])} minus {escape(comp['baseline'])} (paired over prompts)</h3>"
                     "<table class=\"comparison\"><thead><tr><th>metric</th><th>difference</th><th>interval</th>"
                     f"<th>p-value</th><th>test</th><th>prompts</th></tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(parts)


def _interval(e: dict) -> str:
    return "" if e.get("ci_low") is None else f"[{_fmt(e['ci_low'], 3)}, {_fmt(e['ci_high'], 3)}]"


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):  # a conversational prompt: its last user turn
        users = [m.get("content", "") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else json.dumps(value, ensure_ascii=False)
    return _fmt(value)


def rollout_table(rollouts: list[dict], max_rows: int) -> str:
    """The last MAX_ROWS rollouts as a table with a text filter and a judge_status select."""
    shown = rollouts[-max_rows:] if max_rows > 0 else []
    statuses = sorted({str(r.get("judge_status")) for r in shown})
    options = "<option value=\"\">all</option>" + "".join(
        f"<option value=\"{escape(s)}\">{escape(s)}</option>" for s in statuses)
    note = ""
    if len(shown) < len(rollouts):
        note = (f"<p class=\"note\">Showing the last {len(shown)} of {len(rollouts)} rollouts (the table is capped "
                f"at --max-rows {max_rows} rows so the page stays fast; rollouts.jsonl holds them all).</p>")
    body = []
    for r in shown:
        status = str(r.get("judge_status"))
        cells = []
        for col in TABLE_COLUMNS:
            value = r.get(col)
            if col == "question":
                value = r.get("question") if r.get("question") is not None else r.get("prompt")
            text = escape(_text(value))
            if col in ("question", "completion", "feedback"):
                cells.append(f"<td><div class=\"text\">{text}</div></td>")
            elif col == "judge_status":
                cells.append(f"<td class=\"{'status-ok' if status == 'ok' else 'status-bad'}\">{text}</td>")
            elif col == "scores":
                cells.append(f"<td>{text}</td>")
            else:
                cells.append(f"<td class=\"num\">{text}</td>")
        body.append(f"<tr data-status=\"{escape(status)}\">{''.join(cells)}</tr>")
    head = "".join(f"<th>{escape(c)}</th>" for c in TABLE_COLUMNS)
    return (
        "<h2 id=\"rollouts-section\">Rollouts</h2>" + note +
        "<div class=\"controls\"><input id=\"rollout-filter\" type=\"search\" placeholder=\"filter: any text in a row\" "
        f"aria-label=\"filter rollouts\"><label>judge_status <select id=\"status-filter\">{options}</select></label>"
        f"<span class=\"muted\"><span id=\"rollout-shown\">{len(shown)}</span> of {len(shown)} rows shown</span></div>"
        f"<table id=\"rollouts\"><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )
