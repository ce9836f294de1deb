"""SFT on the teacher's feedback: labels, target selection, and the combined GRPO + SFT gradient."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer
from trl import GRPOTrainer

from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.data import build_prompts, load_rows
from grpo_llm_eval.rewards import TeacherRubricReward
from grpo_llm_eval.teacher import build_teacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training import sft
from grpo_llm_eval.training.records import RolloutRecorder, read_jsonl
from grpo_llm_eval.training.train import grpo_args, train
from grpo_llm_eval.training.trainer import TeacherGRPOTrainer
from tests.conftest import tiny_overrides


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


class TestLabels:
    def test_only_the_feedback_turn_is_learned_token_by_token(self, tokenizer):
        chat = sft.feedback_messages([{"role": "user", "content": "What is 2 + 2?"}], "5", "Let's recheck the previous answer", "Wrong: 2 + 2 = 4.")
        ids, labels = sft.tokenize_example(tokenizer, chat, max_len=4096)
        prefix = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
        n_prefix = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        assert len(ids) == len(labels)
        assert labels[:n_prefix] == [sft.IGNORE] * n_prefix
        for i in range(n_prefix, len(ids)):  # every target position predicts exactly its own token
            assert labels[i] == ids[i]
        learned = tokenizer.decode([t for t in labels if t != sft.IGNORE])
        assert learned.startswith("Wrong: 2 + 2 = 4.") and learned.strip().endswith("<|im_end|>")
        assert "5" not in tokenizer.decode(labels[n_prefix:]).split("4.")[0]  # the student's answer is not a target

    def test_truncation_cuts_ids_and_labels_together(self, tokenizer):
        chat = sft.feedback_messages([{"role": "user", "content": "q"}], "a", "recheck", "feedback " * 50)
        full_ids, full_labels = sft.tokenize_example(tokenizer, chat, max_len=4096)
        ids, labels = sft.tokenize_example(tokenizer, chat, max_len=len(full_ids) - 20)
        assert ids == full_ids[: len(ids)] and labels == full_labels[: len(labels)]

    def test_nothing_to_learn_after_truncation_gives_no_example(self, tokenizer):
        chat = sft.feedback_messages([{"role": "user", "content": "q " * 200}], "a", "recheck", "feedback")
        assert sft.tokenize_example(tokenizer, chat, max_len=16) is None


def rec(q, completion, reward, status="ok", feedback="fb"):
    return {"question": q, "completion": completion, "reward": reward, "judge_status": status, "feedback": feedback}


class TestSelectTargets:
    def test_feedback_target_keeps_only_ok_grades_with_feedback(self):
        records = [rec("q", "a", 1.0), rec("q", "b", None, status="timeout", feedback=None), rec("q", "c", 0.5, feedback="  ")]
        chats = sft.select_targets(records, "feedback", 3, "recheck")
        assert len(chats) == 1 and chats[0][-1]["content"] == "fb" and chats[0][2]["content"] == "recheck"

    def test_best_response_is_the_highest_reward_of_each_group_first_on_ties(self):
        records = [rec("q1", "a", 0.2), rec("q1", "b", 0.9), rec("q1", "c", 0.9),
                   rec("q2", "d", 0.5), rec("q2", "e", 0.5), rec("q2", "f", 0.5),  # all tied: skipped
                   rec("q3", "g", None, "timeout"), rec("q3", "h", None, "timeout"), rec("q3", "i", 1.0)]  # one graded
        chats = sft.select_targets(records, "best_response", 3, "recheck")
        assert [c[-1]["content"] for c in chats] == ["b"]


SYSTEM = "Respond in the following format:\n<think>\n...\n</think>\n...\n$\\boxed{answer}$"


class TestSftContextIsThePolicysPrompt:
    def _records(self):
        prompt = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 3?"}]
        return prompt, [{**rec("What is 2 + 3?", text, reward), "prompt": prompt}
                        for text, reward in (("4", 0.0), ("5", 1.0))]

    @pytest.mark.parametrize("target", ["feedback", "best_response"])
    def test_every_sft_chat_starts_with_the_system_prompt_the_policy_saw(self, target):
        """Old code built SFT chats from the bare question: `best_response` trained on answers in a context
        (no system prompt) that the policy never samples in, and feedback chats lost the format instructions."""
        prompt, records = self._records()
        chats = sft.select_targets(records, target, 2, "recheck")
        assert chats and all(chat[: len(prompt)] == prompt for chat in chats)

    def test_best_response_example_prefix_is_token_for_token_what_the_policy_was_fed(self, tokenizer):
        """The tokens before the learned answer are exactly the generation prompt TRL sampled from."""
        prompt, records = self._records()
        [chat] = sft.select_targets(records, "best_response", 2, "recheck")
        ids, labels = sft.tokenize_example(tokenizer, chat, max_len=4096)
        fed = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        fed_ids = tokenizer(fed, add_special_tokens=False)["input_ids"]
        assert ids[: len(fed_ids)] == fed_ids and labels[: len(fed_ids)] == [sft.IGNORE] * len(fed_ids)
        assert tokenizer.decode([t for t in labels if t != sft.IGNORE]).startswith("5")


def make_trainer(tiny_model, tmp_path, server, **extra):
    cfg = load_config(None, tiny_overrides(tiny_model, tmp_path, openai_base_url=server.base_url, **extra))
    out = tmp_path / "run"
    out.mkdir(parents=True, exist_ok=True)
    dataset = build_prompts(load_rows(cfg, "train").dataset, cfg)
    rubric = Rubric.from_config(cfg)
    recorder = RolloutRecorder(out, cfg.num_return_sequences)
    reward = TeacherRubricReward(cfg, rubric, build_teacher(cfg, rubric), recorder)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    trainer = TeacherGRPOTrainer(model=tiny_model, reward_funcs=[reward], args=grpo_args(cfg, out),
                                 train_dataset=dataset, processing_class=tok, run_cfg=cfg, recorder=recorder,
                                 reward=reward)
    return cfg, trainer


def full_logits_sft_loss(model, batch):
    """The plain reference: one forward pass with full-vocabulary logits, mean cross-entropy on the targets."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    n_tokens = int((labels != sft.IGNORE).sum())
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=sft.IGNORE, reduction="sum")
    return loss / n_tokens, n_tokens


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


class TestCombinedGradient:
    def test_gradient_is_grpo_plus_beta_times_sft(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted") as server:
            cfg, trainer = make_trainer(tiny_model, tmp_path, server, sft_beta=0.5, accumulation_steps=2)
            trainer.model.train()
            trainer.current_gradient_accumulation_steps = cfg.accumulation_steps  # set by Trainer.train's loop
            batch = next(iter(trainer.get_train_dataloader()))
            inputs = trainer._prepare_inputs(batch)
        model = trainer.model
        params = [p for p in model.parameters() if p.requires_grad]
        assert any(trainer.sft_chunks), "the scripted teacher's feedback should give SFT examples"
        total = grads(trainer.compute_loss(model, inputs), params)
        grpo = grads(GRPOTrainer.compute_loss(trainer, model, inputs), params)
        chunk = trainer.sft_chunks[trainer._step % trainer.args.steps_per_generation]
        s_loss, n_tokens = full_logits_sft_loss(model, sft.collate(chunk, trainer.processing_class.pad_token_id, "cpu"))
        assert n_tokens > 0 and math.isfinite(s_loss.item())
        sft_g = grads(s_loss, params)
        accum = trainer.current_gradient_accumulation_steps
        assert accum == 2
        checked = 0
        for t, g, s in zip(total, grpo, sft_g, strict=True):
            if t is None:
                continue
            expected = (g if g is not None else 0) + cfg.sft_beta * (s if s is not None else 0) / accum
            torch.testing.assert_close(t, expected, rtol=1e-4, atol=1e-6)
            checked += 1
        assert checked > 0
        # and the SFT term really moves the gradient (the test would pass vacuously otherwise)
        assert max((t - g).abs().max().item() for t, g in zip(total, grpo, strict=True) if g is not None) > 0


class TestSftBetaZeroIsPlainTrl:
    def test_one_update_equals_plain_grpo_trainer(self, tiny_model, tmp_path):
        def reward_len(prompts, completions, **_):
            return [float(len(c[0]["content"]) % 7) for c in completions]

        with TeacherServer(mode="scripted") as server:
            cfg, ours = make_trainer(tiny_model, tmp_path / "ours", server, sft_beta=0.0, total_steps=1,
                                     teacher_weight=0.0, verifier_format_weight=0.0, verifier_answer_weight=1.0)
        # replace the reward with a plain function on both sides, so the comparison is of the update alone
        ours.reward_funcs = [reward_len]
        ours.teacher_reward = None
        ours.recorder = None
        args = grpo_args(cfg, tmp_path / "plain")
        plain = GRPOTrainer(model=tiny_model, reward_funcs=[reward_len], args=args,
                            train_dataset=ours.train_dataset, processing_class=ours.processing_class)
        from transformers import set_seed

        set_seed(cfg.seed)  # same RNG state at the start of each run: same sampled completions
        ours.train()
        set_seed(cfg.seed)
        plain.train()
        for (name, a), (_, b) in zip(ours.model.named_parameters(), plain.model.named_parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


class TestOfflineRunWithSft:
    @pytest.mark.slow
    def test_two_step_run_with_the_local_teacher_logs_a_positive_sft_loss(self, tiny_model, tmp_path):
        cfg = load_config(None, tiny_overrides(tiny_model, tmp_path, teacher_backend="local",
                                               teacher_model_name="bundled:smollm2-135m-instruct",
                                               teacher_structured_output=True, max_feedback_new_tokens=64,
                                               sft_beta=0.5, prompts_per_step=1))
        result = train(cfg)
        losses = [m["sft_loss"] for m in read_jsonl(result.run_dir / "metrics.jsonl") if "sft_loss" in m]
        assert losses and all(math.isfinite(v) and v > 0 for v in losses)
