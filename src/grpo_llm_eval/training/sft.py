"""SFT examples on the teacher's feedback (or the best response of each group), with loss-only-on-target labels."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

IGNORE = -100


def prompt_messages(record: dict) -> list[dict]:
    """The chat the policy sampled RECORD's completion from (system prompt included); else the bare question."""
    return [dict(m) for m in record.get("prompt") or [{"role": "user", "content": record["question"]}]]


def feedback_messages(prompt: list[dict], response: str, recheck: str, feedback: str) -> list[dict]:
    """[the policy's prompt (system, user), assistant: student response, user: recheck, assistant: feedback]."""
    return [
        *prompt,
        {"role": "assistant", "content": response},
        {"role": "user", "content": recheck},
        {"role": "assistant", "content": feedback},
    ]


def tokenize_example(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]] | None:
    """Token ids and labels for a chat whose last assistant turn is the target; None if nothing to learn remains.

    The prefix (all turns but the last, with the generation prompt) is masked with -100. The target text is the
    chat template's rendering of the last turn (end-of-turn marker included), so the model learns to stop.
    Truncation cuts ids and labels together from the right, which keeps the masking aligned.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prefix = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prefix):
        raise ValueError("the chat template renders the conversation's prefix differently from the whole; "
                         "SFT needs a template whose last assistant turn is appended at the end")
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(full[len(prefix):], add_special_tokens=False)["input_ids"]
    ids = (prefix_ids + target_ids)[:max_len]
    labels = ([IGNORE] * len(prefix_ids) + target_ids)[:max_len]
    if all(label == IGNORE for label in labels):
        return None
    return ids, labels


def select_targets(records: list[dict], target: str, num_generations: int, recheck: str) -> list[list[dict]]:
    """Chats to learn from, out of one process's records of a generation batch.

    Each chat starts with the prompt the policy sampled from (system prompt included), so the SFT term trains
    in the context the policy is used in.
    feedback: every completion graded `ok` with non-empty feedback.
    best_response: the highest-reward completion of each group (ties: the first); groups with no reward or
    whose rewards all tie are skipped, since they say nothing about which answer is better.
    """
    chats = []
    if target == "feedback":
        for r in records:
            if r.get("judge_status") == "ok" and (r.get("feedback") or "").strip():
                chats.append(feedback_messages(prompt_messages(r), r["completion"], recheck, r["feedback"]))
        return chats
    for start in range(0, len(records), num_generations):
        group = [r for r in records[start:start + num_generations] if r.get("reward") is not None]
        if len(group) < 2 or len({r["reward"] for r in group}) == 1:
            continue
        best = max(group, key=lambda r: r["reward"])  # max keeps the first of equal maxima: deterministic
        chats.append([*prompt_messages(best), {"role": "assistant", "content": best["completion"]}])
    return chats


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Right-padded batch of input_ids, attention_mask and labels."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (i, lab) in enumerate(examples):
        ids[row, : len(i)] = torch.tensor(i)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(i)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
