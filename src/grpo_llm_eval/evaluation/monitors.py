"""Judge monitors during training: does the teacher still agree with the verifier, and is it being gamed?

Each step whose completions were graded by both the teacher and the verifier (or, for examples with their own
rubric, whose items have programmatic checks: each item's teacher score against its check) logs
`monitor/answer_auc` (ROC AUC of the teacher's answer score against the verifier's answer check; only when
the step has both right and wrong answers) and `monitor/length_corr` (Spearman correlation of the teacher's
reward with completion length). Over the last `monitor_window` steps two alarms are checked, each raised once:

- `judge_disagrees`: the AUC of the window's pooled (answer score, verifier check) pairs is below
  `monitor_min_auc`: the teacher no longer tells right answers from wrong ones (or prefers wrong ones).
- `reward_hacking`: the teacher's mean reward rises over the window while the verifier's accuracy falls
  (Pearson correlation with the step of at least +0.5 and at most -0.5): the student is pleasing the judge,
  not getting answers right.

An alarm is logged as a warning and written to metrics.jsonl (`{"event": "judge_alarm", ...}`); with
`on_judge_alarm: stop` the run saves a checkpoint and ends with a non-zero exit (train.py raises
TrainingAborted with the alarm's line). `calibrate` measures the same agreement before training.

A resumed run picks the window up where the checkpoint left it: the window is rebuilt from the graded steps in
rollouts.jsonl (cut back to the checkpoint's step by the resume) and an alarm recorded in metrics.jsonl is not
raised again, so the alarms of an interrupted run are those of the uninterrupted one.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from grpo_llm_eval.evaluation import stats

logger = logging.getLogger(__name__)

TREND = 0.5  # |Pearson correlation with the step| that counts as a trend in the reward-hacking alarm


@dataclass(frozen=True)
class Alarm:
    """A judge alarm: its kind, the step it was raised at, the one-line message and the value that tripped it."""

    kind: str
    step: int
    message: str
    value: float


def step_points(rows: list[dict], answer_criterion: str | None) -> list[tuple[float | None, bool | None, float, int]]:
    """(answer score, verifier check, teacher reward, completion length) of each completion the teacher graded.

    A completion graded on its example's own rubric gives one point per item with a programmatic check instead:
    (the teacher's item score, the check, the reward, the length), so the AUC and the alarms then watch whether
    the teacher's item grades still follow the checks.
    """
    out = []
    for r in rows:
        if r.get("judge_status") != "ok" or r.get("teacher_reward") is None:
            continue
        if r.get("items"):
            out += [(float(i["score"]), bool(i["check"]), float(r["teacher_reward"]), len(r.get("completion") or ""))
                    for i in r["items"].values() if i.get("check") is not None and i.get("score") is not None]
            continue
        score = (r.get("scores") or {}).get(answer_criterion) if answer_criterion else r["teacher_reward"]
        out.append((None if score is None else float(score), r.get("answer_correct"), float(r["teacher_reward"]),
                    len(r.get("completion") or "")))
    return out


def _auc(points) -> float | None:
    pairs = [(s, y) for s, y, _, _ in points if s is not None and y is not None]
    return stats.roc_auc([p[0] for p in pairs], [p[1] for p in pairs])


class JudgeMonitor:
    """The monitors' arithmetic, fed one step's graded completions at a time (no trainer needed)."""

    def __init__(self, min_auc: float, window: int, answer_criterion: str | None = "answer"):
        self.min_auc, self.window, self.answer_criterion = min_auc, window, answer_criterion
        self.steps: deque = deque(maxlen=window)  # (step, points) of the last `window` graded steps
        self.raised: set[str] = set()

    def observe(self, step: int, points: list) -> tuple[dict[str, float], list[Alarm]]:
        """This step's monitor metrics, and the alarms raised by it (each kind at most once per run)."""
        metrics: dict[str, float] = {}
        if not points:
            return metrics, []
        auc = _auc(points)
        if auc is not None:
            metrics["monitor/answer_auc"] = auc
        lengths, rewards = [p[3] for p in points], [p[2] for p in points]
        corr = stats.spearman(lengths, rewards)
        if corr is None and len(points) >= 3 and len(set(lengths)) > 1:
            corr = 0.0  # the reward is constant: it does not follow length
        if corr is not None:
            metrics["monitor/length_corr"] = corr
        self.steps.append((step, points))
        return metrics, [a for a in (self._auc_alarm(step), self._hacking_alarm(step)) if a is not None]

    def restore(self, rollouts: list[dict], events: list[dict], upto_step: int) -> None:
        """The state an uninterrupted run had after UPTO_STEP: the window from ROLLOUTS (rollouts.jsonl rows), the
        alarms already raised from EVENTS (metrics.jsonl rows)."""
        by_step: dict[int, list[dict]] = {}
        for row in rollouts:
            if isinstance(row.get("step"), int) and row["step"] <= upto_step:
                by_step.setdefault(row["step"], []).append(row)
        self.steps.clear()
        for step in sorted(by_step):
            points = step_points(by_step[step], self.answer_criterion)
            if points:  # observe() keeps only steps with graded completions
                self.steps.append((step, points))
        self.raised = {e["alarm"] for e in events if e.get("event") == "judge_alarm" and isinstance(e.get("step"), int)
                       and e["step"] <= upto_step and isinstance(e.get("alarm"), str)}

    def _raise(self, kind: str, step: int, message: str, value: float) -> Alarm | None:
        if kind in self.raised:
            return None
        self.raised.add(kind)
        return Alarm(kind, step, f"judge alarm at step {step}: {message}", value)

    def _auc_alarm(self, step: int) -> Alarm | None:
        if self.min_auc <= 0 or len(self.steps) < self.window:
            return None
        auc = _auc([p for _, pts in self.steps for p in pts])
        if auc is None or auc >= self.min_auc:
            return None
        return self._raise("judge_disagrees", step, f"over the last {self.window} steps the teacher's answer score "
                           f"disagrees with the verifier (answer AUC {auc:.2f} < monitor_min_auc {self.min_auc})", auc)

    def _hacking_alarm(self, step: int) -> Alarm | None:
        if len(self.steps) < max(3, self.window):
            return None
        rows = []
        for s, pts in self.steps:
            checked = [y for _, y, _, _ in pts if y is not None]
            if checked:
                rows.append((s, sum(p[2] for p in pts) / len(pts), sum(checked) / len(checked)))
        reward_trend = stats.pearson([r[0] for r in rows], [r[1] for r in rows])
        accuracy_trend = stats.pearson([r[0] for r in rows], [r[2] for r in rows])
        if reward_trend is None or accuracy_trend is None or reward_trend < TREND or accuracy_trend > -TREND:
            return None
        return self._raise("reward_hacking", step, f"over the last {self.window} steps the teacher's reward rose "
                           f"(r = {reward_trend:+.2f} with the step) while the verifier's accuracy fell "
                           f"(r = {accuracy_trend:+.2f}): the reward-hacking signature", accuracy_trend)


class JudgeMonitorCallback(TrainerCallback):
    """Runs JudgeMonitor on each new generation batch; warns, records and (on_judge_alarm: stop) stops."""

    def __init__(self, trainer, cfg, rubric, records, run_dir=None):
        names = [c.name for c in rubric.criteria]
        self.trainer, self.cfg, self.records, self.run_dir = trainer, cfg, records, run_dir
        self.monitor = JudgeMonitor(cfg.monitor_min_auc, cfg.monitor_window, "answer" if "answer" in names else None)
        self.tripped: Alarm | None = None
        self._seen = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step <= 0 or self.run_dir is None:
            return
        # Resumed: rebuild the window. The main process reads the records (only it writes them, and on several
        # machines only its disk has them); every process gets the same state, so all decide alike.
        from grpo_llm_eval.training.records import read_jsonl

        accelerator = self.trainer.accelerator
        payload = [None]
        if accelerator.is_main_process:
            payload = [(read_jsonl(Path(self.run_dir) / "rollouts.jsonl"), read_jsonl(Path(self.run_dir) / "metrics.jsonl"))]
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            payload = broadcast_object_list(payload)
        rollouts, events = payload[0]
        self.monitor.restore(rollouts, [e for e in events if e.get("event") == "judge_alarm"], state.global_step)
        logger.info("judge monitors resumed at step %d with %d graded steps in the window%s", state.global_step,
                    len(self.monitor.steps), f"; already raised: {', '.join(sorted(self.monitor.raised))}"
                    if self.monitor.raised else "")

    def on_step_end(self, args, state, control, **kwargs):
        batch = self.trainer.recorder.last_batch
        if batch is self._seen:  # no new generation batch this step (several steps per generation)
            return
        self._seen = batch
        points = step_points(batch, self.monitor.answer_criterion)
        if self.trainer.accelerator.num_processes > 1:  # every process decides alike, so a stop stops them all
            from accelerate.utils import gather_object

            points = gather_object(points)
        metrics, alarms = self.monitor.observe(state.global_step, points)
        for name, value in metrics.items():
            self.trainer._metric(name, value)
        for alarm in alarms:
            logger.warning("%s (on_judge_alarm: %s)", alarm.message, self.cfg.on_judge_alarm)
            self.records.write_event({"step": alarm.step, "event": "judge_alarm", "alarm": alarm.kind,
                                      "value": alarm.value, "message": alarm.message,
                                      "action": self.cfg.on_judge_alarm})
            if self.cfg.on_judge_alarm == "stop" and self.tripped is None:
                self.tripped = alarm
                control.should_save = True
                control.should_training_stop = True
