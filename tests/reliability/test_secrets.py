"""Secrets: the API key (and a password in the teacher URL) appear in no file of the run folder and in no
log line, even with --debug and with failing teacher calls that log their errors."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from grpo_llm_eval.testing import TeacherServer
from tests.conftest import tiny_overrides
from tests.reliability.helpers import cli_env, closed_port, run_cli, sets


def files_containing(root: Path, needle: bytes) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes())


def tiny_run_args(tiny_model: str, tmp_path: Path, url: str) -> list[str]:
    return sets(tiny_overrides(tiny_model, tmp_path / "runs", openai_base_url=url, cache_dir=str(tmp_path / "cache"),
                               total_steps=2, save_steps=1, prompts_per_step=1, num_return_sequences=2,
                               max_new_tokens=4, teacher_max_retries=1, teacher_timeout_s=2))


class TestSecrets:
    def test_the_api_key_is_in_no_file_and_no_output_of_a_debug_run_with_failing_calls(self, tiny_model, tmp_path):
        key = "sk-test-" + secrets.token_hex(20)
        with TeacherServer(fault_rate=0.5, seed=4, faults=("500", "429", "garbage", "drop"), retry_after_s=0) as srv:
            result = run_cli(["--debug", *tiny_run_args(tiny_model, tmp_path, srv.base_url)],
                             env=cli_env(OPENAI_API_KEY=key))
            log = srv.stats()["log"]
        assert result.rc == 0, result.text[-3000:]
        # The key was really used, and calls really failed (so error paths logged).
        assert {e["auth"] for e in log} == {hashlib.sha256(key.encode()).hexdigest()[:16]}
        assert any(e["fault"] for e in log) and "DEBUG" in result.err
        assert key not in result.text and key[8:] not in result.text
        assert files_containing(tmp_path, key.encode()) == []
        assert files_containing(tmp_path, key[8:].encode()) == []

    def test_a_password_in_the_teacher_url_is_in_no_file_and_no_output(self, tiny_model, tmp_path):
        password = "pw" + secrets.token_hex(12)
        with TeacherServer() as srv:
            url = srv.base_url.replace("http://", f"http://user:{password}@")
            result = run_cli(["--debug", *tiny_run_args(tiny_model, tmp_path, url)],
                             env=cli_env(OPENAI_API_KEY="sk-unused-" + secrets.token_hex(4)))
        assert result.rc == 0, result.text[-3000:]
        assert password not in result.text
        assert files_containing(tmp_path, password.encode()) == []

    def test_the_fail_fast_message_of_an_unreachable_teacher_carries_no_password(self, tmp_path):
        password = "pw" + secrets.token_hex(12)
        url = f"http://user:{password}@127.0.0.1:{closed_port()}/v1"
        result = run_cli(sets(tiny_overrides(str(tmp_path / "none"), tmp_path / "runs", openai_base_url=url)))
        assert result.rc == 1 and "cannot reach the teacher at http://127.0.0.1:" in result.err
        assert password not in result.text and files_containing(tmp_path, password.encode()) == []
