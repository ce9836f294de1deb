"""Teacher spend in a training run: calls, tokens and cost in metrics.jsonl, budgets that stop the run as the
time budget does (checkpoint, final/, exit 0), resumed runs that count what was spent, and the report, `judge`
and `evaluate` showing it. Real runs of the tiny model against the fault-injecting server on loopback."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_llm_eval.cli import main
from grpo_llm_eval.config.load import ConfigError, load_config
from grpo_llm_eval.evaluation.report import build_report
from grpo_llm_eval.testing import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from tests.conftest import tiny_overrides
from tests.test_judge_cli import ROWS, judge

BUDGET = 6000  # tokens; the fake teacher uses about 240 per call, 8 calls a step: about three steps
# Cached prompt tokens at a quarter of the input price (the server simulates a prefix cache).
PRICES = {"teacher_price_input_per_mtok": 2.0, "teacher_price_output_per_mtok": 8.0,
          "teacher_price_cached_input_per_mtok": 0.5}


def train_cli(tiny_model, out: Path, server, *extra: str, **settings) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "grpo_llm_eval.cli", "train", *extra]
    for s in tiny_overrides(tiny_model, out, openai_base_url=server.base_url, **settings):
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def totals(row: dict) -> int:
    return int(row["judge/total_prompt_tokens"] + row["judge/total_completion_tokens"])


@pytest.fixture(scope="module")
def budget_run(tiny_model, tmp_path_factory):
    """A 20-step run with a token budget of about three steps, then resumed with the budget doubled."""
    out = tmp_path_factory.mktemp("budget")
    with TeacherServer(mode="scripted", prefix_cache=True) as server:
        first = train_cli(tiny_model, out, server, total_steps=20, save_steps=100, teacher_max_total_tokens=BUDGET,
                          **PRICES)
        metrics_first = read_jsonl(out / "run" / "metrics.jsonl")
        usage = [e["usage"] for e in server.stats()["log"] if e.get("usage")]
        served = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage)
        served_cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usage)
        resumed = train_cli(tiny_model, out, server, "--resume", str(out / "run"), total_steps=20, save_steps=100,
                            teacher_max_total_tokens=2 * BUDGET, **PRICES)
    return out / "run", first, metrics_first, served, resumed, served_cached


class TestTokenBudget:
    def test_the_run_stops_early_with_a_checkpoint_and_final_and_exits_0(self, budget_run):
        run, first, metrics, *_ = budget_run
        assert first.returncode == 0, first.stderr[-3000:]
        stopped = max(m["step"] for m in metrics)
        assert 2 <= stopped < 20
        assert (run / f"checkpoint-{stopped}").is_dir()
        assert (run / "final" / "config.json").is_file()
        said = [line for line in first.stderr.splitlines() if "teacher_max_total_tokens" in line]
        assert len(said) == 1 and "spent" in said[0] and f"after step {stopped}" in said[0]

    def test_the_totals_end_at_or_just_past_the_budget(self, budget_run):
        _, _, metrics, served, *_ = budget_run
        rows = [m for m in metrics if "judge/total_calls" in m]
        last = rows[-1]
        per_call = totals(last) / last["judge/total_calls"]
        assert BUDGET <= totals(last) <= BUDGET + 2 * per_call  # not a batch judged ahead past it
        assert totals(last) == served  # every token the server reported, and no more

    def test_each_step_logs_its_calls_tokens_and_cost_and_they_add_up_to_the_totals(self, budget_run):
        _, _, metrics, *_ = budget_run
        rows = [m for m in metrics if "judge/calls" in m]
        assert [m["step"] for m in rows] == list(range(1, len(rows) + 1))
        for key in ("calls", "prompt_tokens", "completion_tokens", "cached_prompt_tokens", "cost_usd"):
            assert sum(m[f"judge/{key}"] for m in rows) == pytest.approx(rows[-1][f"judge/total_{key}"])
        last = rows[-1]
        cached = last["judge/total_cached_prompt_tokens"]
        assert last["judge/total_cost_usd"] == pytest.approx(
            (2.0 * (last["judge/total_prompt_tokens"] - cached) + 0.5 * cached
             + 8.0 * last["judge/total_completion_tokens"]) / 1e6)

    def test_cached_prompt_tokens_are_what_the_server_reported(self, budget_run):
        _, _, metrics, *_, served_cached = budget_run
        last = [m for m in metrics if "judge/total_calls" in m][-1]
        # The rubric's instructions come before the graded text, so every call after the first reads them cached.
        assert 0 < last["judge/total_cached_prompt_tokens"] == served_cached < last["judge/total_prompt_tokens"]

    def test_each_rollout_records_the_tokens_of_the_call_that_graded_it(self, budget_run):
        run = budget_run[0]
        rows = read_jsonl(run / "rollouts.jsonl")
        for r in rows:
            if r["cached"]:
                assert r["judge_usage"] is None  # a cached grade cost nothing
            elif r["judge_status"] == "ok":
                assert r["judge_usage"]["calls"] == r["judge_attempts"] and r["judge_usage"]["prompt_tokens"] > 0
        assert any(not r["cached"] and r["judge_status"] == "ok" for r in rows)

    def test_a_resumed_run_counts_what_was_already_spent(self, budget_run):
        run, _, metrics_first, _, resumed, _ = budget_run
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        before = totals([m for m in metrics_first if "judge/total_calls" in m][-1])
        stopped = max(m["step"] for m in metrics_first)
        after = [m for m in read_jsonl(run / "metrics.jsonl") if "judge/total_calls" in m and m["step"] > stopped]
        assert after, "the raised budget let the run go on"
        assert all(totals(m) >= before for m in after)
        assert 2 * BUDGET <= totals(after[-1]) <= 2 * BUDGET + 2 * totals(after[-1]) / after[-1]["judge/total_calls"]
        assert max(m["step"] for m in after) < 20  # stopped by the doubled budget, not by total_steps


class TestSettings:
    def test_a_cost_budget_without_prices_is_a_config_error_naming_the_fix(self):
        with pytest.raises(ConfigError) as info:
            load_config(None, ["teacher_max_cost_usd=1.5"])
        assert "teacher_price_input_per_mtok" in str(info.value)

    def test_negative_limits_are_refused(self):
        with pytest.raises(ConfigError) as info:
            load_config(None, ["teacher_rpm=-1", "teacher_max_total_tokens=-5"])
        assert "teacher_rpm" in str(info.value) and "teacher_max_total_tokens" in str(info.value)


class TestShown:
    def test_the_report_plots_tokens_and_cost_over_steps(self, budget_run, tmp_path):
        run = budget_run[0]
        html = build_report(run, output=tmp_path / "r.html").read_text()
        for title in ("Teacher tokens per step", "Teacher cost, run total (US$)"):
            block = html.split(f"<h3>{title}</h3>", 1)[1][:200]
            assert block.lstrip().startswith("<svg"), title
        last = [m for m in read_jsonl(run / "metrics.jsonl") if "judge/total_calls" in m][-1]
        card = html.split("teacher tokens</span><b>", 1)[1].split("<", 1)[0]
        assert card.replace(",", "") == str(totals(last))
        assert "teacher cost (US$)" in html
        share = html.split("cached prompt share</span><b>", 1)[1].split("<", 1)[0]
        assert share == f"{last['judge/total_cached_prompt_tokens'] / last['judge/total_prompt_tokens']:.1%}"

    def test_judge_prints_the_teachers_calls_and_tokens(self, tmp_path, caplog):
        with TeacherServer(mode="scripted") as srv, caplog.at_level(logging.INFO):
            rc, _ = judge(tmp_path, srv.base_url, **PRICES)
            served = srv.stats()
        assert rc == 0
        tokens = sum(e["usage"]["prompt_tokens"] for e in served["log"])
        [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Teacher spend:")]
        assert f"{served['chat_requests']} teacher calls, {tokens:,} prompt" in line and "$" in line
        assert served["chat_requests"] == len([r for r in ROWS if "question" in r]) - 1

    def test_evaluate_writes_and_prints_the_teachers_totals(self, tiny_model, tmp_path, caplog):
        with TeacherServer(mode="scripted") as srv, caplog.at_level(logging.INFO):
            sets = tiny_overrides(tiny_model, tmp_path, openai_base_url=srv.base_url)
            args = ["evaluate", "--model", tiny_model, "--limit", "3", "--output", str(tmp_path / "eval")]
            rc = main(args + [x for s in sets for x in ("--set", s)])
            requests = srv.stats()["chat_requests"]
        assert rc == 0
        summary = json.loads((tmp_path / "eval" / "eval_summary.json").read_text())
        assert summary["teacher_usage"]["calls"] == requests == 3
        assert any(r.getMessage().startswith("Teacher spend: 3 teacher calls") for r in caplog.records)


class TestSpendSurvivesACrash:
    def test_kill_9_after_a_checkpoint_and_a_step_then_resume_counts_every_billed_token(self, tiny_model, tmp_path):
        """Issue 26 item 4: before, the resumed run counted the checkpoint's totals and forgot what step 3 (and the
        batch judged ahead) had cost, so it counted less than the server billed and could spend the budget again."""
        import signal
        import time

        from tests.test_resume import cli, finish, start, steps_in, wait_for

        with TeacherServer(mode="scripted", latency_s=0.3, hang_s=5.0) as server:
            run = tmp_path / "crash"
            proc = start(cli(tiny_model, tmp_path, server, "crash"))
            wait_for(lambda: (run / "checkpoint-2").is_dir() and 3 in steps_in(run), proc)
            # From now on the server answers nothing (until after the kill), so no answer is on its way back at the
            # kill: every call it billed before it was read by the client, and is counted or forgotten for sure.
            server.set_faults(fault_rate=1.0, faults=("hang",))
            wait_for(lambda: time.monotonic() - max(e.get("t_done", 0) for e in server.stats()["log"]) > 1.0, proc)
            killed_at = time.monotonic()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            server.set_faults(fault_rate=0.0)
            resumed_at = time.monotonic()
            code, log = finish(start([sys.executable, "-m", "grpo_llm_eval.cli", "train", "--resume", str(run)]))
            assert code == 0, log
            billed = [e for e in server.stats()["log"] if e.get("usage") and (e["t_done"] < killed_at or e["t"] > resumed_at)]
        last = [m for m in read_jsonl(run / "metrics.jsonl") if "judge/total_calls" in m][-1]
        assert last["step"] == 4
        assert last["judge/total_prompt_tokens"] == sum(e["usage"]["prompt_tokens"] for e in billed)
        assert last["judge/total_completion_tokens"] == sum(e["usage"]["completion_tokens"] for e in billed)
        assert "Teacher spend after the checkpoint, before the run stopped" in log


class TestOnBudgetEnd:
    def test_verifier_only_trains_on_with_the_verifiers_after_the_budget(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted") as server:
            done = train_cli(tiny_model, tmp_path, server, total_steps=6, save_steps=100, teacher_max_total_tokens=3000,
                             on_budget_end="verifier_only", verifier_format_weight=1.0)
            served = server.stats()["chat_requests"]
        assert done.returncode == 0, done.stderr[-3000:]
        run = tmp_path / "run"
        metrics = [m for m in read_jsonl(run / "metrics.jsonl") if "judge/total_calls" in m]
        assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]  # not stopped
        switched = [m["step"] for m in metrics if m.get("judge/verifier_only")]
        assert switched and switched == list(range(switched[0], 7)) and switched[0] < 6
        said = [line for line in done.stderr.splitlines() if "on_budget_end: verifier_only" in line]
        assert len(said) == 1 and f"from step {switched[0] + 1} on" in said[0]
        assert all(m["judge/calls"] == 0 for m in metrics if m["step"] > switched[0])  # the teacher is not asked
        assert metrics[-1]["judge/total_calls"] == served
        after = [r for r in read_jsonl(run / "rollouts.jsonl") if r["step"] > switched[0] + 1]
        assert after and all(r["judge_status"] is None and r["reward"] == float(r["format_correct"]) for r in after)
        html = build_report(run, output=tmp_path / "r.html").read_text()
        assert f"verifiers only from step</span><b>{switched[0]}<" in html

    def test_verifier_only_without_a_verifier_is_a_config_error(self):
        with pytest.raises(ConfigError) as info:
            load_config(None, ["on_budget_end=verifier_only", "verifier_answer_weight=0", "verifier_format_weight=0"])
        assert str(info.value).startswith("on_budget_end: verifier_only, but no verifier has weight")


class TestEstimate:
    def test_dry_run_estimate_is_within_a_factor_of_a_short_real_run(self, tiny_model, tmp_path):
        """The --dry-run estimate against what the server billed for the same config: calls at most the estimate
        and at least half of it (the cache and identical completions only lower them), prompt tokens from 1x to
        2.5x the server's count (see below), completion tokens inside the estimated range."""
        settings = dict(total_steps=2, save_steps=100, **PRICES)
        with TeacherServer(mode="scripted") as server:
            dry = train_cli(tiny_model, tmp_path, server, "--dry-run", **settings)
            assert dry.returncode == 0, dry.stderr[-3000:]
            done = train_cli(tiny_model, tmp_path, server, **settings)
            assert done.returncode == 0, done.stderr[-3000:]
            billed = [e["usage"] for e in server.stats()["log"] if e.get("usage")]
        said = {k.strip(): v.strip() for k, _, v in (line.lstrip("# ").partition(":")
                                                       for line in dry.stdout.splitlines() if line.startswith("#   "))}
        calls = int(said["calls"].replace(",", ""))
        prompt = int(said["prompt tokens"].replace(",", ""))
        low, high = (int(x.split()[0].replace(",", "")) for x in said["completion tokens"].split(" to "))
        assert calls == 2 * 2 * 4 and "characters / 4" in dry.stdout and "cost: $" in dry.stdout
        assert calls / 2 <= len(billed) <= calls
        real_prompt = sum(u["prompt_tokens"] for u in billed) * calls / len(billed)  # per estimated call
        # The fake server bills whitespace-separated words, fewer than any tokenizer's tokens (measured: 3,840
        # estimated for 1,823 billed, 2.1x); a real tokenizer lands nearer characters / 4. So: at least what was
        # billed, at most 2.5 times it.
        assert 1.0 <= prompt / real_prompt <= 2.5, (prompt, real_prompt)
        assert low <= sum(u["completion_tokens"] for u in billed) * calls / len(billed) <= high
