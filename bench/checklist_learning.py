"""Does a checklist teacher teach? bundled:instructions on CPU, one budget for every arm, held-out checks.

Steps, one after the other (never two at once: they would share the CPU):

1. ``calibrate``: the bundled 135M teacher (configs/checklist.yaml as is) grades --calib-samples sampled answers of
   the bundled student to each of the first --calib-limit test prompts; its item scores against the programmatic
   checks give a ROC AUC per constraint type (calibration.json ``item_auc``).
2. Train the bundled student from configs/checklist.yaml on the train split, each arm for the same steps, prompts
   per step, completions per prompt, new tokens, learning rate and seed:

       teacher_135m     the bundled 135M teacher's checklist grades alone (the config as is)
       scripted_teacher a correct teacher behind the OpenAI API: grpo_llm_eval.testing.teacher_server --mode
                        scripted on loopback, which grades each checklist item with its programmatic check
       checks           the programmatic checks as the reward (teacher_weight 0, verifier_checklist_weight 1):
                        the ceiling
3. ``evaluate``: greedy answers of the base model and every arm to the held-out test prompts, checked by program
   (share of constraints met, share of prompts with all met, per constraint type), Wilson 95 % intervals and
   exact sign tests of each arm against the base, paired by prompt.

Prints Markdown tables; writes OUT/checklist_learning.json and one log per step.

    python bench/checklist_learning.py --out /tmp/bench-checklist/run --arms checks,teacher_135m --steps 6 \
        --prompts-per-step 2 --learning-rate 1e-4 --minutes 14      # bench/RESULTS.md section 11; about 40 min on 2 busy cores
    python bench/checklist_learning.py --out /tmp/bench-checklist/run8 --arms teacher_135m,checks,scripted_teacher \
        --steps 8 --prompts-per-step 4 --learning-rate 5e-5 --minutes 20    # the larger budget, all three arms
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = str(HERE.parent / "configs" / "checklist.yaml")
BASE = "bundled:smollm2-135m-instruct"
ARMS = {
    "scripted_teacher": ["teacher_backend=openai", "teacher_model_name=teacher", "teacher_logprob_scores=false",
                         "teacher_structured_output=false", "max_feedback_new_tokens=512"],
    "checks": ["teacher_weight=0", "verifier_checklist_weight=1"],
    "teacher_135m": [],
}
ORDER = ["scripted_teacher", "checks", "teacher_135m"]  # the fast arms first

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import free_port, run  # noqa: E402 (the same launcher and log handling as the ablation)


def cli(sub: str, *args: str, sets: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "grpo_llm_eval.cli", sub, "--config", CONFIG, *args]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def calibrate(out: Path, limit: int, samples: int) -> dict:
    dest = out / "calibrate"
    seconds = run(cli("calibrate", "--limit", str(limit), "--samples", str(samples), "--output", str(dest)),
                  out / "calibrate.log")
    return {"seconds": seconds, "item_auc": json.loads((dest / "calibration.json").read_text())["item_auc"]}


def train_arm(name: str, out: Path, budget: list[str]) -> float:
    sets = [f"output_dir={out}", f"run_name={name}", "save_steps=100000", *budget, *ARMS[name]]
    server, env = None, dict(os.environ)
    if name == "scripted_teacher":
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "grpo_llm_eval.testing.teacher_server", "--port", str(port),
                                   "--mode", "scripted"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(3)
        sets.append(f"openai_base_url=http://127.0.0.1:{port}/v1")
        env.setdefault("OPENAI_API_KEY", "local")  # the loopback server takes any key
    try:
        return run(cli("train", sets=sets), out / f"{name}.log", env)
    finally:
        if server is not None:
            server.terminate()
            server.wait()


def steps_done(out: Path, name: str) -> int:
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return max((r.get("step", 0) for r in rows), default=0)


def evaluate(models: list[str], out: Path, limit: int) -> dict:
    dest = out / "eval"
    cmd = cli("evaluate", "--limit", str(limit), "--samples", "1", "--output", str(dest), sets=["teacher_weight=0", "verifier_checklist_weight=1"])  # the checks measure; the teacher still grades (items/<id>/met)
    for m in models:
        cmd += ["--model", m]
    run(cmd, out / "eval.log")
    return json.loads((dest / "eval_summary.json").read_text())


def fmt(m: dict) -> str:
    if m.get("mean") is None or m.get("ci_low") is None:
        return "n/a" if m.get("mean") is None else f"{m['mean']:.3f}"
    return f"{m['mean']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"


def fmt_diff(d: dict | None) -> str:
    if not d or d.get("diff") is None:
        return ""
    return f"{d['diff']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}], p={d['p_value']:.2g}"


def calibration_lines(table: dict) -> list[str]:
    lines = ["| constraint type | items (met / not met by the check) | teacher passes | check passes | ROC AUC [95% CI] |",
             "| --- | --- | --- | --- | --- |"]
    for kind, e in table.items():
        auc = "n/a" if e["auc"] is None else f"{e['auc']:.2f}"
        ci = f" [{e['auc_ci'][0]:.2f}, {e['auc_ci'][1]:.2f}]" if e.get("auc_ci") else " (too few of a class)"
        lines.append(f"| {kind} | {e['n']} ({e['n_met']} / {e['n_unmet']}) | {e['teacher_pass_rate']:.0%} | "
                     f"{e['check_pass_rate']:.0%} | {auc}{ci} |")
    return lines


def learning_lines(summary: dict, names: list[str], steps: dict[str, int]) -> list[str]:
    models = summary["models"]
    comps = {c["model"]: c["metrics"] for c in summary.get("comparisons", [])}
    lines = ["| arm | steps | constraints met [95% CI] | vs base, p | all met [95% CI] | vs base, p |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, entry in zip(["base model", *names], models, strict=True):
        m, d = entry["metrics"], comps.get(entry["model"], {})
        lines.append(f"| {name} | {steps.get(name, 0)} | {fmt(m['constraint_share'])} | "
                     f"{fmt_diff(d.get('constraint_share'))} | {fmt(m['all_checks_met'])} | "
                     f"{fmt_diff(d.get('all_checks_met'))} |")
    item_ids = sorted({k.split("/")[1] for k in models[0]["metrics"] if k.startswith("items/")})
    lines += ["", "Per constraint type, share met by the check (held out, greedy); difference against the base, p:", "",
              "| constraint type | n | base | " + " | ".join(names) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for item in item_ids:
        key = f"items/{item}/check"
        base = models[0]["metrics"].get(key)
        if not base:
            continue
        cells = []
        for entry in models[1:]:
            d = comps.get(entry["model"], {}).get(key)
            rate = entry["metrics"][key]["mean"]
            cells.append(f"{rate:.2f} ({d['diff']:+.2f}, p={d['p_value']:.2g})" if d and d["diff"] is not None
                         else f"{rate:.2f}")
        lines.append(f"| {item} | {base.get('n', '')} | {base['mean']:.2f} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench-checklist")
    parser.add_argument("--arms", default=",".join(ORDER), help=f"comma list of {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--completions", type=int, default=8, help="num_return_sequences")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--minutes", type=float, default=18, help="max_train_minutes per arm (a cap; the step count is the budget)")
    parser.add_argument("--limit", type=int, default=0, help="held-out prompts evaluated (0: the whole test split)")
    parser.add_argument("--calib-limit", type=int, default=40)
    parser.add_argument("--calib-samples", type=int, default=4)
    parser.add_argument("--skip-calibrate", action="store_true", help="reuse OUT/calibrate")
    parser.add_argument("--skip-training", action="store_true", help="evaluate arms already trained in OUT")
    parser.add_argument("--tables-only", action="store_true", help="print the tables of OUT/checklist_learning.json")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = [a for a in args.arms.split(",") if a]
    for name in names:
        if name not in ARMS:
            raise SystemExit(f"unknown arm {name!r}; choose from {', '.join(ARMS)}")
    budget = [f"total_steps={args.steps}", f"prompts_per_step={args.prompts_per_step}",
              f"num_return_sequences={args.completions}", f"max_new_tokens={args.max_new_tokens}",
              f"learning_rate={args.learning_rate}", f"seed={args.seed}", f"max_train_minutes={args.minutes}"]
    result = {"budget": budget, "arms": {}}
    state = out / "checklist_learning.json"
    if state.exists():
        result = {**json.loads(state.read_text()), "budget": budget}
    if args.tables_only:
        args.skip_calibrate = args.skip_training = True
    if not args.skip_calibrate:
        print(f"calibrating the 135M teacher on {args.calib_limit} x {args.calib_samples} answers...", flush=True)
        result["calibration"] = calibrate(out, args.calib_limit, args.calib_samples)
        state.write_text(json.dumps(result, indent=1))
    elif "calibration" not in result and (out / "calibrate" / "calibration.json").exists():
        result["calibration"] = {"item_auc": json.loads((out / "calibrate" / "calibration.json").read_text())["item_auc"]}
    for name in names:
        if not args.skip_training:
            print(f"training {name}: {' '.join(budget)}...", flush=True)
            seconds = train_arm(name, out, budget)
            result["arms"][name] = {"train_seconds": seconds, "steps": steps_done(out, name)}
            state.write_text(json.dumps(result, indent=1))
    steps = {n: steps_done(out, n) for n in names}
    if args.tables_only:
        summary = result["evaluate"]
    else:
        print("evaluating...", flush=True)
        summary = evaluate([BASE, *(f"run:{out / n}" for n in names)], out, args.limit)
        result["evaluate"] = summary
        state.write_text(json.dumps(result, indent=1))
    lines = []
    if "calibration" in result:
        lines += ["135M teacher, item score against the check, per constraint type:", "",
                  *calibration_lines(result["calibration"]["item_auc"]), ""]
    lines += learning_lines(summary, names, steps)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
