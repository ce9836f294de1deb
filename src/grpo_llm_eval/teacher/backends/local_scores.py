"""Logprob scores from a local llama.cpp teacher without decoding the grade: the JSON is forced, the scores are read.

Grammar-constrained decoding (what ``teacher_structured_output`` does) makes a small teacher write parseable
grades, but in llama-cpp-python it is the cost of a grade: every decoded token is checked against the grammar
over the whole vocabulary (about 30 ms a token on one core for SmolLM2's 49k vocabulary, against 5 ms
without), and most tokens of ``{"thought_process": 7, "answer": 3, ...}`` are keys the grammar forces anyway.

Here the keys are not decoded at all. For each criterion the teacher reads the grade so far up to
``"name": `` and one forward pass gives the next-token distribution; the probability of each integer on the
criterion's scale is read from the digit tokens (one more pass for a first digit that can continue, such as
the "1" of "10"), renormalised over the scale, and the criterion's score is the probability-weighted mean
(the same meaning as ``teacher_logprob_scores`` has with an OpenAI server). The most likely integer is written
into the grade before the next key, as greedy decoding would. An explanation of up to
``max_feedback_new_tokens`` tokens is then decoded freely up to its closing quote (0: none, and the grade is
the scores alone: the offline default, where nothing reads it). llama.cpp reuses the KV cache of the prompt
prefix each pass shares with the previous one, so a grade costs the tokens that differ; and the "1" that may
continue into "10" is evaluated in the same decode as the key before it, with logits kept for both positions,
so a criterion costs one llama.cpp call. On CPU a call costs about as much again as a token, and a one-token
call computes differently from a longer one (its probabilities differed by up to 0.05), so reading it in
the key's decode is both cheaper and the same reading a fresh evaluation of the whole text gives.

In group form (``judge_mode: group``, `ForcedScorer.grade_group`) the grade is ``{"R1": {...}, "R2": {...}}``: the
same keys forced under each label, the digits read per criterion per label, a short explanation per label.

It applies when every criterion's scale has integer ends within 0..99 and the teacher's tokenizer writes each
digit as its own token after ``": `` (SmolLM2, Llama 3, Qwen do); ``ForcedScorer.supports`` says whether it
does, and the backend otherwise falls back to grammar decoding with logprobs.
"""

from __future__ import annotations

import json
import math

import numpy as np

DIGITS = "0123456789"
_KEY_END = '": '  # the forced text before a score


def forced_scale(criterion) -> list[int] | None:
    """The integers of CRITERION's scale, where the forced-key scorer can read it (integer ends in 0..99)."""
    lo, hi = criterion.min, criterion.max
    if not (float(lo).is_integer() and float(hi).is_integer()) or lo < 0 or hi > 99:
        return None
    return list(range(int(lo), int(hi) + 1))


class ForcedScorer:
    """Grades one chat prompt on a rubric with forced JSON keys and digit-token probabilities."""

    def __init__(self, llm, rubric, explanation_tokens: int):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        self.rubric = rubric
        self.explanation_tokens = max(0, int(explanation_tokens))
        self._digit_ids = self._single_digit_tokens()
        self._batch_handle = None
        template = llm.metadata.get("tokenizer.chat_template")
        self._formatter = None
        if template:
            eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "replace")
            bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "replace")
            self._formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)

    def _tokens(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)

    def _single_digit_tokens(self) -> list[int] | None:
        """Each digit's token id, if each digit is one token that tokenizes the same after ``": ``."""
        base = self.llm.tokenize(_KEY_END.encode(), add_bos=False, special=False)
        ids = []
        for d in DIGITS:
            toks = self.llm.tokenize((_KEY_END + d).encode(), add_bos=False, special=False)
            if toks[:-1] != base or len(self.llm.tokenize(d.encode(), add_bos=False, special=False)) != 1:
                return None
            ids.append(toks[-1])
        return ids

    @property
    def supports(self) -> bool:
        """Whether this teacher and rubric can be graded this way (else: grammar decoding)."""
        return (self._formatter is not None and self._digit_ids is not None
                and all(forced_scale(c) is not None for c in self.rubric.criteria))

    def _next_token_probs(self, text: str, then: str = "") -> list[np.ndarray]:
        """Probabilities of the token after TEXT (and, with THEN one more token, after TEXT + THEN), evaluating only
        what differs from the cached prefix, in ONE llama.cpp decode: a call costs about as much as a token on
        CPU, so reading the "1" of "10" beside the key before it saves a call per criterion."""
        tokens = self._tokens(text)
        rows = 1
        if then:
            longer = self._tokens(text + then)
            if len(longer) == len(tokens) + 1 and longer[:-1] == tokens:
                tokens, rows = longer, 2
            else:  # THEN merges with what precedes it: read it in a pass of its own
                return self._next_token_probs(text) + self._next_token_probs(text + then)
        return self._decode(tokens, rows)

    def _decode(self, tokens: list[int], rows: int) -> list[np.ndarray]:
        """Evaluate TOKENS from what the KV cache holds; the next-token probabilities after each of the last ROWS."""
        import llama_cpp

        llm = self.llm
        cached = llm.input_ids[: llm.n_tokens]
        common = 0
        for a, b in zip(cached, tokens, strict=False):
            if a != b:
                break
            common += 1
        llm.n_tokens = min(common, len(tokens) - rows)  # the rows read are evaluated now, so their logits are fresh
        head, tail = tokens[llm.n_tokens:-llm.n_batch], tokens[llm.n_tokens:][-llm.n_batch:]
        if head:
            llm.eval(head)
        # What Llama.eval does for a batch, with logits kept for the last ROWS positions rather than the last alone.
        n_past = llm.n_tokens
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, n_past, -1)
        batch = self._batch
        batch.n_tokens = len(tail)
        for i, token in enumerate(tail):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, n_past + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i >= len(tail) - rows
        code = llama_cpp.llama_decode(llm.ctx, batch)
        if code != 0:
            llm.n_tokens = n_past  # what the cache holds for certain
            raise RuntimeError(f"llama_decode returned {code}")
        llm.input_ids[n_past: n_past + len(tail)] = tail
        llm.n_tokens = n_past + len(tail)
        out = []
        for i in range(len(tail) - rows, len(tail)):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, i), shape=(llm.n_vocab(),))
            logits = logits.astype(np.float64)
            logits -= logits.max()
            probs = np.exp(logits)
            out.append(probs / probs.sum())
        return out

    @property
    def _batch(self):
        """One llama_batch of n_batch tokens, for this scorer's lifetime (freed with it)."""
        if self._batch_handle is None:
            import weakref

            import llama_cpp

            self._batch_handle = llama_cpp.llama_batch_init(self.llm.n_batch, 0, 1)
            weakref.finalize(self, llama_cpp.llama_batch_free, self._batch_handle)
        return self._batch_handle

    def _scale_probs(self, text: str, scale: list[int]) -> dict[int, float]:
        """P(value) for each integer of SCALE written after TEXT, before renormalisation."""
        strings = {v: str(v) for v in scale}
        out: dict[int, float] = {}
        # The first digit that can continue (the "1" of "10") is read in the same decode as TEXT.
        ahead = next((d for d in DIGITS if any(s.startswith(d) and len(s) > 1 for s in strings.values())), "")
        read: dict[str, np.ndarray] = {}

        def probs_after(prefix: str) -> np.ndarray:
            if prefix not in read:
                if prefix == "" and ahead:
                    read[""], read[ahead] = self._next_token_probs(text, ahead)
                else:
                    read[prefix] = self._next_token_probs(text + prefix)[0]
            return read[prefix]

        def walk(prefix: str, mass: float) -> None:
            probs = probs_after(prefix)
            digit = probs[self._digit_ids]
            stop = max(0.0, 1.0 - float(digit.sum()))  # anything but a digit ends the number
            if prefix and prefix in strings.values():
                value = int(prefix)
                longer = any(s.startswith(prefix) and len(s) > len(prefix) for s in strings.values())
                out[value] = mass * (stop if longer else 1.0)
            for d, p in zip(DIGITS, digit, strict=True):
                nxt = prefix + d
                if nxt == "0" * len(nxt) and len(nxt) > 1:
                    continue
                if not any(s.startswith(nxt) for s in strings.values()):
                    continue
                if any(s.startswith(nxt) and len(s) > len(nxt) for s in strings.values()):
                    walk(nxt, mass * float(p))
                else:
                    out[int(nxt)] = out.get(int(nxt), 0.0) + mass * float(p)

        walk("", 1.0)
        return out

    def token_counts(self, messages: list[dict], grade: str) -> tuple[int, int]:
        """(prompt tokens, grade tokens) of one grading, by the model's tokenizer: what it would cost served."""
        prompt = self._formatter(messages=messages).prompt
        return len(self._tokens(prompt)), len(self.llm.tokenize(grade.encode("utf-8"), add_bos=False, special=False))

    def grade(self, messages: list[dict], criteria=None) -> tuple[str, dict[str, float | None]]:
        """(the grade as JSON text, each criterion's probability-weighted score or None); CRITERIA: the request's
        own (an example's rubric items), else the run rubric's."""
        prompt = self._formatter(messages=messages).prompt
        return self._fill(prompt, "{", criteria)

    def grade_group(self, messages: list[dict], labels: list[str],
                    criteria=None) -> tuple[str, list[dict[str, float | None]]]:
        """A group grade ``{"R1": {grade}, "R2": {grade}, ...}`` (``judge_mode: group``) and each label's scores.

        Each label's object is forced and read as `grade` reads one, right after the prompt (``{"Rk": {`` forced),
        not after the grades written for the labels before it: the teacher sees every response, but no grade is
        conditioned on the ones before it. Measured on the bundled 135M teacher, a label read after the others'
        grades copied them and counted up (format 1, 2, ..., 8 for R1..R8 of one group). The prompt is evaluated
        once; every later pass re-evaluates only the few tokens after it, from the KV cache.
        """
        prompt = self._formatter(messages=messages).prompt
        blocks, per_label = [], []
        for label in labels:
            block, scores = self._fill(prompt, "{" + json.dumps(label)[:-1] + _KEY_END + "{", criteria)
            blocks.append(block[1:])
            per_label.append(scores)
        return "{" + ", ".join(blocks) + "}", per_label

    def _fill(self, prompt: str, opening: str, criteria=None) -> tuple[str, dict[str, float | None]]:
        """OPENING and one grade object written after PROMPT: forced keys, the most likely integer of each score,
        an explanation decoded up to its closing quote; with each criterion's probability-weighted score."""
        text = ""
        scores: dict[str, float | None] = {}
        for i, c in enumerate(criteria if criteria is not None else self.rubric.criteria):
            text += (opening if i == 0 else ", ") + json.dumps(c.name)[:-1] + _KEY_END
            probs = self._scale_probs(prompt + text, forced_scale(c))
            total = sum(probs.values())
            if not total > 0 or not math.isfinite(total):
                scores[c.name] = None
                text += str(int(c.min))
                continue
            scores[c.name] = sum(v * p for v, p in probs.items()) / total
            text += str(max(probs, key=probs.get))
        if self.explanation_tokens:
            text += ', "explanation": "'
            out = self.llm.create_completion(prompt + text, max_tokens=self.explanation_tokens, temperature=0.0,
                                             stop=['"'])
            text += json.dumps(out["choices"][0]["text"])[1:]  # escaped, with its closing quote
        return text + "}", scores
