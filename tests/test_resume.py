"""Crash, signal and resume: records stay exact, checkpoints are atomic, replayed steps hit the cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from grpo_llm_eval.testing.teacher_server import TeacherServer
from grpo_llm_eval.training import checkpoints
from grpo_llm_eval.training.records import read_jsonl
from tests.conftest import tiny_overrides


def cli(tiny_model, out: Path, server, run_name: str, *extra: str) -> list[str]:
    sets = tiny_overrides(tiny_model, out, openai_base_url=server.base_url, run_name=run_name, total_steps=4,
                          save_steps=2, save_total_limit=0)
    args = [sys.executable, "-m", "grpo_llm_eval.cli", "train"]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


def start(args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out waiting")


def steps_in(run: Path) -> set[int]:
    return {r["step"] for r in read_jsonl(run / "rollouts.jsonl")}


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


class TestKillAndResume:
    def test_resumed_run_equals_an_uninterrupted_one_and_replays_from_the_cache(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted", latency_s=0.3) as server:
            code, log = finish(start(cli(tiny_model, tmp_path, server, "straight")))
            assert code == 0, log

            run = tmp_path / "broken"
            proc = start(cli(tiny_model, tmp_path, server, "broken"))
            # after the first checkpoint, once step 3 is graded and recorded (so that it will be replayed)
            wait_for(lambda: (run / "checkpoint-2").is_dir() and 3 in steps_in(run), proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert not (run / "final").exists() and not (run / "checkpoint-4").exists()
            before_resume = server.stats()["chat_requests"]
            code, log = finish(start([sys.executable, "-m", "grpo_llm_eval.cli", "train", "--resume", str(run)]))
            assert code == 0, log
            resumed_requests = server.stats()["chat_requests"] - before_resume

        a = read_jsonl(tmp_path / "straight" / "rollouts.jsonl")
        b = read_jsonl(run / "rollouts.jsonl")
        key = lambda r: (r["step"], r["index"])  # noqa: E731
        assert [key(r) for r in b] == [key(r) for r in a], "no duplicated and no missing steps"
        assert [json.dumps(r["prompt"]) for r in b] == [json.dumps(r["prompt"]) for r in a]
        assert [r["completion"] for r in b] == [r["completion"] for r in a], "CPU sampling is deterministic"
        assert [checkpoints.step_of(p) for p in checkpoints.checkpoints(run)] == [2, 4]
        assert (run / "final" / "config.json").is_file()
        # step 3 was graded before the kill: its replay is answered by the judgement cache
        assert all(r["cached"] for r in b if r["step"] == 3)
        # the server only saw the grades the cache did not hold
        assert resumed_requests == sum(1 for r in b if r["step"] > 2 and not r["cached"]) < 16


class TestSignals:
    def test_sigint_saves_a_checkpoint_says_how_to_resume_and_exits_130(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted", latency_s=0.5) as server:
            run = tmp_path / "sig"
            proc = start(cli(tiny_model, tmp_path, server, "sig"))
            wait_for(lambda: 1 in steps_in(run), proc)
            proc.send_signal(signal.SIGINT)
            code, log = finish(proc)
            assert code == 130, log
            assert "resume with: grpo_llm_eval --resume" in log
            saved = checkpoints.checkpoints(run)
            assert saved and max(steps_in(run)) == checkpoints.step_of(saved[-1])
            code, log = finish(start([sys.executable, "-m", "grpo_llm_eval.cli", "--resume", str(saved[-1])]))
            assert code == 0, log
        rows = read_jsonl(run / "rollouts.jsonl")
        assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4]
        assert len(rows) == len({(r["step"], r["index"]) for r in rows}) == 4 * 8

    def test_sigterm_exits_143(self, tiny_model, tmp_path):
        with TeacherServer(mode="scripted", latency_s=0.5) as server:
            run = tmp_path / "term"
            proc = start(cli(tiny_model, tmp_path, server, "term"))
            wait_for(lambda: 1 in steps_in(run), proc)
            proc.send_signal(signal.SIGTERM)
            code, log = finish(proc)
        assert code == 143, log
        assert checkpoints.checkpoints(run)


class TestRecordRepair:
    def test_a_torn_last_line_is_skipped_by_readers_and_repaired_by_resume(self, tmp_path):
        rows = [{"step": s, "index": i} for s in (1, 2, 3) for i in range(2)]
        path = tmp_path / "rollouts.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "ind')
        assert len(read_jsonl(path)) == 6
        dropped = checkpoints.truncate_records(tmp_path, after_step=2)
        assert dropped["rollouts.jsonl"] == 3  # two rows of step 3, one torn line
        lines = path.read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 1, 2, 2]

    def test_resume_without_checkpoint_is_a_clear_error(self, tmp_path):
        (tmp_path / "run").mkdir()
        with pytest.raises(checkpoints.ResumeError, match="no checkpoint"):
            checkpoints.find_resume(str(tmp_path), "run", True)


class TestAtomicCheckpoints:
    def test_checkpoints_are_published_by_rename_and_rotated_in_python(self, tmp_path):
        for step in (1, 2, 3):
            staged = tmp_path / checkpoints.STAGING / f"checkpoint-{step}"
            staged.mkdir(parents=True)
            (staged / "model.safetensors").write_text("w")
            checkpoints.publish(staged, tmp_path / f"checkpoint-{step}")
        deleted = checkpoints.rotate(tmp_path, keep=2)
        assert [p.name for p in deleted] == ["checkpoint-1"]
        assert [p.name for p in checkpoints.checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
        assert not any((tmp_path / checkpoints.STAGING).iterdir())

    def test_a_half_written_staging_folder_is_never_a_resume_target(self, tmp_path):
        run = tmp_path / "run"
        (run / "checkpoint-2").mkdir(parents=True)
        (run / checkpoints.STAGING / "checkpoint-4").mkdir(parents=True)
        assert checkpoints.find_resume(str(tmp_path), "run", True)[1].name == "checkpoint-2"


class TestResumeCredentials:
    def test_a_resumed_run_takes_the_teacher_credentials_from_the_environment(self, tiny_model, tmp_path):
        """Would have caught: --resume reloaded config.yaml, where openai_base_url's user:password is redacted to
        ***, so the resumed client sent the placeholder and a server requiring the credential refused it (the
        health check failed). Now the placeholder is refused with a config error saying how to supply the URL,
        and OPENAI_BASE_URL supplies it."""
        import base64

        auth = "Basic " + base64.b64encode(b"grader:s3cret").decode()
        with TeacherServer(mode="scripted", require_auth=auth) as server:
            url = server.base_url.replace("http://", "http://grader:s3cret@")
            sets = tiny_overrides(tiny_model, tmp_path, openai_base_url=url, run_name="cred", total_steps=1,
                                  save_steps=1)
            first = subprocess.run([sys.executable, "-m", "grpo_llm_eval.cli", "train",
                                    *[a for s in sets for a in ("--set", s)]],
                                   capture_output=True, text=True, timeout=300)
            assert first.returncode == 0, first.stderr[-3000:]
            run = tmp_path / "cred"
            assert "s3cret" not in (run / "config.yaml").read_text()
            resume = [sys.executable, "-m", "grpo_llm_eval.cli", "train", "--resume", str(run),
                      "--set", "total_steps=2"]
            env = {k: v for k, v in os.environ.items() if k != "OPENAI_BASE_URL"}
            refused = subprocess.run(resume, capture_output=True, text=True, timeout=300, env=env)
            assert refused.returncode == 2, refused.stderr[-3000:]
            assert "redacted" in refused.stderr and "OPENAI_BASE_URL" in refused.stderr
            assert "--config" in refused.stderr and "s3cret" not in refused.stderr
            before = server.stats()["chat_requests"]
            resumed = subprocess.run(resume, capture_output=True, text=True, timeout=300,
                                     env=dict(env, OPENAI_BASE_URL=url))
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            stats = server.stats()
        assert stats["responses"].get("401", 0) == 0, "a request reached the server without the credential"
        assert stats["chat_requests"] > before, "the resumed step graded nothing"
        assert 2 in steps_in(run)
