"""Bad text in the data and in the teacher's answers, and bad dataset rows: the run goes on, the records
stay valid JSON Lines that any reader can split and decode."""

from __future__ import annotations

import json
import logging

import pytest

from grpo_llm_eval.config import Config
from grpo_llm_eval.evaluation.judge_file import judge_file
from grpo_llm_eval.testing import TeacherServer
from grpo_llm_eval.training.records import read_jsonl
from grpo_llm_eval.training.train import train
from tests.reliability.helpers import tiny_cfg

GOOD_QUESTIONS = ["What is 2 + 3?", "What is 4 + 4?", "What is 1 + 1?", "What is 3 + 3?", "What is 5 + 5?",
                  "What is 6 + 1?"]
# Lines of a JSONL file, as bytes: six usable rows full of hostile text, four rows that must be skipped.
MESSY_LINES = [
    b'{"question": "What is 2 + 3? \\u001b[31mred\\u001b[0m \x1b[2J", "answer": "5"}',
    b'{"question": "What is 4 + 4? \xff\xfe\xc3(", "answer": "8"}',  # invalid UTF-8
    b'{"question": "What is 1 + 1? \\u0000 and a raw \x00 NUL", "answer": "2"}',
    b'{"question": "What is 3 + 3? lone \\ud800 surrogate", "answer": "6"}',
    b'{"question": "What is 5 + 5? bidi \\u202e bell \x07 sep \\u2028 end", "answer": "10"}',
    # raw CR, NEL and LINE SEPARATOR inside strings: valid JSON, and no end of a JSON Lines row
    b'{"question": "What is 6 + 1? raw\rCR \xc2\x85 NEL \xe2\x80\xa8 LS", "answer": "7\\t"}',
    b'{"question": null, "answer": "1"}',
    b'{"question": "What is 1 + 0?", "answer": ""}',
    b'{"question": "   \\t ", "answer": "3"}',
    b'{"question": "What is 2 + 2?"}',
]


def write_messy(path):
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(MESSY_LINES) + b"\n")  # with a BOM, for good measure
    return path


def assert_clean_jsonl(path) -> list[dict]:
    """Every line is JSON; the file is ASCII (so no exotic line separator splits a row); every string in it
    is encodable UTF-8 (no lone surrogates that would crash pandas, arrow or a UTF-8 writer)."""
    raw = path.read_bytes()
    assert raw.isascii()
    text = raw.decode("utf-8")
    lines = text.split("\n")
    assert lines[-1] == "" and len(text.splitlines()) == len(lines) - 1
    rows = [json.loads(line) for line in lines[:-1]]

    def walk(value):
        if isinstance(value, str):
            value.encode("utf-8")  # raises on a lone surrogate
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for row in rows:
        walk(row)
    return rows


@pytest.fixture(scope="module")
def messy_run(tiny_model, tmp_path_factory):
    """A 3-step run on the messy file, graded by a teacher whose every answer is wrapped in noise."""
    tmp = tmp_path_factory.mktemp("messy")
    data = write_messy(tmp / "messy.jsonl")
    handler = _Capture()
    logging.getLogger("grpo_llm_eval").addHandler(handler)
    try:
        with TeacherServer(fault_rate=1.0, faults=("noisy",)) as srv:
            cfg = tiny_cfg(tiny_model, tmp / "runs", srv.base_url, total_steps=3, dataset_name=str(data))
            result = train(cfg)
    finally:
        logging.getLogger("grpo_llm_eval").removeHandler(handler)
    return result, handler.messages


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class TestBadTextInDataAndGrades:
    def test_rollouts_stay_valid_json_lines_with_every_string_encodable(self, messy_run):
        result, _ = messy_run
        rows = assert_clean_jsonl(result.run_dir / "rollouts.jsonl")
        assert len(rows) == 3 * 2 and result.global_step == 3
        assert_clean_jsonl(result.run_dir / "metrics.jsonl")

    def test_noisy_grades_still_parse_and_their_noise_is_recorded_escaped(self, messy_run):
        result, _ = messy_run
        rows = read_jsonl(result.run_dir / "rollouts.jsonl")
        assert all(r["judge_status"] == "ok" and r["reward"] is not None for r in rows)
        assert all("\x1b[2J" in r["feedback"] and "\x00" in r["feedback"] for r in rows)

    def test_questions_lose_their_nul_bytes_and_keep_the_rest(self, messy_run):
        result, _ = messy_run
        for r in read_jsonl(result.run_dir / "rollouts.jsonl"):
            assert "\x00" not in r["question"] and "\x00" not in json.dumps(r["prompt"])
            assert any(r["question"].startswith(q) for q in GOOD_QUESTIONS)

    def test_the_judge_command_reads_the_same_bytes_and_writes_one_valid_line_per_row(self, tmp_path):
        response = b', "response": "<think>x</think> 5 \x1b[0m \xff"}'
        source = tmp_path / "in.jsonl"
        source.write_bytes(b"\n".join(line[:-1] + response for line in MESSY_LINES) + b"\n")
        with TeacherServer(fault_rate=1.0, faults=("noisy",)) as srv:
            cfg = Config(teacher_backend="openai", teacher_model_name="teacher", openai_base_url=srv.base_url)
            summary = judge_file(cfg, str(source), str(tmp_path / "out.jsonl"))
        graded = assert_clean_jsonl(tmp_path / "out.jsonl")
        assert len(graded) == len(MESSY_LINES) == summary["rows"] == summary["ok"]


class TestBadDatasetRows:
    def test_rows_without_a_question_or_answer_are_skipped_and_counted_in_one_line(self, messy_run):
        _, messages = messy_run
        skipped = [m for m in messages if "skipped" in m and "rows" in m]
        assert len(skipped) == 1 and "skipped 4 of 10 rows" in skipped[0]

    def test_skipped_rows_never_reach_the_student(self, messy_run):
        result, _ = messy_run
        questions = {r["question"] for r in read_jsonl(result.run_dir / "rollouts.jsonl")}
        assert not questions & {"What is 1 + 0?", "What is 2 + 2?", ""}
