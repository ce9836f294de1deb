"""Judge monitors: per-step agreement with the verifier, and the alarms, on a real run whose teacher turns bad."""

from __future__ import annotations

import json
import logging
import random
from html import escape as html_escape

import pytest

from grpo_llm_eval.cli import main
from grpo_llm_eval.config.load import ConfigError, load_config
from grpo_llm_eval.evaluation.monitors import JudgeMonitor, step_points
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from tests.conftest import tiny_overrides

STEPS_BEFORE_TURN = 3
COMPLETIONS_PER_STEP = 8  # prompts_per_step 2 x num_return_sequences 4
WINDOW = 2


def points(n_right: int, n_wrong: int, right_score: float, wrong_score: float, reward: float = 1.0, length: int = 5):
    """One step's (answer score, verifier check, teacher reward, length) points."""
    return [(right_score, True, reward, length + i) for i in range(n_right)] + \
        [(wrong_score, False, reward, length + i) for i in range(n_wrong)]


class TestConfig:
    def test_monitor_keys_are_validated_with_the_fix_named(self):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["on_judge_alarm=halt", "monitor_window=1", "monitor_min_auc=1.5"])
        assert err.value.problems == [
            "on_judge_alarm: 'halt' is not one of warn, stop; pick one of them.",
            "monitor_window: 1 is below the minimum 2; use a value >= 2.",
            "monitor_min_auc: 1.5 is above the maximum 1.0; use a value <= 1.0."]
        cfg = load_config(None, [])
        assert (cfg.monitor_min_auc, cfg.monitor_window, cfg.on_judge_alarm) == (0.6, 10, "warn")


class TestJudgeMonitor:
    def test_agreeing_teacher_logs_auc_one_and_raises_nothing(self):
        monitor = JudgeMonitor(min_auc=0.6, window=3)
        for step in range(1, 7):
            metrics, alarms = monitor.observe(step, points(4, 4, 10, 0))
            assert metrics["monitor/answer_auc"] == 1.0 and alarms == []

    def test_auc_is_not_logged_when_a_step_has_only_wrong_answers(self):
        metrics, _ = JudgeMonitor(0.6, 3).observe(1, points(0, 8, 10, 0))
        assert "monitor/answer_auc" not in metrics and "monitor/length_corr" in metrics

    def test_length_corr_follows_a_reward_that_grows_with_length(self):
        pts = [(5.0, True, float(n), n) for n in range(8)]
        metrics, _ = JudgeMonitor(0.6, 3).observe(1, pts)
        assert metrics["monitor/length_corr"] == pytest.approx(1.0)

    def test_inverted_teacher_raises_the_disagreement_alarm_once_within_the_window(self):
        monitor = JudgeMonitor(min_auc=0.6, window=3)
        raised = []
        for step in range(1, 11):
            inverted = step > 4
            _, alarms = monitor.observe(step, points(4, 4, 0 if inverted else 10, 10 if inverted else 0))
            raised += alarms
        assert [a.kind for a in raised] == ["judge_disagrees"]
        assert 5 <= raised[0].step <= 4 + 3 and "monitor_min_auc 0.6" in raised[0].message

    def test_reward_rising_while_accuracy_falls_raises_the_hacking_alarm(self):
        monitor = JudgeMonitor(min_auc=0.0, window=4)  # AUC alarm off: only the trend counts
        raised = []
        for step in range(1, 9):
            right = max(0, 8 - step)
            _, alarms = monitor.observe(step, points(right, 8 - right, 10, 0, reward=float(step)))
            raised += alarms
        assert [a.kind for a in raised] == ["reward_hacking"] and raised[0].step == 4

    def test_noise_without_a_trend_raises_no_hacking_alarm(self):
        rng = random.Random(0)
        monitor = JudgeMonitor(min_auc=0.0, window=4)
        for step in range(1, 30):
            right = rng.randint(2, 6)
            _, alarms = monitor.observe(step, points(right, 8 - right, 10, 0, reward=5.0))
            assert alarms == []

    def test_a_restored_monitor_raises_what_the_uninterrupted_one_raises(self):
        def rows(step, n_right, n_wrong, right_score, wrong_score):
            return [{"step": step, "judge_status": "ok", "teacher_reward": 1.0, "completion": "x" * (5 + i),
                     "scores": {"answer": s}, "answer_correct": y}
                    for i, (s, y) in enumerate([(right_score, True)] * n_right + [(wrong_score, False)] * n_wrong)]

        history = [rows(1, 4, 4, 10, 0), rows(2, 4, 4, 0, 10), rows(3, 4, 4, 0, 10)]
        uninterrupted = JudgeMonitor(0.6, 3)
        for step, batch in enumerate(history, 1):
            _, alarms = uninterrupted.observe(step, step_points(batch, "answer"))
        assert [a.kind for a in alarms] == ["judge_disagrees"]
        resumed = JudgeMonitor(0.6, 3)  # resumed from a checkpoint at step 2: step 3's rows were cut away
        resumed.restore([r for batch in history for r in batch], [], upto_step=2)
        _, again = resumed.observe(3, step_points(history[2], "answer"))
        assert [a.kind for a in again] == ["judge_disagrees"] and again[0].message == alarms[0].message
        fresh = JudgeMonitor(0.6, 3)  # what a resume did before: an empty window, so no alarm
        assert fresh.observe(3, step_points(history[2], "answer"))[1] == []
        raised = JudgeMonitor(0.6, 3)  # an alarm recorded before the checkpoint is not raised a second time
        raised.restore([r for batch in history for r in batch],
                       [{"event": "judge_alarm", "alarm": "judge_disagrees", "step": 2}], upto_step=2)
        assert raised.observe(3, step_points(history[2], "answer"))[1] == []


@pytest.fixture(scope="module")
def digit_data(tmp_path_factory):
    """A dataset whose answers are 1 or 2, so the digit model gets about half of them right."""
    folder = tmp_path_factory.mktemp("digit-data")
    rows = [{"question": f"Answer {n}: reply with the digit {n}.", "answer": str(n)} for n in (1, 2) * 4]
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(folder)


def turning_run(digit_model, digit_data, out, server, **extra) -> list[str]:
    """CLI arguments of a run whose teacher is correct for STEPS_BEFORE_TURN steps, then inverted."""
    overrides = tiny_overrides(digit_model, out, openai_base_url=server.base_url, dataset_name=digit_data,
                               max_new_tokens=1, learning_rate=1e-7, total_steps=8, save_steps=100,
                               judge_ahead_steps=0, teacher_cache=False, monitor_window=WINDOW, **extra)
    return ["train", *sum((["--set", o] for o in overrides), [])]


class TestTeacherTurnsInvertedMidRun:
    def test_warn_logs_the_monitors_and_records_the_alarm_once(self, digit_model, digit_data, tmp_path, caplog):
        with TeacherServer(mode="scripted", switch_mode=(STEPS_BEFORE_TURN * COMPLETIONS_PER_STEP, "inverted")) as srv:
            with caplog.at_level(logging.WARNING, logger="grpo_llm_eval.evaluation.monitors"):
                assert main(turning_run(digit_model, digit_data, tmp_path, srv)) == 0
        metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
        auc = {m["step"]: m["monitor/answer_auc"] for m in metrics if "monitor/answer_auc" in m}
        assert all(auc[s] == 1.0 for s in auc if s <= STEPS_BEFORE_TURN)
        assert all(auc[s] == 0.0 for s in auc if s > STEPS_BEFORE_TURN)
        assert len([s for s in auc if s > STEPS_BEFORE_TURN]) >= 3  # both classes occurred on most steps
        assert all(-1 <= m["monitor/length_corr"] <= 1 for m in metrics if "monitor/length_corr" in m)
        events = [m for m in metrics if m.get("event") == "judge_alarm"]
        assert [e["alarm"] for e in events] == ["judge_disagrees"] and events[0]["action"] == "warn"
        assert STEPS_BEFORE_TURN < events[0]["step"] <= STEPS_BEFORE_TURN + WINDOW
        assert sum("judge alarm" in r.getMessage() for r in caplog.records) == 1
        assert (tmp_path / "run" / "final").is_dir()  # warn trains on
        assert main(["report", str(tmp_path / "run")]) == 0
        html = (tmp_path / "run" / "report.html").read_text()
        alarms = html.split('<div class="alarms"><h3>Judge alarms</h3>', 1)[1].split("</div>", 1)[0]
        assert alarms.count("<li>") == 1 and "judge_disagrees" in alarms and html_escape(events[0]["message"]) in alarms
        assert "Judge monitors" in html and "Verifier answer accuracy beside" in html

    def test_stop_saves_a_checkpoint_and_exits_non_zero_with_one_line(self, digit_model, digit_data, tmp_path,
                                                                      capsys):
        with TeacherServer(mode="scripted", switch_mode=(STEPS_BEFORE_TURN * COMPLETIONS_PER_STEP, "inverted")) as srv:
            code = main(turning_run(digit_model, digit_data, tmp_path, srv, on_judge_alarm="stop"))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1
        assert err[-1].startswith("error: judge alarm at step ") and "on_judge_alarm: stop saved checkpoint-" in err[-1]
        step = int(err[-1].split("judge alarm at step ")[1].split(":")[0])
        assert STEPS_BEFORE_TURN < step <= STEPS_BEFORE_TURN + WINDOW
        run = tmp_path / "run"
        assert (run / f"checkpoint-{step}").is_dir() and not (run / "final").exists()
        assert max(r["step"] for r in read_jsonl(run / "rollouts.jsonl")) == step

    def test_a_resumed_run_keeps_the_window_and_raises_where_the_uninterrupted_run_would(self, digit_model, digit_data,
                                                                                          tmp_path):
        """Would have caught: the window restarted empty on resume, so an alarm due at the first step after the
        checkpoint came a whole window later (or never, in a run resumed often)."""
        overrides = tiny_overrides(digit_model, tmp_path, dataset_name=digit_data, max_new_tokens=1,
                                   learning_rate=1e-7, total_steps=1, save_steps=100, judge_ahead_steps=0,
                                   teacher_cache=False, monitor_window=WINDOW)
        run = tmp_path / "run"
        with TeacherServer(mode="inverted") as srv:
            sets = [*overrides, f"openai_base_url={srv.base_url}"]
            assert main(["train", *sum((["--set", o] for o in sets), [])]) == 0
        assert not [m for m in read_jsonl(run / "metrics.jsonl") if m.get("event") == "judge_alarm"]
        with TeacherServer(mode="inverted") as srv:
            assert main(["train", "--resume", str(run), "--set", "total_steps=2",
                         "--set", f"openai_base_url={srv.base_url}"]) == 0
        events = [m for m in read_jsonl(run / "metrics.jsonl") if m.get("event") == "judge_alarm"]
        assert [(e["alarm"], e["step"]) for e in events] == [("judge_disagrees", WINDOW)]
