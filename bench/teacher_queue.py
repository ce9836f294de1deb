"""Calls and time to grade one step's batch against llama.cpp's server, which grades one request at a time.

Starts `python -m llama_cpp.server` on the bundled SmolLM2-135M GGUF (one thread, as the tests do), times one
grade to learn the server's pace, then grades the same batch of distinct responses, with every call in
flight at once (concurrency = batch size) and structured output on, in two arms through the real
`OpenAITeacher`:

- before: the first batch goes out with `response_format: json_schema` (the server refuses it), and a
  fixed concurrency cap, so calls that time out in the server's queue are sent again at the same width;
- after: the health check learns what the server accepts (one probe), and adaptive concurrency lowers the
  calls in flight when they time out (`teacher_adaptive_concurrency`).

The timeout is set to a fraction of the time the server needs for the whole batch (`--timeout-share`), as
the issue's run had it (120 s of timeout for 32 grades of 256 tokens at about 9 s each: 0.42).

    python bench/teacher_queue.py                       # 12 grades of up to 192 tokens, timeout 0.4 x the batch
    python bench/teacher_queue.py --batch 32 --feedback-tokens 256 --timeout-share 0.42
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ALIAS = "teacher"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path, threads: int) -> tuple[subprocess.Popen, str]:
    from grpo_llm_eval.models import bundled_gguf_path

    port = free_port()
    # The server with the project's portable model defaults (teacher/backends/llamacpp.py): the bare
    # `python -m llama_cpp.server` dies of SIGSEGV on a VM whose CPU reports AMX, at the first grade.
    command = [sys.executable, "-m", "grpo_llm_eval.teacher.backends.llamacpp", "--model", str(bundled_gguf_path("smollm2-135m-instruct")),
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--model_alias", ALIAS,
               "--n_threads", str(threads), "--n_threads_batch", str(threads)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"llama_cpp.server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("llama_cpp.server did not answer /v1/models in 180 s") from None
            time.sleep(0.5)


def stop_server(proc: subprocess.Popen) -> None:
    """Terminate the server, and kill it if it has not gone in 20 s."""
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def requests(n: int):
    from grpo_llm_eval.teacher.types import JudgeRequest

    return [JudgeRequest(f"What is {i} + {i + 7}?", f"<think>{i} + {i + 7} = {2 * i + 7 + i % 2}</think> "
                         f"{2 * i + 7 + i % 2}", str(2 * i + 7)) for i in range(n)]


def teacher(url: str, concurrency: int, feedback_tokens: int, timeout_s: float, adaptive: bool):
    from grpo_llm_eval.config.load import load_config
    from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher
    from grpo_llm_eval.teacher.grading.rubric import Rubric

    cfg = load_config(None, ["teacher_backend=openai", f"teacher_model_name={ALIAS}", f"openai_base_url={url}",
                             f"teacher_max_concurrency={concurrency}", "teacher_max_retries=3",
                             f"teacher_timeout_s={timeout_s}", "teacher_structured_output=true",
                             "teacher_logprob_scores=false", f"max_feedback_new_tokens={feedback_tokens}",
                             f"teacher_adaptive_concurrency={str(adaptive).lower()}"])
    return OpenAITeacher(cfg, Rubric.from_config(cfg), num_processes=1)


def run_arm(t, batch, health_check: bool) -> dict:
    async def go():
        try:
            if health_check:
                await t.health_check()
            probe = t.usage.usage.calls
            start = time.perf_counter()
            judged = await t.judge(batch)
            return judged, time.perf_counter() - start, probe
        finally:
            await t.aclose()

    judged, seconds, probe = asyncio.run(go())
    return {"calls": t.usage.usage.calls - probe, "probe_calls": probe, "seconds": round(seconds, 1),
            "ok": sum(j.ok for j in judged), "failed": sum(not j.ok for j in judged),
            "retries": sum(max(0, j.attempts - 1) for j in judged), "grades": len(judged)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=12, help="completions graded in the step (all in flight at once)")
    p.add_argument("--feedback-tokens", type=int, default=192, help="the grade's cap (the 135M model's JSON "
                   "grades need about 100 to 150)")
    p.add_argument("--timeout-share", type=float, default=0.4, help="timeout as a share of the serial batch time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--order", default="before,after", help="the arms' order (after,before checks order effects)")
    a = p.parse_args()
    log = Path(tempfile.mkdtemp()) / "llama-server.log"
    proc, url = start_server(log, a.threads)
    try:
        warm = teacher(url, 1, a.feedback_tokens, 600, False)
        run_arm(warm, requests(1), health_check=True)  # loads and warms the model
        paced = teacher(url, 1, a.feedback_tokens, 600, False)
        pace = run_arm(paced, requests(3), health_check=True)["seconds"] / 3
        timeout = round(max(2.0, a.timeout_share * pace * a.batch), 1)
        print(f"server pace {pace:.2f} s per grade; timeout {timeout} s for {a.batch} grades in flight", flush=True)
        rows = {}
        for arm in a.order.split(","):
            after = arm == "after"
            rows[arm] = run_arm(teacher(url, a.batch, a.feedback_tokens, timeout, adaptive=after), requests(a.batch),
                                health_check=after)
            print(arm, json.dumps(rows[arm]), flush=True)
        b, f = rows["before"], rows["after"]
        print(json.dumps({"pace_s": round(pace, 2), "timeout_s": timeout, **{k: v for k, v in rows.items()},
                          "calls_ratio_after_vs_before": round(f["calls"] / b["calls"], 3),
                          "time_ratio_after_vs_before": round(f["seconds"] / b["seconds"], 3)}))
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
