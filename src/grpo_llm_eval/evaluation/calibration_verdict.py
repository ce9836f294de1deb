"""calibrate's verdict and table: the one line naming the worst finding, and calibration.json as plain text."""

from __future__ import annotations

from grpo_llm_eval.evaluation.items import item_auc_lines

ROLLOUTS_FILE = "calibration_rollouts.jsonl"
LENGTH_BIAS_FLAG = 0.3  # |within-class rank correlation| above this is reported as length bias
CHANCE_AUC = 0.6  # an answer AUC below this is "near chance" (the monitors' default monitor_min_auc too)
DISAGREEMENT_FLAG = 0.1  # repeated grades differing by more than a tenth of the scale on average
# Share of groups whose ranking reverses with the order above which a group judge is called position-biased.
POSITION_FLIP_FLAG = 0.2


def verdict(m: dict) -> str:
    """One line naming the worst finding (or saying the teacher passed every check)."""
    auc, ci = m["answer_auc"], m["answer_auc_ci"]
    auc_text = "n/a" if auc is None else f"{auc:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
    findings = []  # (severity, text)
    if auc is not None and ci is not None and ci[1] < 0.5:
        findings.append((5, f"INVERTED: the teacher prefers wrong answers (answer AUC {auc_text}); do not train on it"))
    elif auc is not None and auc < CHANCE_AUC:
        findings.append((4, f"NEAR CHANCE: the teacher's answer score barely tells right from wrong (answer AUC "
                            f"{auc_text}); weigh it low beside a verifier"))
    if m["master_key_pass_rate"]:
        findings.append((3, f"MASTER KEYS PASS: {len(m['master_keys_passed'])} of "
                            f"{round(len(m['master_keys_passed']) / m['master_key_pass_rate'])} answerless responses "
                            f"get an answer score above the midpoint (e.g. {m['master_keys_passed'][0]!r})"))
    if m["length_bias"] is not None and abs(m["length_bias"]) > LENGTH_BIAS_FLAG:
        findings.append((2, f"LENGTH BIAS: within a correctness class the teacher's reward follows length "
                            f"(rank correlation {m['length_bias']:+.2f})"))
    if m.get("position_flip_rate") is not None and m["position_flip_rate"] > POSITION_FLIP_FLAG:
        findings.append((2, f"POSITION BIAS: {m['position_flip_rate']:.0%} of groups change their ranking when the "
                            "order of the responses is reversed"))
    if m["self_disagreement"] is not None and m["self_disagreement"] > DISAGREEMENT_FLAG:
        findings.append((1, f"INCONSISTENT: repeated grades differ by {m['self_disagreement']:.0%} of the scale"))
    failed = m.get("judge_failure_rate") or 0.0
    if failed >= 0.5:
        findings.append((6, f"JUDGE FAILS: {failed:.0%} of grades could not be read (judge_status in "
                            f"{ROLLOUTS_FILE}); fix the teacher setup (max_feedback_new_tokens, structured output) first"))
    elif failed > 0.1:
        findings.append((1, f"UNRELIABLE: {failed:.0%} of grades failed (masked in training)"))
    items = m.get("item_auc") or {}
    weak = [f"{k} {e['auc']:.2f}" for k, e in items.items() if e["auc"] is not None and e["auc"] < CHANCE_AUC]
    if weak:
        findings.append((4, f"NEAR CHANCE ON ITEMS: the teacher's item grades barely follow the checks for "
                            f"{', '.join(weak)} (item AUC); weigh them low or use verifier_checklist_weight"))
    if auc is None and not items:
        findings.append((0, f"UNMEASURED: {m['null_reasons']['answer_auc']}"))
    if not findings and auc is None:
        return "OK: the teacher's item grades follow the programmatic checks (item AUC >= " \
               f"{CHANCE_AUC} for every constraint type); no master key passed"
    if not findings:
        return f"OK: the teacher tracks the verifier (answer AUC {auc_text}); no master key passed, no length bias"
    return max(findings, key=lambda f: f[0])[1]


def format_table(m: dict) -> str:
    """calibration.json as a plain-text table (the command prints it)."""
    def num(v, fmt="{:.3f}"):
        return "null" if v is None else fmt.format(v)

    def ci(v):
        return "" if not v else f" [{v[0]:.3f}, {v[1]:.3f}]"

    lines = [
        ("answer_auc", num(m["answer_auc"]) + ci(m["answer_auc_ci"]) + f"  ({m['n_right']} right, {m['n_wrong']} wrong"
         + (f"; {m['answer_auc_ci_dropped']:.0%} of resamples held one class and were dropped"
            if m.get("answer_auc_ci_dropped") else "")
         + (f"; no interval: {m['null_reasons']['answer_auc_ci']}" if "answer_auc_ci" in m["null_reasons"] else "")
         + ")"),
        ("reward_auc", num(m["reward_auc"]) + ci(m["reward_auc_ci"])),
        ("length_bias", num(m["length_bias"], "{:+.3f}")),
        ("self_disagreement", num(m["self_disagreement"])),
        ("position_flip_rate", num(m["position_flip_rate"])),
        ("master_key_pass_rate", num(m["master_key_pass_rate"])),
        ("judge_failure_rate", num(m["judge_failure_rate"])),
    ]
    width = max(len(k) for k, _ in lines)
    out = [f"{k.ljust(width)}  {v}" + (f"  ({m['null_reasons'][k]})" if k in m["null_reasons"] else "")
           for k, v in lines]
    if m.get("item_auc"):
        out += ["item_auc (teacher's item score against the programmatic check, per constraint type):",
                *item_auc_lines(m["item_auc"])]
    return "\n".join([*out, f"verdict: {m['verdict']}"])
