"""`grpo_llm_eval calibrate`: the judge measured against the verifier, with scripted teachers (correct, inverted,
random, length-loving, master-key-passing) on a real server on loopback, and end to end through the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import random

import pytest

from grpo_llm_eval.cli import main
from grpo_llm_eval.config import SEED_EVALUATION_PROMPT
from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.evaluation.calibrate import MASTER_KEYS, calibrate, format_table, measure, verdict
from grpo_llm_eval.evaluation.report import build_report
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from tests.conftest import CACHE_DIR, tiny_overrides

TOP_KEYS = {"answer_auc", "answer_auc_ci", "n_right", "n_wrong", "reward_auc", "reward_auc_ci", "length_bias",
            "self_disagreement", "position_flip_rate", "master_key_pass_rate", "verdict"}
PROMPTS, SAMPLES = 100, 4


def teacher_overrides(server) -> list[str]:
    return ["teacher_backend=openai", "teacher_model_name=teacher", f"openai_base_url={server.base_url}",
            "teacher_structured_output=false", "teacher_logprob_scores=false", "max_feedback_new_tokens=512",
            "teacher_max_retries=0", f"evaluation_prompt={SEED_EVALUATION_PROMPT}", f"cache_dir={CACHE_DIR}"]


@pytest.fixture(scope="module")
def responses(tmp_path_factory):
    """PROMPTS x SAMPLES arithmetic responses, about half right, of varied length in both classes."""
    rng = random.Random(0)
    rows = []
    for _ in range(PROMPTS):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        for _ in range(SAMPLES):
            value = a + b if rng.random() < 0.5 else a + b + rng.randint(1, 9)
            working = " ".join(["then"] * rng.randint(0, 12))
            rows.append({"question": f"What is {a} + {b}?", "response": f"<think>{working}</think> {value}",
                         "answer": str(a + b)})
    path = tmp_path_factory.mktemp("responses") / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def calibrated(responses, tmp_path_factory):
    """mode -> (calibration.json's content, its folder), for each scripted teacher."""
    out = {}
    for mode in ("scripted", "inverted", "random", "length_loving", "master_key"):
        folder = tmp_path_factory.mktemp(f"cal-{mode}")
        with TeacherServer(mode=mode) as server:
            out[mode] = calibrate(load_config(None, teacher_overrides(server)), folder, responses=responses), folder
    return out


class TestAgainstScriptedTeachers:
    def test_correct_teacher_scores_auc_one_and_passes_every_check(self, calibrated):
        m = calibrated["scripted"][0]
        assert m["answer_auc"] == 1.0 and m["answer_auc_ci"][0] <= 1.0 <= m["answer_auc_ci"][1]
        assert m["reward_auc"] == 1.0
        assert m["n_right"] + m["n_wrong"] == PROMPTS * SAMPLES and min(m["n_right"], m["n_wrong"]) > 150
        assert m["length_bias"] == 0.0 and m["master_key_pass_rate"] == 0.0
        assert m["verdict"].startswith("OK:")

    def test_inverted_teacher_scores_auc_zero_and_is_called_inverted(self, calibrated):
        m = calibrated["inverted"][0]
        assert m["answer_auc"] == 0.0 and m["answer_auc_ci"][0] <= 0.0 <= m["answer_auc_ci"][1] < 0.5
        assert m["verdict"].startswith("INVERTED:")

    def test_random_teacher_has_an_interval_around_chance(self, calibrated):
        m = calibrated["random"][0]
        low, high = m["answer_auc_ci"]
        assert low < 0.5 < high and high - low < 0.25
        assert m["verdict"].startswith("NEAR CHANCE:")

    def test_length_loving_teacher_is_flagged_by_length_bias(self, calibrated):
        m = calibrated["length_loving"][0]
        assert m["answer_auc"] == 1.0  # its answer score is honest: only length bias can catch it
        assert m["length_bias"] > 0.8 and all(c["rho"] > 0.8 for c in m["length_bias_by_class"].values())
        assert m["verdict"].startswith("LENGTH BIAS:")

    def test_master_key_passing_teacher_is_flagged(self, calibrated):
        m = calibrated["master_key"][0]
        assert m["answer_auc"] == 1.0
        assert m["master_key_pass_rate"] == 1.0 and sorted(m["master_keys_passed"]) == sorted(MASTER_KEYS)
        assert m["verdict"].startswith("MASTER KEYS PASS: 12 of 12")

    def test_pointwise_and_greedy_teacher_give_null_with_reasons(self, calibrated):
        m = calibrated["scripted"][0]
        assert m["position_flip_rate"] is None and "pointwise" in m["null_reasons"]["position_flip_rate"]
        assert m["self_disagreement"] is None and "teacher_temperature" in m["null_reasons"]["self_disagreement"]

    def test_calibration_json_holds_the_keys_and_matches_its_rollouts(self, calibrated):
        cfg = load_config(None, ["teacher_backend=openai", "max_feedback_new_tokens=512", f"evaluation_prompt={SEED_EVALUATION_PROMPT}"])
        for mode, (_, folder) in calibrated.items():
            saved = json.loads((folder / "calibration.json").read_text())
            assert TOP_KEYS <= set(saved)
            rows = read_jsonl(folder / "calibration_rollouts.jsonl")
            assert len(rows) == PROMPTS * SAMPLES + len(MASTER_KEYS), mode
            recomputed = measure(rows, Rubric.from_config(cfg), seed=cfg.seed)
            assert {k: recomputed[k] for k in TOP_KEYS} == {k: saved[k] for k in TOP_KEYS}, mode


class TestGroupMode:
    def test_position_biased_group_teacher_is_flagged_and_a_correct_one_is_not(self, responses, tmp_path):
        found = {}
        for mode in ("position_biased", "scripted"):
            with TeacherServer(mode=mode) as server:
                cfg = load_config(None, [*teacher_overrides(server), "judge_mode=group", "group_judge_passes=2"])
                found[mode] = calibrate(cfg, tmp_path / mode, responses=responses)
        biased, honest = found["position_biased"], found["scripted"]
        assert biased["judge_mode"] == "group" and biased["position_flip_rate"] > 0.9
        assert honest["position_flip_rate"] == 0.0 and honest["answer_auc"] == 1.0
        assert honest["verdict"].startswith("OK:")
        # the flip rate alone names the bias (the biased teacher's verdict names its worse finding: near chance)
        assert verdict({**honest, "position_flip_rate": biased["position_flip_rate"]}).startswith("POSITION BIAS:")


class TestMasterKeysInGroupMode:
    def test_master_keys_are_graded_apart_from_the_real_groups(self, responses, tmp_path):
        """Old code appended the keys to their question's requests, so they were graded in group calls with that
        question's samples (groups larger than the samples) or with each other: the grades, the AUC and
        master_key_pass_rate changed with the calibration's size."""
        from tests.test_group_judging import OrderRecordingServer

        few = 3  # a small calibration: the old code's batch held every sample and key, so keys joined the groups
        small = tmp_path / "small.jsonl"
        small.write_text("".join(responses.read_text(encoding="utf-8").splitlines(keepends=True)[:few * SAMPLES]))
        with OrderRecordingServer(mode="position_biased") as server:
            cfg = load_config(None, [*teacher_overrides(server), "judge_mode=group", f"num_return_sequences={SAMPLES}"])
            result = calibrate(cfg, tmp_path / "cal", responses=small)
            shown = server.shown
        samples = [call for call in shown if all("</think>" in r for r in call)]  # every sample has a think block
        keys = [call for call in shown if call not in samples]
        assert len(samples) == few and all(len(call) <= SAMPLES for call in samples)  # (duplicates shown once)
        assert len(keys) == len(MASTER_KEYS) and all(len(call) == 1 for call in keys)
        # alone, every key is the first response shown: this teacher gives it the top score
        assert result["master_key_pass_rate"] == 1.0


class TestMeasure:
    def test_self_disagreement_is_the_mean_repeat_difference_as_a_share_of_the_scale(self):
        rubric = Rubric.from_config(load_config(None, [f"evaluation_prompt={SEED_EVALUATION_PROMPT}"]))
        rows = [{"kind": "sample", "prompt_index": i, "response": "7", "judge_status": "ok", "answer_correct": i % 2 == 0,
                 "scores": {"answer": 10.0 if i % 2 == 0 else 0.0}, "teacher_reward": 1.0,
                 "repeat_answer_score": 8.0 if i % 2 == 0 else 0.0} for i in range(4)]
        m = measure(rows, rubric)
        assert m["self_disagreement"] == pytest.approx(0.1)  # (2 + 0 + 2 + 0) / 4 / 10
        assert m["master_key_pass_rate"] is None and "master_key_pass_rate" in m["null_reasons"]

    @staticmethod
    def _rubric():
        return Rubric.from_config(load_config(None, [f"evaluation_prompt={SEED_EVALUATION_PROMPT}"]))

    def test_length_bias_is_measured_within_each_prompt(self):
        """Hard prompts get long answers and low grades, easy ones short answers and high grades, and within a
        prompt the grade ignores length. Old code pooled every prompt of a class: it called that length bias."""
        rows = [{"kind": "sample", "prompt_index": p, "response": "x" * (10 * (6 - p) + i), "judge_status": "ok",
                 "answer_correct": False, "scores": {"answer": 0.0}, "teacher_reward": float(p)}
                for p in range(6) for i in range(4)]
        m = measure(rows, self._rubric())
        assert m["length_bias"] == 0.0
        assert m["length_bias_by_class"]["wrong"] == {"rho": 0.0, "n": 24, "prompts": 6}
        # a teacher that does follow length within a prompt is still caught
        for r in rows:
            r["teacher_reward"] = float(len(r["response"]) % 10)
        assert measure(rows, self._rubric())["length_bias"] == pytest.approx(1.0)

    @staticmethod
    def _auc_rows(right_at: list[int], prompts: int = 40, per_prompt: int = 5) -> list[dict]:
        """PROMPTS x PER_PROMPT graded responses; those at RIGHT_AT (flat indices) right, graded a little higher."""
        rows = []
        for i in range(prompts * per_prompt):
            right = i in right_at
            rows.append({"kind": "sample", "prompt_index": i // per_prompt, "response": "7", "judge_status": "ok",
                         "answer_correct": right, "scores": {"answer": (6.0 if right else 4.0) + (i % 3)},
                         "teacher_reward": 1.0})
        return rows

    def test_no_auc_interval_below_the_minimum_per_class(self):
        """Old code gave an interval from 1 right answer in 40 prompts (from the resamples that happened to hold it)."""
        m = measure(self._auc_rows([7]), self._rubric())
        assert m["answer_auc"] is not None and m["answer_auc_ci"] is None
        assert "at least 5 of each" in m["null_reasons"]["answer_auc_ci"] and "no interval" in format_table(m)

    def test_the_auc_interval_says_how_many_resamples_it_dropped(self):
        """Five right answers, all in one of 40 prompts: about (39/40)^40 = 36 % of resamples miss that prompt."""
        m = measure(self._auc_rows([0, 1, 2, 3, 4]), self._rubric())
        assert m["answer_auc_ci"] is not None
        assert m["answer_auc_ci_dropped"] == pytest.approx((39 / 40) ** 40, abs=0.04)
        assert "of resamples held one class and were dropped" in format_table(m)
        assert measure(self._auc_rows(list(range(0, 200, 9))), self._rubric())["answer_auc_ci_dropped"] == 0.0


class TestRepeatedGrade:
    def test_the_repeat_of_a_sampled_grade_is_a_second_draw(self):
        """Old code graded the repeat with the run's seed: the local backend drew the very same grade, so
        self_disagreement measured one draw twice (0 whatever the teacher's variance)."""
        import asyncio

        from grpo_llm_eval.evaluation.calibrate import repeat_config
        from grpo_llm_eval.teacher.backends.local_backend import LocalTeacher
        from grpo_llm_eval.teacher.types import JudgeRequest

        cfg = load_config(None, ["teacher_logprob_scores=false", "teacher_temperature=1.0",
                                 "max_feedback_new_tokens=48"])
        request = JudgeRequest("What is 2 + 2?", "<think>2 and 2</think> The answer is 4", "4")

        def raw(config) -> str:
            async def go():
                teacher = LocalTeacher(config, Rubric.from_config(config), n_threads=1)
                try:
                    return (await teacher.judge([request]))[0].raw
                finally:
                    await teacher.aclose()
            return asyncio.run(go())

        first = raw(cfg)
        assert raw(cfg) == first  # (control) the same seed draws the same grade
        assert raw(repeat_config(cfg)) != first


class TestCommandEndToEnd:
    def test_cli_samples_the_model_grades_writes_prints_and_the_report_shows_it(self, digit_model, tmp_path):
        data = tmp_path / "data"
        data.mkdir()
        rows = [{"question": f"Reply with the digit {n}.", "answer": str(n)} for n in (1, 2) * 4]
        for split in ("train", "test"):
            (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        out = tmp_path / "cal"
        with TeacherServer(mode="scripted") as server:
            overrides = tiny_overrides(digit_model, tmp_path, openai_base_url=server.base_url, dataset_name=str(data),
                                       max_new_tokens=1)
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                code = main(["calibrate", *sum((["--set", o] for o in overrides), []), "--limit", "8", "--samples",
                             "4", "--output", str(out)])
        assert code == 0
        printed = stdout.getvalue()
        assert "answer_auc" in printed and "verdict: OK:" in printed and "master_key_pass_rate  0.000" in printed
        cal = json.loads((out / "calibration.json").read_text())
        assert cal["answer_auc"] == 1.0 and cal["n_right"] > 0 and cal["n_wrong"] > 0
        assert cal["model"] == digit_model and cal["samples"] == 4 and cal["n_prompts"] == 8
        assert len(read_jsonl(out / "calibration_rollouts.jsonl")) == 8 * 4 + len(MASTER_KEYS)
        run = tmp_path / "run-folder"
        run.mkdir()
        metrics = [{"step": s, "loss": 0.1, "verifier/answer_accuracy": 0.5, "criteria/answer/mean": 5.0,
                    "monitor/answer_auc": 1.0, "monitor/length_corr": 0.0} for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        for flag in ("--calibration", "--eval"):
            assert main(["report", str(run), flag, str(out), "--output", str(tmp_path / "r.html")]) == 0
            html = (tmp_path / "r.html").read_text()
            section = html.split('id="calibration"', 1)[1].split('id="evaluation"', 1)[0]
            assert "OK: the teacher tracks the verifier" in section and section.count("<svg") == 2
            assert "ROC" in section and "Teacher reward vs response length" in section


class TestReportPanels:
    def test_plots_show_what_the_run_recorded_and_name_the_rest_in_one_line(self, tmp_path):
        run = tmp_path / "run"
        run.mkdir()
        metrics = [{"step": s, "loss": 0.1, "verifier/answer_accuracy": 0.2 * s, "criteria/answer/mean": 8.0 - s,
                    "monitor/answer_auc": 0.3, "monitor/length_corr": 0.1} for s in (1, 2, 3)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        html = build_report(run).read_text()
        plots = html.split('<div class="plots">', 1)[1].split('<p class="note">Not recorded', 1)[0]
        assert "Verifier answer accuracy beside the teacher" in plots and "Judge monitors" in plots
        assert "KL to the reference model" not in plots and "SFT loss" not in plots
        assert plots.count("<svg") == 4  # accuracy/answer score, monitors, criteria, loss
        note = html.split('<p class="note">Not recorded in this run: ', 1)[1].split("</p>", 1)[0]
        assert "KL to the reference model" in note and "SFT loss on teacher feedback" in note

    def test_missing_calibration_folder_is_a_clear_error(self, tmp_path, capsys):
        run = tmp_path / "run"
        run.mkdir()
        (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.1}) + "\n")
        assert main(["report", str(run), "--calibration", str(tmp_path / "nowhere")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: report: --calibration {tmp_path / 'nowhere'}: no calibration.json there; run "
                       "`grpo_llm_eval calibrate --output DIR` first."]


class TestFailingTeacher:
    def test_a_teacher_whose_grades_all_fail_is_named_as_the_worst_finding(self, responses, tmp_path):
        with TeacherServer(mode="scripted", fault_rate=1.0, faults=("garbage",)) as server:
            m = calibrate(load_config(None, teacher_overrides(server)), tmp_path, responses=responses)
        assert m["judge_failure_rate"] == 1.0 and m["answer_auc"] is None and m["master_key_pass_rate"] is None
        assert m["verdict"].startswith("JUDGE FAILS: 100% of grades could not be read")


class TestErrors:
    def test_bad_samples_and_an_empty_responses_file_exit_1_with_one_line(self, tmp_path, capsys):
        assert main(["calibrate", "--samples", "0", "--output", str(tmp_path / "a")]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            "error: --samples 0: must be at least 1 (4 or more gives right and wrong answers)."]
        missing = tmp_path / "none.jsonl"
        assert main(["calibrate", "--responses", str(missing), "--output", str(tmp_path / "b")]) == 1
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: --responses {missing}: no rows; expected JSONL with question, response, answer."]

    def test_the_server_refuses_an_unknown_mode_now_or_later(self):
        with pytest.raises(ValueError, match="mode must be one of .*master_key"):
            TeacherServer(mode="lenient")
        with pytest.raises(ValueError, match="not 'lenient'"):
            TeacherServer(mode="scripted", switch_mode=(3, "lenient"))
