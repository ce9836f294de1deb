"""Two data-parallel CPU processes with the SFT term on, where every grade of one process's prompts fails: the
processes must run the same collectives (no hang) and end with the same weights."""

from __future__ import annotations

import json
import subprocess

import pytest

from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from tests.conftest import tiny_overrides
from tests.test_multiprocess import ROOT, cpu_launch

FAILING_TRUTH = "424242"  # every grade of the prompt with this answer fails
STEPS, GROUP, TIMEOUT_S = 2, 4, 240  # the run takes about 30 s on 2 busy cores


class OneQuestionUngradable(TeacherServer):
    """The scripted teacher, except that it answers garbage (unparseable) for one question's completions."""

    def completion(self, body, fault, number=0):
        text = "\n".join(str(m.get("content")) for m in body.get("messages", []))
        return super().completion(body, "garbage" if FAILING_TRUTH in text else fault, number)


def _launch(cmd: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    """Run CMD; on timeout kill it and every process it started (torchrun's workers have sessions of their own)."""
    import psutil

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            child.kill()
        out, _ = proc.communicate()
        return None, out


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess-sft")
    data, out, digests = base / "two.jsonl", base / "runs", base / "digests"
    # Two prompts, one per process at every step (2 processes x 1 prompt): one process's grades all fail.
    data.write_text("".join(json.dumps(r) + "\n" for r in (
        {"question": "What is 2 + 3?", "answer": "5"}, {"question": "What is 424241 + 1?", "answer": FAILING_TRUTH})))
    with OneQuestionUngradable(mode="scripted") as server:
        overrides = tiny_overrides(tiny_model, out, openai_base_url=server.base_url, total_steps=STEPS,
                                   prompts_per_step=1, num_return_sequences=GROUP, save_steps=STEPS,
                                   dataset_name=str(data), teacher_max_retries=0, teacher_timeout_s=30,
                                   sft_beta=1.0, judge_ahead_steps=0)
        cmd, env = cpu_launch(overrides, digests, 2)
        rc, output = _launch(cmd, env, TIMEOUT_S)
    return {"rc": rc, "output": output, "run": out / "run", "digests": digests}


class TestSftWithOneProcessUngraded:
    def test_finishes_in_time_with_the_same_weights_on_both_processes(self, launched, tiny_model):
        """Old code ran the SFT forward pass only on the process that had SFT examples: the other went
        straight to the backward pass, so the processes' collectives no longer matched (a hang or a crash
        under DDP; unpartnered all-gathers under FSDP/ZeRO-3)."""
        from transformers import AutoModelForCausalLM

        from grpo_llm_eval.training.callbacks import weights_digest

        assert launched["rc"] is not None, f"no exit within {TIMEOUT_S} s (hung):\n{launched['output'][-3000:]}"
        assert launched["rc"] == 0, launched["output"][-4000:]
        rows = read_jsonl(launched["run"] / "rollouts.jsonl")
        for step in range(1, STEPS + 1):  # the case really happened: per step one group graded, one not at all
            by_truth = {t: {r["judge_status"] for r in rows if r["step"] == step and r["ground_truth"] == t}
                        for t in ("5", FAILING_TRUTH)}
            assert by_truth == {"5": {"ok"}, FAILING_TRUTH: {"unparseable"}}, by_truth
        digests = [json.loads((launched["digests"] / f"rank-{i}.json").read_text()) for i in range(2)]
        assert all(d["global_step"] == STEPS for d in digests)
        initial = weights_digest(AutoModelForCausalLM.from_pretrained(tiny_model))
        assert {d["begin"] for d in digests} == {initial}
        ends = {d["end"] for d in digests}
        assert len(ends) == 1, "the processes' weights diverged"
        assert ends != {initial}, "the SFT term should have moved the weights"

