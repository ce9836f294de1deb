"""`grpo_llm_eval judge`: grade existing responses with the teacher, one output row per input row."""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from grpo_llm_eval.cli import main
from grpo_llm_eval.testing import TeacherServer
from grpo_llm_eval.training.records import read_jsonl

ROWS = [
    {"id": 1, "question": "What is 6 * 7?", "response": "<think>6*7=42</think> 42", "answer": "42"},
    {"id": 2, "question": "What is 6 * 7?", "response": "<think>6*7=48</think> 48", "answer": "42"},
    {"id": 3, "question": "What is 9 + 9?", "response": "18", "answer": "18"},  # right, but no think block
    {"id": 4, "question": "What is 9 + 9?", "answer": "18"},  # no response: skipped
    {"id": 5, "question": "What is 5 - 2?", "completion": "<think>5-2</think> 3", "ground_truth": "3"},
    {"id": 6, "question": "What is 5 - 2?", "student_response": "<think>5-2</think> 4", "answer": 3},
]
RIGHT = {1: True, 2: False, 3: True, 5: True, 6: False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def judge(tmp_path, url: str, rows=ROWS, **settings):
    config = tmp_path / "judge.yaml"
    config.write_text(yaml.safe_dump({"teacher_backend": "openai", "teacher_model_name": "teacher",
                                      "openai_base_url": url, "teacher_timeout_s": 5, **settings}))
    source, target = tmp_path / "responses.jsonl", tmp_path / "graded.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    rc = main(["judge", "--config", str(config), "--input", str(source), "--output", str(target)])
    return rc, target


class TestJudgeCommand:
    def test_one_graded_row_per_input_row_in_order_with_the_input_fields_kept(self, tmp_path):
        with TeacherServer(mode="scripted") as srv:
            rc, out = judge(tmp_path, srv.base_url)
        graded = read_jsonl(out)
        assert rc == 0 and len(out.read_text().splitlines()) == len(ROWS)
        assert [g["id"] for g in graded] == [r["id"] for r in ROWS]
        assert all({k: v for k, v in g.items() if k in r} == r for g, r in zip(graded, ROWS, strict=True))
        assert not (tmp_path / "graded.jsonl.partial").exists()

    def test_group_mode_grades_each_question_in_one_call_and_records_the_call(self, tmp_path):
        with TeacherServer(mode="scripted") as srv:
            rc, out = judge(tmp_path, srv.base_url, judge_mode="group")
            calls = srv.stats()["chat_requests"]
        graded = {g["id"]: g for g in read_jsonl(out)}
        assert rc == 0 and calls == 3  # three questions with responses; row 4 has none
        assert all(graded[i]["scores"]["answer"] == (10.0 if right else 0.0) for i, right in RIGHT.items())
        assert graded[1]["judge_call_id"] == graded[2]["judge_call_id"] != graded[3]["judge_call_id"]

    def test_right_and_wrong_answers_get_the_teachers_scores(self, tmp_path):
        with TeacherServer(mode="scripted") as srv:
            _, out = judge(tmp_path, srv.base_url)
        for g in read_jsonl(out):
            if g["id"] not in RIGHT:
                continue
            right = RIGHT[g["id"]]
            assert g["judge_status"] == "ok" and g["answer_correct"] is right
            assert g["scores"]["answer"] == g["scores"]["thought_process"] == (10.0 if right else 0.0)
            assert g["scores"]["format"] == (0.0 if g["id"] == 3 else 10.0)
            assert g["teacher_reward"] == pytest.approx(0.07 * g["scores"]["thought_process"]
                                                        + 0.1 * g["scores"]["answer"] + 0.03 * g["scores"]["format"])

    def test_a_row_without_a_response_is_skipped_not_graded(self, tmp_path):
        with TeacherServer(mode="scripted") as srv:
            _, out = judge(tmp_path, srv.base_url)
            asked = srv.stats()["chat_requests"]
        [row] = [g for g in read_jsonl(out) if g["id"] == 4]
        assert row["judge_status"] == "skipped" and "scores" not in row
        assert asked == len(RIGHT)

    def test_failed_grades_carry_their_status_and_no_score(self, tmp_path):
        with TeacherServer(mode="scripted", fault_script=("500", "garbage")) as srv:
            _, out = judge(tmp_path, srv.base_url, rows=ROWS[:2], teacher_max_retries=0, teacher_max_concurrency=1)
        statuses = {g["id"]: g for g in read_jsonl(out)}
        assert {statuses[1]["judge_status"], statuses[2]["judge_status"]} == {"http_error", "unparseable"}
        assert all(g["teacher_reward"] is None and set(g["scores"].values()) == {None} for g in statuses.values())

    def test_an_unreachable_teacher_exits_1_and_writes_no_output(self, tmp_path, capsys):
        rc, out = judge(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
        assert rc == 1 and "error: cannot reach the teacher" in capsys.readouterr().err
        assert not out.exists() and not (tmp_path / "graded.jsonl.partial").exists()
