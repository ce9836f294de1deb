"""Measure how many tokens llama.cpp's grammar-constrained grades take against their explanations' characters.

Run: python bench/grade_size.py  (bundled SmolLM2-135M, CPU, about a minute). Prints, per grade, the whole grade's
tokens, the explanations' characters and the markup tokens per criterion left after the explanations
(explanation tokens counted by tokenizing each explanation alone). Numbers quoted in bench/RESULTS.md.
"""
import json
import sys

from grpo_llm_eval.models import bundled_gguf_path
from grpo_llm_eval.teacher.backends.llamacpp import load_llama
from grpo_llm_eval.teacher.grading.rubric import Rubric, seed_criteria

PROMPTS = [("What is 2+2?", "4", "4"), ("Name a prime above 10.", "12", "11"),
           ("Capital of France?", "Paris is the capital.", "Paris"), ("Solve x+3=5.", "x=2", "2")]


def main(max_chars: int = 40, max_tokens: int = 256) -> None:
    rubric = Rubric(seed_criteria(), json_output=True)
    llm = load_llama(str(bundled_gguf_path("smollm2-135m-instruct")), n_ctx=2048, verbose=False, seed=0)
    fmt = {"type": "json_object", "schema": rubric.json_schema(max_explanation_chars=max_chars)}
    n = len(rubric.criteria)
    for q, r, t in PROMPTS:
        out = llm.create_chat_completion(rubric.messages(q, r, t, json_mode=True), response_format=fmt,
                                         max_tokens=max_tokens, temperature=0.8)
        text = out["choices"][0]["message"]["content"]
        total = out["usage"]["completion_tokens"]
        try:
            grade = json.loads(text)
        except ValueError:
            print(f"cut grade ({total} tokens): {text!r}")
            continue
        expl = [str(v.get("explanation", "")) for v in grade.values()]
        expl_tok = sum(len(llm.tokenize(e.encode(), add_bos=False)) for e in expl)
        print(f"tokens {total}  explanation chars {sum(map(len, expl))}  explanation tokens {expl_tok}  "
              f"markup tokens/criterion {(total - expl_tok) / n:.1f}  bare-grade chars {len(rubric.bare_grade(True))}"
              f"  text {text!r}")
    sys.stdout.flush()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
