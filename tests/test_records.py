"""Run records: valid JSONL whatever the text, torn last lines skipped, groups and advantages attached."""

from __future__ import annotations

import json

from grpo_llm_eval.teacher.types import Judgement
from grpo_llm_eval.training.records import JsonlWriter, RolloutRecorder, dumps, read_jsonl


class TestJsonl:
    def test_control_characters_and_lone_surrogates_stay_valid_json(self, tmp_path):
        w = JsonlWriter(tmp_path / "r.jsonl")
        w.write_many([{"text": "a\x00b\x1b[31m\ud800 end", "x": float("nan")}])
        w.close()
        raw = (tmp_path / "r.jsonl").read_bytes()
        raw.decode("ascii")  # ensure_ascii: every byte is plain ASCII
        [row] = [json.loads(line) for line in raw.splitlines()]
        assert row["text"].startswith("a\x00b") and row["x"] is None

    def test_a_torn_last_line_is_skipped_by_readers(self, tmp_path):
        p = tmp_path / "r.jsonl"
        p.write_text(dumps({"step": 1}) + "\n" + dumps({"step": 2}) + "\n" + '{"step": 3, "compl')
        assert [r["step"] for r in read_jsonl(p)] == [1, 2]

    def test_missing_file_reads_as_no_rows(self, tmp_path):
        assert read_jsonl(tmp_path / "none.jsonl") == []


class TestRolloutRecorder:
    def make(self, tmp_path, n=4, g=2):
        rec = RolloutRecorder(tmp_path, num_generations=g)
        judgements = [Judgement({"answer": float(i)}, f"fb{i}", "raw", "ok") for i in range(n - 1)]
        judgements.append(Judgement.failed("timeout", ["answer"]))
        rows = [{"reward": float(i), "teacher_reward": float(i)} for i in range(n - 1)] + [{"reward": None, "teacher_reward": None}]
        rec.add_local([[{"role": "user", "content": f"q{i // g}"}] for i in range(n)], [f"q{i // g}" for i in range(n)],
                      [f"c{i}" for i in range(n)], ["7"] * n, judgements, rows)
        return rec

    def test_records_carry_step_group_advantage_and_status(self, tmp_path):
        rec = self.make(tmp_path)
        rec.finish_batch([0.5, -0.5, 1.0, 0.3], step=3)
        assert rec.flush() == 4
        rows = read_jsonl(tmp_path / "rollouts.jsonl")
        assert [r["group"] for r in rows] == [0, 0, 1, 1]
        assert {r["step"] for r in rows} == {3}
        assert rows[0]["advantage"] == 0.5 and rows[0]["scores"] == {"answer": 0.0}
        # a failed grade: no reward, so no advantage is claimed for it
        assert rows[3]["judge_status"] == "timeout" and rows[3]["reward"] is None and rows[3]["advantage"] is None
        for key in ("prompt", "completion", "ground_truth", "feedback"):
            assert key in rows[0]

    def test_non_main_process_writes_nothing(self, tmp_path):
        rec = RolloutRecorder(tmp_path / "other", num_generations=2, is_main=False)
        rec.finish_batch([], step=1)
        assert rec.flush() == 0 and not (tmp_path / "other" / "rollouts.jsonl").exists()

    def test_gather_collects_every_process_completions(self, tmp_path):
        rec = self.make(tmp_path)
        rec.finish_batch([0.0] * 4, step=1, gather=lambda local: local + [dict(r) for r in local])
        assert rec.flush() == 8
        rows = read_jsonl(tmp_path / "rollouts.jsonl")
        assert [r["index"] for r in rows] == list(range(8)) and rows[-1]["group"] == 3
