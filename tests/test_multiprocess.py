"""Several processes: the shipped accelerate configs, the teacher's global concurrency cap, and a real
`accelerate launch` of two data-parallel CPU processes (gloo) against a teacher server on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from grpo_llm_eval.config.load import load_config
from grpo_llm_eval.teacher.backends.openai_backend import OpenAITeacher
from grpo_llm_eval.teacher.grading.rubric import Rubric
from grpo_llm_eval.teacher.types import JudgeRequest
from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
SHIPPED = ("single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp2", "cpu_2proc")
# Launch arguments that a section's keys become (accelerate prefixes fsdp_config keys with fsdp_, ...).
SECTION_PREFIX = {"fsdp_config": "fsdp_", "deepspeed_config": "", "dynamo_config": "dynamo_", "fp8_config": "fp8_"}


def _launch_args(name: str):
    """`accelerate launch --config_file NAME.yaml x.py` parsed and validated by accelerate itself."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE_CONFIGS / f"{name}.yaml"), "x.py"])
    return _validate_launch_command(args)[:2]


class TestAccelerateConfigs:
    def test_every_shipped_config_is_checked_here(self):
        assert {p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")} == set(SHIPPED)

    @pytest.mark.parametrize("name", SHIPPED)
    def test_config_loads_with_accelerates_loader_and_every_key_is_a_launch_argument(self, name):
        from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
        from accelerate.commands.launch import launch_command_parser

        cfg = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))  # rejects unknown top-level keys
        assert isinstance(cfg, ClusterConfig)
        # Keys inside a section are copied onto launch arguments; a misspelt one would be ignored silently.
        dests = {action.dest for action in launch_command_parser()._actions}
        for section, prefix in SECTION_PREFIX.items():
            for key in getattr(cfg, section) or {}:
                assert (key if key.startswith(prefix) else prefix + key) in dests, f"{name}: {section}.{key}"

    @pytest.mark.parametrize(("name", "processes", "launcher"), [
        ("single_gpu", 1, None), ("multi_gpu", 8, "multi_gpu"), ("deepspeed_zero2", 8, "use_deepspeed"),
        ("deepspeed_zero3", 8, "use_deepspeed"), ("fsdp2", 8, "use_fsdp"), ("cpu_2proc", 2, "multi_gpu")])
    def test_accelerate_launch_accepts_the_config_and_picks_its_launcher(self, name, processes, launcher):
        args, _ = _launch_args(name)
        assert args.num_processes == processes
        for flag in ("multi_gpu", "use_deepspeed", "use_fsdp"):
            assert bool(getattr(args, flag)) == (flag == launcher), flag

    @pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
    def test_deepspeed_configs_set_their_zero_stage(self, name, stage):
        _, cfg = _launch_args(name)
        assert cfg.deepspeed_config["zero_stage"] == stage

    def test_fsdp2_config_builds_accelerates_fsdp2_plugin(self, monkeypatch):
        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        args, _ = _launch_args("fsdp2")
        for key, value in prepare_multi_gpu_env(args).items():  # what the launched processes would see
            if key.startswith(("FSDP_", "ACCELERATE_")):
                monkeypatch.setenv(key, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
        assert plugin.reshard_after_forward is True
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"


class TestReadmeSection:
    def _section(self) -> str:
        text = (ROOT / "README.md").read_text(encoding="utf-8")
        start = text.index("## Several GPUs or machines")
        return text[start: text.index("\n## ", start + 1)]

    def test_every_accelerate_config_named_in_the_docs_is_shipped(self):
        import re

        docs = self._section() + (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
        named = set(re.findall(r"configs/accelerate/([\w-]+)\.yaml", docs))
        tabled = set(re.findall(r"^\| `([\w-]+)\.yaml` \|", self._section(), re.M))  # the README's table
        assert tabled == set(SHIPPED)
        assert named and named <= set(SHIPPED)

    def test_module_entry_point_is_the_console_script(self):
        pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
        assert 'grpo_llm_eval = "grpo_llm_eval.cli:main"' in pyproject
        assert "-m grpo_llm_eval.cli train" in self._section()

    def test_vllm_keys_shown_are_grpo_config_fields(self):
        from trl import GRPOConfig

        section = self._section()
        for key in ("use_vllm", "vllm_mode", "vllm_server_base_url", "vllm_gpu_memory_utilization"):
            assert key in section and key in GRPOConfig.__dataclass_fields__, key


def _teacher(server: TeacherServer, cap: int, processes: int | None) -> OpenAITeacher:
    cfg = load_config(None, ["teacher_backend=openai", "teacher_model_name=teacher", f"openai_base_url={server.base_url}",
                             f"teacher_max_concurrency={cap}", "teacher_max_retries=0", "max_feedback_new_tokens=512"])
    return OpenAITeacher(cfg, Rubric.from_config(cfg), num_processes=processes)


class TestTeacherConcurrencyShare:
    @pytest.mark.parametrize(("cap", "processes", "share"), [(32, 1, 32), (32, 2, 16), (5, 2, 3), (2, 8, 1), (64, 8, 8)])
    def test_each_process_gets_ceil_of_cap_over_processes(self, cap, processes, share):
        with TeacherServer() as server:
            assert _teacher(server, cap, processes).concurrency_per_process == share

    def test_a_process_keeps_its_share_in_flight_on_a_real_server(self):
        with TeacherServer(mode="scripted", latency_s=0.2) as server:
            teacher = _teacher(server, cap=8, processes=4)

            async def grade():
                try:
                    return await teacher.judge([JudgeRequest(f"What is {i} + 1?", f"{i + 1}", f"{i + 1}")
                                                for i in range(8)])
                finally:
                    await teacher.aclose()

            start = time.perf_counter()
            judgements = asyncio.run(grade())
            elapsed = time.perf_counter() - start
            stats = server.stats()
        assert all(j.ok for j in judgements)
        assert stats["max_in_flight"] == 2  # 8 / 4 processes
        assert elapsed >= 4 * 0.2  # 8 calls, 2 at a time

    def test_without_accelerate_state_the_launchers_world_size_counts(self):
        # A fresh interpreter, where nothing has set accelerate's state up (this test process may have).
        code = "from grpo_llm_eval.teacher.limits import process_count; print(process_count())"
        env = {**os.environ, "WORLD_SIZE": "4"}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "4"


# ---- two processes, end to end ------------------------------------------------------------------------

PROCESSES, STEPS, GROUP, CAP = 2, 2, 4, 2


def cpu_launch(overrides: list[str], digests: Path, processes: int) -> tuple[list[str], dict]:
    """The command and environment of a `train` run in PROCESSES CPU processes (gloo), each process writing its
    weights' digest into DIGESTS after training."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ACCELERATE_CONFIGS / "cpu_2proc.yaml"), "--num_processes", str(processes),
           "--main_process_port", str(_free_port()), "-m", "grpo_llm_eval.cli", "train"]
    for item in overrides:
        cmd += ["--set", item]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "GRPO_LLM_EVAL_DUMP_WEIGHTS_DIR": str(digests)}
    return cmd, env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory):
    """One `accelerate launch` of two CPU processes, 2 steps x 1 prompt x 4 completions each; its outputs."""
    base = tmp_path_factory.mktemp("multiprocess")
    out, digests = base / "runs", base / "digests"
    # Latency makes calls overlap, so that a cap kept per process rather than globally would show.
    with TeacherServer(mode="scripted", latency_s=0.3) as server:
        overrides = tiny_overrides(tiny_model, out, openai_base_url=server.base_url, total_steps=STEPS,
                                   prompts_per_step=1, num_return_sequences=GROUP, save_steps=STEPS,
                                   teacher_max_concurrency=CAP, teacher_max_retries=0, teacher_timeout_s=30,
                                   # Scripted grades of a random model's text are all 0, so GRPO's advantages
                                   # are 0; the SFT term on the feedback makes the update move the weights.
                                   sft_beta=1.0)
        cmd, env = cpu_launch(overrides, digests, PROCESSES)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        stats = server.stats()
    return {"proc": proc, "out": out, "digests": digests, "stats": stats}


def _ok(launched) -> Path:
    proc = launched["proc"]
    # The processes' own error lines come first; torchrun's summary of who failed ends the output.
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error", "[rank"))][:40]
    assert proc.returncode == 0, (f"accelerate launch exited {proc.returncode}:\n" + "\n".join(errors)
                                  + "\n...\n" + proc.stderr[-3000:])
    return launched["out"] / "run"


class TestTwoProcesses:
    def test_launch_succeeds_with_one_run_folder(self, launched):
        _ok(launched)
        assert [p.name for p in launched["out"].iterdir()] == ["run"]

    def test_records_hold_every_processes_completions_exactly_once(self, launched):
        rows = read_jsonl(_ok(launched) / "rollouts.jsonl")
        per_step = PROCESSES * 1 * GROUP
        assert len(rows) == STEPS * per_step
        assert Counter((r["step"], r["index"]) for r in rows) == Counter(
            {(s, i): 1 for s in range(1, STEPS + 1) for i in range(per_step)})
        for step in range(1, STEPS + 1):
            groups = {}
            for r in (r for r in rows if r["step"] == step):
                groups.setdefault(r["group"], []).append(r)
            assert sorted(groups) == list(range(PROCESSES))
            for members in groups.values():  # one group: one prompt, its four completions
                assert len(members) == GROUP
                assert len({(json.dumps(m["prompt"]), m["ground_truth"]) for m in members}) == 1
            # each process sampled its own prompt
            assert len({json.dumps(g[0]["prompt"]) for g in groups.values()}) == PROCESSES
        assert all(r["judge_status"] == "ok" for r in rows)

    def test_only_the_main_process_writes_metrics_and_checkpoints(self, launched):
        run = _ok(launched)
        logged = [m["step"] for m in read_jsonl(run / "metrics.jsonl") if "loss" in m]
        assert logged == list(range(1, STEPS + 1))  # one line per step, not one per process
        assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]
        assert (run / "final" / "config.json").is_file()

    def test_both_processes_write_the_shared_judgement_cache(self, launched):
        run = _ok(launched)
        rows = read_jsonl(run / "rollouts.jsonl")
        distinct = {(r["question"], r["completion"], r["ground_truth"]) for r in rows}
        with sqlite3.connect(run / "judgements.sqlite") as conn:
            stored = conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
        assert stored == len(distinct) > GROUP * STEPS  # more than one process's grades

    def test_teacher_concurrency_cap_is_global_across_processes(self, launched):
        _ok(launched)
        stats = launched["stats"]
        assert stats["chat_requests"] >= PROCESSES * STEPS  # every process graded
        assert 1 <= stats["max_in_flight"] <= CAP

    def test_the_teacher_totals_sum_every_processes_calls(self, launched):
        run = _ok(launched)
        rows = [m for m in read_jsonl(run / "metrics.jsonl") if "judge/total_calls" in m]
        assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
        assert rows[-1]["judge/total_calls"] == sum(m["judge/calls"] for m in rows) == launched["stats"]["chat_requests"]

    def test_every_process_ends_with_the_same_updated_weights(self, launched, tiny_model):
        from transformers import AutoModelForCausalLM

        from grpo_llm_eval.training.callbacks import weights_digest

        _ok(launched)
        digests = [json.loads((launched["digests"] / f"rank-{i}.json").read_text()) for i in range(PROCESSES)]
        assert all(d["global_step"] == STEPS for d in digests)
        initial = weights_digest(AutoModelForCausalLM.from_pretrained(tiny_model))
        assert {d["begin"] for d in digests} == {initial}
        ends = {d["end"] for d in digests}
        assert len(ends) == 1, "the processes' weights diverged"
        assert ends != {initial}, "the update did not change the weights"

    def test_each_process_writes_its_spend_to_the_shared_ledger_and_checks_the_runs_total(self, launched):
        run = _ok(launched)
        with sqlite3.connect(run / "judgements.sqlite") as conn:
            rows = conn.execute("SELECT calls, prompt_tokens FROM spend").fetchall()
        last = [m for m in read_jsonl(run / "metrics.jsonl") if "judge/total_calls" in m][-1]
        assert len(rows) == PROCESSES and all(calls > 0 for calls, _ in rows)
        assert sum(calls for calls, _ in rows) == last["judge/total_calls"] == launched["stats"]["chat_requests"]
        assert sum(tokens for _, tokens in rows) == last["judge/total_prompt_tokens"]
        assert "do not share" not in launched["proc"].stderr  # so the budgets are checked against the run's total
