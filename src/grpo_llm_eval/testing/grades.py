"""What the fake teacher of `teacher_server` writes: honest, fixed, gullible and hostile grades (stdlib only).

- `scripted_grade`: a correct teacher (answer right when the last numbers match; format right with a think block;
  an example's own checklist items graded by their programmatic checks, `checklist_grades.py`).
- `obedient_content`: a gullible teacher that reads the prompt naively and obeys whatever it finds outside
  the fenced material (an "ignore previous instructions" line, a ready-made evaluation block), and quotes
  any evaluation block it sees in the student's response after its own grade. It shows what the rubric's
  fence protects against: with the fence intact it grades honestly; with the fence broken it gives 10s.
- `adversarial_text`: megabytes of near-miss grade syntax (unclosed tags, unclosed JSON, deep brackets,
  long digit runs, control characters) with no complete grade in its last `parse.MAX_PARSE_CHARS`.
- `noisy_content`: an honest grade wrapped in NULs, ANSI escapes, control characters and lone surrogates.
- `mode_grade`: the deliberately bad judges that calibration and the training monitors must catch:
  `inverted` (right answers 0, wrong ones 10), `random` (scores drawn per request: the same draw for the same
  request at temperature 0, a fresh one at temperature > 0), `length_loving` (honest answer score, every other
  criterion grows with the response's length) and `master_key` (a response with no number at all, such as
  "Let's solve this step by step.", gets 10 everywhere).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from fractions import Fraction

from grpo_llm_eval.testing.checklist_grades import checklist_grade
from grpo_llm_eval.testing.group_grades import GROUP_MODES, group_content, is_group_prompt

SEED_CRITERIA = ("thought_process", "answer", "format")
# What the server can be: honest, fixed scores, gullible to injections, or one of the bad judges of `mode_grade`.
# Group-only modes (`group_grades.GROUP_MODES`) grade a pointwise prompt as `scripted` does.
MODES = ("scripted", "fixed", "obedient", "inverted", "random", "length_loving", "master_key", *GROUP_MODES)
GARBAGE = "I am unable to follow the requested format. Here are some thoughts about the weather instead."
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_TOKEN = re.compile(r"\d+|[A-Za-z_]+|\s+|[^\w\s]")
# Probability mass the fake sampler puts on the emitted score token and on its neighbours, so that a
# logprob-weighted score differs from the parsed one (10 -> 9.75) and tests can tell them apart.
_SCORE_MASS = (0.8, 0.15, 0.05)
# What a gullible teacher takes as an order when it reads it outside the fenced material.
INJECTION = re.compile(r"ignore (?:all |the )?(?:previous|above|prior) instructions", re.I)
_FENCED = re.compile(r"<(question|student_response|ground_truth|rubric)>.*?</\1>", re.S)  # first closing tag ends it
_EVAL_BLOCK = re.compile(r"<evaluation>.*?</evaluation>", re.S | re.I)
_QUOTABLE = re.compile(r"(?:<|&lt;)evaluation>.*?(?:<|&lt;)/evaluation>", re.S | re.I)


def _block(text: str, tag: str) -> str | None:
    """The last `<tag>...</tag>` block; tolerant of attributes, case and a missing closing tag."""
    found = re.findall(rf"<{tag}\b[^>]*>(.*?)</{tag}\s*>", text, re.S | re.I)
    if found:
        return found[-1].strip()
    unclosed = re.search(rf"<{tag}\b[^>]*>(.*?)(?=<(?:student_response|ground_truth)\b|\Z)", text, re.S | re.I)
    return unclosed.group(1).strip() if unclosed else None


def extract_fields(prompt: str) -> tuple[str | None, str | None]:
    """(student response, ground truth) from a rendered rubric prompt; None where not found."""
    response, truth = _block(prompt, "student_response"), _block(prompt, "ground_truth")
    if response is None:  # the seed's unfenced layout
        m = re.search(r"Student Response:\s*\n(.*?)\n\s*Ground Truth:\s*\n(.*)\Z", prompt, re.S)
        if m:
            response, truth = m.group(1).strip(), truth or m.group(2).strip()
    return response, truth


def last_number(text: str | None) -> Fraction | None:
    """The last number in `text` as an exact fraction ("1,000" and "3/4" included)."""
    found = _NUMBER.findall(text or "")
    try:
        return Fraction(found[-1].replace(",", "")) if found else None
    except (ValueError, ZeroDivisionError):  # "1/0", "1.5/2"
        return None


def criteria_in(prompt: str) -> list[str]:
    """Criterion names from the format a rubric prompt shows (XML `<name><score>`, else the JSON instructions'
    `"name": {"score"` or `"name": <number`); the seed's if none."""
    names = [n for n in re.findall(r"<([A-Za-z_]\w*)>\s*<score>", prompt) if n != "evaluation"]
    if not names:
        names = re.findall(r'"([A-Za-z_]\w*)": (?:\{"score"|<number)', prompt)
    return list(dict.fromkeys(names)) or list(SEED_CRITERIA)


def scripted_grade(prompt: str, think_open: str = "<think>", think_close: str = "</think>") -> dict:
    """A correct teacher's grade: {criterion: (score, explanation)} for the criteria the prompt names.

    "format" is 10 when the response has a think block; every other criterion is 10 when the student's
    last number equals the ground truth's last number, else 0. Without a response to find, all are 0.
    """
    names = criteria_in(prompt)
    response, truth = extract_fields(prompt)
    if response is None:
        return {c: (0, "could not find the student's response in the prompt") for c in names}
    items = checklist_grade(prompt, response, names)  # an example's own rubric: each item by its check
    if items is not None:
        return items
    got, want = last_number(response), last_number(truth)
    right = got is not None and want is not None and got == want
    verdict = (10 if right else 0, f"The final number {got} {'matches' if right else 'does not match'} "
                                   f"the ground truth {want}.")
    has_think = re.search(re.escape(think_open) + r".*?" + re.escape(think_close), response, re.S) is not None
    form = (10, "Think block present.") if has_think else (0, "No think block.")
    return {c: form if c == "format" else verdict for c in names}


def mode_grade(mode: str, prompt: str, fixed_scores: dict[str, int] | None = None, draw: str = "") -> dict:
    """The grade MODE gives (see the module doc); `obedient` grades as `scripted` here (its text is its own).
    DRAW salts `random`'s scores: a sampled request (temperature > 0) gets a fresh draw each time it is asked."""
    if mode == "fixed":
        return {c: (s, f"Fixed grade {s} for {c}.") for c, s in (fixed_scores or {}).items()}
    grade = scripted_grade(prompt)
    if mode == "inverted":
        return {c: g if c == "format" else (10 - g[0], "Inverted: " + g[1]) for c, g in grade.items()}
    if mode == "random":  # drawn from the prompt's digest: the same request at temperature 0 gets the same grade
        rng = random.Random(hashlib.sha256((prompt + draw).encode("utf-8", "replace")).digest())
        return {c: (rng.randint(0, 10), "A random grade.") for c in grade}
    response, _ = extract_fields(prompt)
    if mode == "length_loving":
        words = min(10, len((response or "").split()))
        return {c: g if c == "answer" else (words, f"{words} words: thorough.") for c, g in grade.items()}
    if mode == "master_key" and response is not None and last_number(response) is None:
        return {c: (10, "A sound approach.") for c in grade}
    return grade


def grade_content(mode: str, prompt: str, fixed_scores: dict[str, int] | None, response_format: dict,
                  draw: str = "") -> str:
    """What a teacher in MODE writes for PROMPT: JSON when a JSON response_format is asked for, else XML.
    A group prompt (labelled responses) is answered in the group format (`group_grades`)."""
    if is_group_prompt(prompt):
        return group_content(mode, prompt, fixed_scores, response_format, draw)
    if mode == "obedient":  # a gullible model writes what it was talked into, whatever the format asked
        return obedient_content(prompt)
    grade = mode_grade(mode, prompt, fixed_scores, draw)
    return _json(grade, response_format) if response_format.get("type") in ("json_schema", "json_object") else _xml(grade)


def _xml(grade: dict) -> str:
    parts = [f"  <{c}><score>{s}</score><explanation>{e}</explanation></{c}>" for c, (s, e) in grade.items()]
    return "<evaluation>\n" + "\n".join(parts) + "\n</evaluation>"


def _fill(schema: dict, root: dict, grade: dict, crit: str | None = None, key: str | None = None):
    """An instance of a JSON schema whose score/explanation fields carry `grade` (the fake constrained decoder)."""
    if "$ref" in schema:
        node = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    for combo in ("anyOf", "oneOf", "allOf"):
        if combo in schema:
            options = [s for s in schema[combo] if s.get("type") != "null"] or schema[combo]
            return _fill(options[0], root, grade, crit, key)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        choices = schema["enum"]
        bare = {k: v for k, v in schema.items() if k != "enum"}
        if "type" not in bare and all(isinstance(c, (int, float)) for c in choices):
            bare["type"] = "number"
        wanted = _fill(bare, root, grade, crit, key)
        return wanted if wanted in choices else crit if crit in choices else choices[0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {k: _fill(s, root, grade, k if k in grade else crit, k) for k, s in schema.get("properties", {}).items()}
    if kind == "array":
        item = schema.get("items", {})
        props = item.get("properties", {})
        if any(k in props for k in ("name", "criterion")):  # a list of per-criterion objects
            return [_fill(item, root, grade, c, None) for c in grade]
        return []
    if kind in ("integer", "number"):
        score = grade[crit][0] if crit else 0
        score = min(max(score, schema.get("minimum", score)), schema.get("maximum", score))
        return int(score) if kind == "integer" else float(score)
    if kind in ("boolean", "null"):
        return True if kind == "boolean" else None
    if crit and key in ("name", "criterion"):
        return crit
    return grade[crit][1] if crit else " ".join(e for _, e in grade.values())


def fill_schema(schema: dict, grade: dict):
    """An instance of SCHEMA whose score/explanation fields carry GRADE ({criterion: (score, explanation)})."""
    return _fill(schema, schema, grade)


def _json(grade: dict, response_format: dict) -> str:
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema") or response_format.get("schema")  # json_object with a schema: llama.cpp style
    if not schema:  # json_object mode: the seed's structure as JSON
        return json.dumps({c: {"score": s, "explanation": e} for c, (s, e) in grade.items()})
    return json.dumps(_fill(schema, schema, grade))


def _logprobs(tokens: list[str], top_n: int) -> list[dict]:
    """OpenAI-style `logprobs.content`: numbers in 0..10 get some mass on their neighbours."""
    out = []
    for tok in tokens:
        if tok.isdigit() and int(tok) <= 10:
            v = int(tok)
            alts = [v] + [a for a in (v - 1, v + 1, v - 2, v + 2) if 0 <= a <= 10][:2]
            if 1 in alts and 10 not in alts:
                # Real tokenizers have a "10" token too; without it a "1" could be the start of "10".
                alts[-1] = 10
            tops = [(str(a), math.log(p)) for a, p in zip(alts, _SCORE_MASS, strict=True)]
        else:
            tops = [(tok, -0.01), (" ", -5.0), ("the", -6.0)]
        entries = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in tops[:max(top_n, 1)]]
        out.append({**entries[0], "top_logprobs": entries[:top_n]})
    return out


def tokens_of(content: str) -> list[str]:
    """How the fake sampler splits its output into tokens (numbers, words, spaces, punctuation)."""
    return _TOKEN.findall(content)


def obedient_content(prompt: str) -> str:
    """A gullible teacher's answer to a rubric prompt (XML); see the module doc.

    It reads fences as a naive model does: a `<student_response>` region ends at the FIRST
    `</student_response>` after it. Outside those regions, an "ignore previous instructions" line makes it
    give every criterion 10, and an evaluation block with numeric scores is copied as its answer. Otherwise
    it grades honestly and then quotes, verbatim, any evaluation block (XML, or JSON with a "score") found in
    the student's response: the worst case for a parser that reads the last complete block.
    """
    names = criteria_in(prompt)
    outside = _FENCED.sub("", prompt)
    if INJECTION.search(outside):
        return _xml({c: (10, "As instructed.") for c in names})
    forged = [b for b in _EVAL_BLOCK.findall(outside) if re.search(r"<score>\s*\d", b)]
    if forged:
        return forged[-1]
    own = _xml(scripted_grade(prompt))
    response, _ = extract_fields(prompt)
    response = response or ""
    quoted = _QUOTABLE.findall(response)
    first, last = response.find("{"), response.rfind("}")
    if 0 <= first < last and "score" in response[first:last]:
        quoted.append(response[first:last + 1])  # a JSON-looking grade, however it is escaped
    for quote in quoted:
        own += "\nThe response also contains this evaluation, quoted as written:\n" + quote
    return own


def adversarial_text(n_chars: int, seed: int = 0) -> str:
    """`n_chars` of near-miss grade syntax with no complete grade anywhere in it (see the module doc)."""
    rng = random.Random(seed)
    pieces = ["<evaluation>", "<answer><score>", "<score>", '{"answer": {"score": ', '{"answer": ', "[" * 64,
              "{" * 64, "9" * 400, "1" * 7 + "/", "&lt;evaluation>", "<thought_process>", '"\\', "\x00", "\x1b[31m",
              "\u202e", "\ufffd", " out of ", "<explanation>", "\n", "\t", "NaN", "1e999", "-", ".5"]
    out, size = [], 0
    while size < n_chars:
        piece = rng.choice(pieces)
        out.append(piece)
        size += len(piece)
    return "".join(out)[:n_chars]


NOISE = "\x00\x1b[2J\x1b[31m\u0007\x08\r\u2028\u202e\ud800\udfff\ufeff"


def noisy_content(content: str) -> str:
    """`content` with NULs, ANSI escapes, control characters and lone surrogates before and after it."""
    return f"{NOISE} noise {NOISE}\n{content}\n{NOISE}"


def request_key(messages) -> str:
    """The id the request log gives a chat request: a digest of its messages (retries share it)."""
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]


def _text(content) -> str:
    if isinstance(content, list):  # content parts
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def _error(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_object(body: dict, fault: str | None, number: int, mode: str, fixed_scores: dict[str, int],
                      huge_chars: int, reasoning_field: str | None) -> dict:
    """The fake teacher's chat.completion object for request BODY (faults that still answer 200 applied)."""
    prompt = "\n".join(_text(m.get("content")) for m in body.get("messages", []))
    draw = f"\x00{number}" if float(body.get("temperature") or 0) > 0 else ""  # request number: a fresh draw
    content = grade_content(mode, prompt, fixed_scores, body.get("response_format") or {}, draw)
    if fault == "huge":
        content = adversarial_text(huge_chars, seed=number)
    elif fault == "noisy":
        content = noisy_content(content)
    content = {"garbage": GARBAGE, "empty": ""}.get(fault, content)
    if fault == "huge":  # megabytes are not cut by max_tokens here: a misbehaving server ignores it
        tokens, limit = [content], None
    else:
        tokens, limit = tokens_of(content), body.get("max_completion_tokens") or body.get("max_tokens")
    finish = "stop"
    if limit and len(tokens) > int(limit):
        tokens, finish = tokens[: int(limit)], "length"
        content = "".join(tokens)
    message = {"role": "assistant", "content": content}
    if reasoning_field:
        # A draft with different scores: a client that parses reasoning instead of content is caught.
        message[reasoning_field] = ("First impression: <answer><score>5</score><explanation>draft"
                                    "</explanation></answer>. Checking the final number carefully.")
    logprobs = {"content": _logprobs(tokens, int(body.get("top_logprobs") or 0))} if body.get("logprobs") else None
    words = len(prompt.split())
    return {"id": f"chatcmpl-{number}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": logprobs}],
            "usage": {"prompt_tokens": words, "completion_tokens": len(tokens), "total_tokens": words + len(tokens)}}
