"""How many concurrent requests llama.cpp's server on the bundled model sustains before its latency grows (issue 28).

Starts `python -m llama_cpp.server` on the bundled SmolLM2-135M GGUF (all cores), then grades the same batch of
distinct responses through the real `OpenAITeacher` (structured output, learned by the health check's probe) at
each `teacher_max_concurrency` in turn, with adaptive concurrency off and a timeout no call reaches. Per level:
the batch's wall time, grades per second, and a call's time in the server (calls in flight over throughput),
with the ratios to one call in flight. A server that computes requests side by side keeps its latency and gains throughput as
concurrency grows; one that queues them keeps its throughput and its latency grows with the queue.

    python bench/llamacpp_concurrency.py                          # 16 grades at 1, 2, 4, 8, 16 in flight
    python bench/llamacpp_concurrency.py --levels 1,4 --batch 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from teacher_queue import requests, start_server, stop_server, teacher


def level(url: str, concurrency: int, batch, feedback_tokens: int) -> dict:
    t = teacher(url, concurrency, feedback_tokens, 600, adaptive=False)

    async def go():
        try:
            await t.health_check()
            start = time.perf_counter()
            judged = await t.judge(batch)
            return judged, time.perf_counter() - start
        finally:
            await t.aclose()

    judged, seconds = asyncio.run(go())
    # A call's time in the server (Little's law: calls in flight = throughput x latency); each Judgement's own
    # latency counts from when the batch was handed over, including the wait for a free slot in our client.
    rate = len(judged) / seconds
    return {"concurrency": concurrency, "seconds": round(seconds, 2), "grades_per_s": round(rate, 3),
            "latency_s": round(min(concurrency, len(judged)) / rate, 2), "ok": sum(j.ok for j in judged),
            "grades": len(judged)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="distinct grades per level")
    p.add_argument("--levels", default="1,2,4,8,16", help="teacher_max_concurrency values, in order")
    p.add_argument("--feedback-tokens", type=int, default=128, help="each grade's cap")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    a = p.parse_args()
    log = Path(tempfile.mkdtemp()) / "llama-server.log"
    proc, url = start_server(log, a.threads)
    try:
        level(url, 1, requests(2), a.feedback_tokens)  # loads and warms the model
        batch = requests(a.batch)
        rows = []
        for c in (int(x) for x in a.levels.split(",")):
            rows.append(level(url, c, batch, a.feedback_tokens))
            print(json.dumps(rows[-1]), flush=True)
        base = rows[0]
        print("| in flight | wall s | grades/s | x throughput | s a call | x latency | ok |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['concurrency']} | {r['seconds']} | {r['grades_per_s']} | "
                  f"{r['grades_per_s'] / base['grades_per_s']:.2f} | {r['latency_s']} | "
                  f"{r['latency_s'] / base['latency_s']:.2f} | {r['ok']}/{r['grades']} |")
    finally:
        stop_server(proc)


if __name__ == "__main__":
    main()
