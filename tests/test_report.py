"""`grpo_llm_eval report`: one self-contained HTML file from a real tiny run folder; untrusted text escaped.

The run is also made with `trl.report_to=tensorboard`, which the TRL pass-through must honour (TestReportTo).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from grpo_llm_eval.cli import main
from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.evaluation.evaluate import summarize
from grpo_llm_eval.evaluation.report import build_report
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.run_dir import RunDirError
from grpo_llm_eval.training.train import train
from tests.conftest import tiny_overrides

PAYLOADS = {
    "completion": "<script>alert(1)</script>",
    "feedback": "<img src=x onerror=alert(2)>",
    "question": "\"quoted\" & <b>bold</b>",
    "judge_status": "\"><script>alert(3)</script>",
}
_RUNS: dict[str, Path] = {}  # one training per session, shared with test_report_browser.py


def train_report_run(tiny_model: str, base: Path) -> Path:
    """A 2-step run recording KL and SFT loss too (small groups: the tiny model's big vocabulary is what costs),
    with TensorBoard logging on through the `trl:` section."""
    with TeacherServer(mode="scripted") as server:
        cfg = load_config(None, tiny_overrides(tiny_model, base, openai_base_url=server.base_url, grpo_beta=0.04,
                                               sft_beta=0.1, num_return_sequences=2, trl={"report_to": "tensorboard"}))
        return train(cfg).run_dir


@pytest.fixture(scope="session")
def report_run(tiny_model, tmp_path_factory) -> Path:
    key = str(tmp_path_factory.getbasetemp())
    if key not in _RUNS:
        _RUNS[key] = train_report_run(tiny_model, tmp_path_factory.mktemp("report-run"))
    return _RUNS[key]


def hostile_copy(run: Path, dest: Path) -> Path:
    """A copy of RUN with a rollout carrying HTML payloads, an evaluation summary and torn last lines."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoint-*", "final", "runs", "*.sqlite*"))
    row = read_jsonl(dest / "rollouts.jsonl")[-1] | PAYLOADS
    with open(dest / "rollouts.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n" + '{"step": 3, "completion": "torn')
    with open(dest / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"step": 3, "loss": 1.')
    rows = [{"model": m, "prompt_index": p, "sample_index": 0, "answer_correct": (p + i) % 2 == 0,
             "format_correct": True, "judge_status": "ok", "scores": {"answer": float(p)}, "teacher_reward": 0.1 * p,
             "reward": 0.1 * p} for i, m in enumerate(("base<i>", "tuned")) for p in range(6)]
    summary = summarize(rows, ["base<i>", "tuned"], ["answer"], 1, 0) | {"split": "test"}
    (dest / "eval_summary.json").write_text(json.dumps(summary))
    return dest


@pytest.fixture(scope="module")
def hostile(report_run, tmp_path_factory) -> tuple[Path, str]:
    run = hostile_copy(report_run, tmp_path_factory.mktemp("hostile") / "run")
    path = build_report(run)
    return path, path.read_text(encoding="utf-8")


class TestReportFile:
    def test_written_as_report_html_in_the_run_folder(self, hostile):
        path, html = hostile
        assert path.name == "report.html" and html.startswith("<!DOCTYPE html>")

    def test_is_self_contained(self, hostile):
        html = hostile[1]
        assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", html, re.I)
        assert "<script src" not in html.lower() and "<link rel=\"stylesheet\"" not in html.lower()
        assert not re.search(r"url\(\s*['\"]?(?:https?:)?//", html, re.I)
        assert "default-src 'none'" in html  # and the browser is told to refuse any request

    def test_has_at_least_six_inline_svg_plots(self, hostile):
        html = hostile[1]
        assert html.count("<svg") >= 6 and "<?xml" not in html
        for title in ("Reward", "KL to the reference model", "Policy loss", "SFT loss", "Judge failure rate",
                      "Judge latency", "tied rewards", "Time per step", "Rubric criteria"):
            block = html.split(title, 1)[1].split("</div>", 1)[0]
            assert "<svg" in block, title

    def test_untrusted_text_is_escaped(self, hostile):
        html = hostile[1]
        assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert "<img src=x" not in html and "&lt;img src=x onerror=alert(2)&gt;" in html
        assert "&quot;quoted&quot; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
        assert 'data-status="&quot;&gt;&lt;script&gt;alert(3)&lt;/script&gt;"' in html
        assert html.lower().count("<script") == 1  # our filter script, nothing else

    def test_rollout_table_has_filter_box_status_select_and_every_row(self, hostile, report_run):
        html = hostile[1]
        assert 'id="rollout-filter"' in html and 'id="status-filter"' in html
        assert '<option value="ok">ok</option>' in html
        body = html.split('<table id="rollouts">', 1)[1].split("</table>", 1)[0]
        assert body.count("<tr data-status=") == len(read_jsonl(report_run / "rollouts.jsonl")) + 1  # torn one skipped

    def test_evaluation_results_are_shown(self, hostile):
        html = hostile[1]
        assert 'id="evaluation"' in html and "tuned minus base&lt;i&gt;" in html
        assert "answer_accuracy" in html and "exact-sign-test" in html

    def test_no_evaluation_gives_a_note(self, report_run, tmp_path):
        html = build_report(report_run, output=tmp_path / "r.html").read_text()
        assert "No evaluation results" in html


class TestReportLimits:
    def test_a_metric_not_recorded_gets_no_panel_only_a_mention(self, report_run, tmp_path):
        run = tmp_path / "run"
        shutil.copytree(report_run, run, ignore=shutil.ignore_patterns("checkpoint-*", "final", "runs"))
        full = build_report(run).read_text().count("<svg")
        rows = [{k: v for k, v in m.items() if k not in ("kl", "sft_loss")} for m in read_jsonl(run / "metrics.jsonl")]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        html = build_report(run).read_text()
        plots, note = html.split('<p class="note">Not recorded in this run: ', 1)
        note = note.split("</p>", 1)[0]
        for title in ("KL to the reference model", "SFT loss on teacher feedback", "Evaluation during training"):
            assert title not in plots.split('id="plots"', 1)[1] and title in note
        assert html.count("<svg") == full - 2  # the KL and SFT panels are gone, nothing else

    def test_large_runs_show_the_last_rows_with_a_note(self, report_run, tmp_path):
        total = len(read_jsonl(report_run / "rollouts.jsonl"))
        html = build_report(report_run, output=tmp_path / "r.html", max_rows=5).read_text()
        body = html.split('<table id="rollouts">', 1)[1]
        assert body.count("<tr data-status=") == 5
        assert f"Showing the last 5 of {total} rollouts" in html

    def test_a_folder_that_is_not_a_run_is_a_clear_error(self, tmp_path):
        with pytest.raises(RunDirError, match="neither metrics.jsonl nor rollouts.jsonl"):
            build_report(tmp_path)
        with pytest.raises(RunDirError, match="not a folder"):
            build_report(tmp_path / "missing")


class TestReportCli:
    def test_report_command_writes_the_file_and_takes_eval_from_another_folder(self, report_run, tmp_path):
        evals = tmp_path / "evals"
        evals.mkdir()
        rows = [{"model": "only", "prompt_index": p, "sample_index": 0, "answer_correct": True, "format_correct": True,
                 "judge_status": "ok", "scores": {}, "teacher_reward": 1.0, "reward": 1.0} for p in range(3)]
        (evals / "eval_summary.json").write_text(json.dumps(summarize(rows, ["only"], [], 1, 0)))
        out = tmp_path / "out" / "page.html"
        assert main(["report", str(report_run), "--output", str(out), "--eval", str(evals)]) == 0
        assert 'id="evaluation"' in out.read_text() and "<th>only</th>" in out.read_text()

    def test_missing_eval_folder_exits_1_with_one_line(self, report_run, tmp_path, capsys):
        assert main(["report", str(report_run), "--output", str(tmp_path / "r.html"), "--eval", str(tmp_path)]) == 1
        assert "no eval_summary.json" in capsys.readouterr().err


class TestReportTo:
    def test_trl_report_to_tensorboard_writes_event_files_with_our_metrics(self, report_run):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        [events] = list(report_run.glob("runs/*/events.out.tfevents.*"))
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"train/loss", "train/reward", "train/judge/failure_rate", "train/criteria/answer/mean"} <= tags
        assert [e.step for e in acc.Scalars("train/reward")] == [1, 2]
