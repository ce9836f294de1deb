"""Soak: 200 steps against a teacher that injects every fault kind at 20%. Every completion is recorded
exactly once, the failures the run reports add up to the faults the server injected, and no NaN appears.

Accounting. Each injected fault that can fail a call (500, 429, hang, drop, garbage, empty, huge) either
makes the client retry (retryable kinds, while retries last) or ends that grade as a failure; "noisy" and
"trickle" answers still grade fine. So: failing faults == retries + failed grades, and the non-retryable
kinds map one to one onto statuses (garbage and huge -> unparseable, empty -> empty).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest

from grpo_llm_eval.testing import ALL_FAULTS, TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.train import train
from tests.reliability.helpers import rows_by_step, tiny_cfg

STEPS, GROUP = 200, 2
FAILING = ("500", "429", "hang", "drop", "garbage", "empty", "huge")
RETRYABLE_STATUS = {"500": "http_error", "429": "rate_limited", "hang": "timeout", "drop": "connection_error"}


@pytest.mark.slow
def test_two_hundred_steps_at_twenty_percent_faults(tiny_model, tmp_path):
    with TeacherServer(mode="scripted", fault_rate=0.2, seed=11, faults=ALL_FAULTS, hang_s=1.5, retry_after_s=0.1,
                       huge_chars=300_000) as srv:
        cfg = tiny_cfg(tiny_model, tmp_path, srv.base_url, total_steps=STEPS, save_steps=20, save_total_limit=2,
                       teacher_timeout_s=1.0, teacher_max_retries=3, max_consecutive_failed_steps=STEPS)
        result = train(cfg)
        stats = srv.stats()
    out = result.run_dir
    assert result.global_step == STEPS

    # Every completion exactly once: GROUP rows for each of steps 1..STEPS, (step, index) unique.
    rows = read_jsonl(out / "rollouts.jsonl")
    steps = rows_by_step(rows)
    assert sorted(steps) == list(range(1, STEPS + 1)) and all(len(r) == GROUP for r in steps.values())
    assert len({(r["step"], r["index"]) for r in rows}) == len(rows) == STEPS * GROUP
    for r in rows:
        assert (r["reward"] is None) == (r["judge_status"] != "ok") and (r["advantage"] is None) == (r["reward"] is None)

    # The run's own account of its failures, from metrics.jsonl (one row per step: logging_steps=1).
    metrics = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    failed_by_status = Counter()
    for m in metrics:
        for key, rate in m.items():
            if key.startswith("judge/status_"):
                failed_by_status[key.removeprefix("judge/status_")] += round(rate * GROUP)
    failed = sum(failed_by_status.values())
    assert failed == round(sum(m["judge/failure_rate"] * GROUP for m in metrics))
    assert failed_by_status == Counter(r["judge_status"] for r in rows if r["judge_status"] != "ok")
    retries = sum(r["judge_attempts"] - 1 for r in rows)
    if "judge/retries" in metrics[0]:  # per-step sums, where the run logs them
        assert retries == round(sum(m["judge/retries"] for m in metrics))

    # ... against the server's count of what it injected.
    faults = stats["faults"]
    assert all(faults[k] > 0 for k in ALL_FAULTS), faults  # every kind was exercised
    assert sum(faults[k] for k in FAILING) == retries + failed
    assert failed_by_status["unparseable"] == faults["garbage"] + faults["huge"]
    assert failed_by_status["empty"] == faults["empty"]
    for kind, status in RETRYABLE_STATUS.items():
        assert failed_by_status[status] <= faults[kind]
    assert stats["chat_requests"] == sum(r["judge_attempts"] for r in rows)

    print(f"soak: {len(rows)} grades, {stats['chat_requests']} requests, faults {dict(faults)}, retries {retries}, "
          f"failed {dict(failed_by_status)}, mean step {sum(m['step_time'] for m in metrics) / STEPS:.2f}s")

    # No NaN reached the optimizer; checkpoints every 20 steps, the last two kept.
    for m in metrics:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]), m["step"]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-180", "checkpoint-200"]
