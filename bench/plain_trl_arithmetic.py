"""Plain TRL on the bundled task: trl.GRPOTrainer with an exact-answer reward only (the issue's baseline).

Same student, data, prompt and GRPO settings as the offline default (configs/offline.yaml): 4 prompts x 8
completions per step, 16 new tokens, lr 1e-5, beta 0; only the reward and the trainer differ. Stops after
--minutes of training (or --steps), saves the model to OUT/final and the logged metrics to OUT/metrics.jsonl.

    python bench/plain_trl_arithmetic.py --out runs/ablation/plain_trl --minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from transformers import TrainerCallback

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class MetricsFile(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        row = {"step": state.global_step, **{k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def exact_answer(prompts, completions, answer, **_):
    from grpo_llm_eval.rewards import completion_text
    from grpo_llm_eval.verifiers import answer_correct

    return [float(bool(answer_correct(completion_text(c), a, "</think>"))) for c, a in zip(completions, answer, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for final/ and metrics.jsonl")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time budget (0: none)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--set", action="append", default=[], help="config overrides, as for grpo_llm_eval")
    args = parser.parse_args()

    from transformers import AutoTokenizer
    from trl import GRPOTrainer

    from grpo_llm_eval import data
    from grpo_llm_eval.config.load import load_config
    from grpo_llm_eval.models import load_student
    from grpo_llm_eval.training.callbacks import TimeBudget
    from grpo_llm_eval.training.train import grpo_args

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [f"total_steps={args.steps}", "save_steps=100000", *args.set])
    student = load_student(cfg)  # the bundled model, converted once into safetensors
    dataset = data.build_prompts(data.load_rows(cfg, cfg.dataset_split).dataset, cfg)
    callbacks = [MetricsFile(out / "metrics.jsonl")]
    if args.minutes > 0:
        callbacks.append(TimeBudget(args.minutes))
    trainer = GRPOTrainer(model=student.model, reward_funcs=[exact_answer], args=grpo_args(cfg, out / "trainer"),
                          train_dataset=dataset, processing_class=student.tokenizer, callbacks=callbacks)
    trainer.train()
    trainer.save_model(str(out / "final"))
    AutoTokenizer.from_pretrained(student.path).save_pretrained(str(out / "final"))
    print(f"plain TRL: {trainer.state.global_step} steps, model in {out / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
