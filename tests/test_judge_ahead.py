"""Judging ahead: batches are graded while earlier ones train, with their sampling log-probs kept for the ratio."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training import judge_ahead
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.train import train
from tests.conftest import tiny_overrides


class TestQueueArithmetic:
    @pytest.mark.parametrize(("global_step", "depth", "wanted"), [(0, 1, 2), (1, 1, 2), (2, 1, 2), (3, 1, 1),
                                                                  (0, 2, 3), (2, 2, 2), (3, 2, 1), (0, 0, 1)])
    def test_the_queue_never_holds_a_rollout_no_step_will_train(self, global_step, depth, wanted):
        remaining = judge_ahead.remaining_generation_calls(global_step, 4, 0, 1, 1)
        assert remaining == 4 - global_step
        assert judge_ahead.RolloutQueue(depth).wanted(remaining) == wanted

    def test_generation_calls_count_micro_steps_and_steps_per_generation(self):
        # 3 steps x 4 accumulation micro-steps, one generation every 2 micro-steps: 6 calls; after step 1 and
        # one more micro-step, 12 - 5 = 7 micro-steps are left: 4 calls (the current one included)
        assert judge_ahead.remaining_generation_calls(0, 3, 0, 4, 2) == 6
        assert judge_ahead.remaining_generation_calls(1, 3, 1, 4, 2) == 4


class TestAutoDepth:
    """judge_ahead_steps: auto (judge_ahead.AutoDepth): the lag follows the teacher's latency over the step time."""

    def run(self, auto, latency, step, decisions=1):
        for _ in range(decisions):
            auto.observe(latency, step)
            depth = auto.decide()
        return depth

    def test_no_measurement_keeps_the_start(self):
        assert judge_ahead.AutoDepth(4).decide() == 1
        assert judge_ahead.AutoDepth(0).decide() == 0

    def test_a_slow_teacher_raises_the_lag_at_once_to_hide_it(self):
        auto = judge_ahead.AutoDepth(4)
        assert self.run(auto, 10.0, 4.0) == 3  # ceil(1.1 x 10 / 4): judging fits in the 3 steps that follow
        assert self.run(judge_ahead.AutoDepth(4), 2.0, 4.0) == 1

    def test_the_lag_is_bounded(self):
        assert self.run(judge_ahead.AutoDepth(4), 60.0, 1.0) == 4
        assert self.run(judge_ahead.AutoDepth(2), 60.0, 1.0) == 2

    def test_a_fast_teacher_is_waited_for_only_after_several_steps_ask_for_it(self):
        """No staleness for a teacher under a tenth of a step; lowering waits for LOWER_AFTER decisions in a
        row, so one quick batch (a cache hit, say) does not drain the queue."""
        auto = judge_ahead.AutoDepth(4)
        self.run(auto, 10.0, 4.0)
        window, lower_after = judge_ahead.AutoDepth.WINDOW, judge_ahead.AutoDepth.LOWER_AFTER
        # the slowest of the last WINDOW latencies counts: until the slow one leaves it, nothing asks for less
        assert self.run(auto, 0.1, 4.0, decisions=window - 1) == 3
        assert self.run(auto, 0.1, 4.0, decisions=lower_after - 1) == 3
        assert self.run(auto, 0.1, 4.0) == 0

    def test_a_step_measurement_of_none_is_ignored(self):
        auto = judge_ahead.AutoDepth(4)
        auto.observe(10.0, None)
        assert auto.decide() == 1  # no step time yet: no decision
        auto.observe(None, 5.0)
        assert auto.decide() == 3

    def test_the_state_round_trips(self):
        auto = judge_ahead.AutoDepth(4)
        self.run(auto, 10.0, 4.0)
        again = judge_ahead.AutoDepth(4)
        again.restore(auto.state())
        assert again.state() == auto.state() and again.decide() == auto.decide()


def test_sampling_logps_match_a_direct_forward_pass_for_ragged_lengths(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    from grpo_llm_eval import data
    from grpo_llm_eval.training.train import grpo_args

    cfg = load_config(None, tiny_overrides(tiny_model, tmp_path))
    dataset = data.build_prompts(data.load_rows(cfg, "train").dataset, cfg)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    trainer = GRPOTrainer(model=tiny_model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                          args=grpo_args(cfg, tmp_path / "t"), train_dataset=dataset, processing_class=tok)
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    got = judge_ahead.sampling_logps(trainer, prompts, completions)
    assert got.shape == (2, 4)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for row, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = model(ids).logits[0, len(p) - 1:-1] / cfg.temperature
        want = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(c)[:, None])[:, 0]
        torch.testing.assert_close(got[row, : len(c)], want, rtol=1e-4, atol=1e-4)


class TestPipelinedRun:
    def test_batches_train_one_step_after_sampling_and_judging_overlaps(self, tiny_model, tmp_path, caplog):
        with TeacherServer(mode="scripted", latency_s=0.5) as server, caplog.at_level(logging.INFO):
            cfg = load_config(None, tiny_overrides(tiny_model, tmp_path, openai_base_url=server.base_url,
                                                   total_steps=4, save_steps=100, judge_ahead_steps=1))
            result = train(cfg)
            requests = server.stats()["chat_requests"]
        sources = [r.getMessage() for r in caplog.records if "sampling log-probs recorded from" in r.getMessage()]
        assert sources == ["Judging ahead: sampling log-probs recorded from generation."]  # no forward pass
        rows = read_jsonl(result.run_dir / "rollouts.jsonl")
        prompts = {s: {json.dumps(r["prompt"]) for r in rows if r["step"] == s} for s in range(1, 5)}
        # the first prompts are sampled twice to fill the queue, then each step trains the previous call's batch
        assert prompts[1] == prompts[2] and prompts[2] != prompts[3] != prompts[4]
        # nothing was judged that no step trained: every request the server saw belongs to a recorded rollout
        assert requests == sum(1 for r in rows if not r["cached"])
        steps = [m for m in read_jsonl(result.run_dir / "metrics.jsonl") if "time/step_s" in m]
        assert [m["step"] for m in steps] == [1, 2, 3, 4]
        assert all(m["time/judge_wait_s"] <= m["time/judge_s"] for m in steps)
        for m in steps[1:]:
            assert m["time/judge_s"] >= 0.5  # a full round at the server's latency...
            assert m["time/judge_overlap_s"] > 0  # ...partly hidden behind the previous step's training
        for m in steps[:-1]:
            assert {"time/generate_s", "time/old_logps_s", "time/train_s"} <= set(m)
        assert "time/generate_s" not in steps[-1]  # the last step samples nothing that no step would train

    def test_synchronous_mode_waits_for_every_grade_and_samples_each_batch_once(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted", latency_s=0.3) as server:
            cfg = load_config(None, tiny_overrides(tiny_model, tmp_path, openai_base_url=server.base_url,
                                                   total_steps=2, save_steps=100, judge_ahead_steps=0))
            result = train(cfg)
        rows = read_jsonl(result.run_dir / "rollouts.jsonl")
        assert {json.dumps(r["prompt"]) for r in rows if r["step"] == 1} != {
            json.dumps(r["prompt"]) for r in rows if r["step"] == 2}
        steps = [m for m in read_jsonl(result.run_dir / "metrics.jsonl") if "time/step_s" in m]
        assert all(m["time/judge_overlap_s"] == pytest.approx(0.0, abs=0.05) for m in steps)
        assert all("time/old_logps_s" not in m for m in steps)


class TestBackgroundJudgingOfIdenticalBatches:
    def test_two_identical_batches_each_use_their_own_call(self):
        """Old code keyed the background futures by the batch's (question, text) tuples: the second identical
        batch replaced the first's future, whose paid calls were never used, and the second scoring graded again."""
        import asyncio
        import threading

        from grpo_llm_eval.rewards import TeacherRubricReward
        from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher
        from grpo_llm_eval.teacher.grading.rubric import Rubric

        prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 2
        completions = [[{"role": "assistant", "content": "<think>x</think> 4"}],
                       [{"role": "assistant", "content": "<think>y</think> 5"}]]
        rows = [{"question": "What is 2 + 2?", "answer": "4"}] * 2
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        with TeacherServer(mode="scripted") as server:
            cfg = load_config(None, ["teacher_backend=openai", "teacher_model_name=teacher", "teacher_cache=false",
                                     f"openai_base_url={server.base_url}", "teacher_max_retries=0",
                                     "max_feedback_new_tokens=512", "teacher_logprob_scores=false"])
            rubric = Rubric.from_config(cfg)
            teacher = OpenAITeacher(cfg, rubric)
            reward = TeacherRubricReward(cfg, rubric, teacher)
            try:
                for _ in range(2):  # sampled twice, identical (a collapsed policy), judged ahead
                    reward.judge_in_background(loop, prompts, completions, rows)
                for _ in range(2):  # scored in turn
                    scored = asyncio.run_coroutine_threadsafe(
                        reward(prompts, completions, answer=["4", "4"], question=["What is 2 + 2?"] * 2), loop)
                    assert len(scored.result(timeout=60)) == 2
                requests = server.stats()["chat_requests"]
            finally:
                asyncio.run_coroutine_threadsafe(teacher.aclose(), loop).result(timeout=30)
                loop.call_soon_threadsafe(loop.stop)
                thread.join(timeout=10)
        assert requests == 4  # two batches of two, each graded once
        assert not reward._ahead
