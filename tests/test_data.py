"""Spec of the data layer: sources, column handling, skipping, cleaning, sampling, prompts, bundled data."""

from __future__ import annotations

import json
import logging
import operator
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

import grpo_llm_eval
from grpo_llm_eval.config import Config
from grpo_llm_eval.data import DataError, build_prompts, load_rows, split_siblings
from grpo_llm_eval.data import bundled as bundled_data

ROWS = [{"question": "What is 2 + 3?", "answer": "5", "kind": "addition"},
        {"question": "What is 7 * 6?", "answer": "42", "kind": "multiplication"},
        {"question": "What is 9 - 4?", "answer": "5", "kind": "subtraction"}]
ARITH = re.compile(r"^What is (\d+) ([-+*]) (\d+)\? Give only the final number\.$")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def make_cfg(tmp_path: Path, dataset_name: str, **kw) -> Config:
    return Config(dataset_name=str(dataset_name), cache_dir=str(tmp_path / "cache"), **kw)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "csv": write_csv, "parquet": write_parquet}


class TestBundledArithmetic:
    def test_shipped_files_equal_a_fresh_generation(self):
        fresh = bundled_data.generate_arithmetic()
        for split, rows in fresh.items():
            assert bundled_data.read_bundled("arithmetic", split) == rows, f"assets drifted for {split}"

    def test_check_mode_reports_a_drifted_file(self, tmp_path):
        assert bundled_data.main(["--check"]) == 0
        assert bundled_data.main(["--out", str(tmp_path)]) == 0
        assert bundled_data.main(["--check", "--out", str(tmp_path)]) == 0
        target = tmp_path / "arithmetic_test.jsonl"
        target.write_text(target.read_text(encoding="utf-8").replace('"answer": "', '"answer": "1', 1), encoding="utf-8")
        assert bundled_data.main(["--check", "--out", str(tmp_path)]) == 1

    def test_every_answer_is_right(self):
        for split in ("train", "test"):
            for row in bundled_data.read_bundled("arithmetic", split):
                match = ARITH.match(row["question"])
                if row["kind"] == "word":
                    assert match is None
                    numbers = [int(n) for n in re.findall(r"\d+", row["question"])]
                    assert 2 <= len(numbers) <= 3 and int(row["answer"]) >= 0
                else:
                    assert match, row
                    assert int(row["answer"]) == OPS[match[2]](int(match[1]), int(match[3])), row
                assert bundled_data.verify_row(row), row

    def test_word_problems_are_checked_from_their_text(self):
        row = {"question": "Tom has 7 apples and buys 5 more. How many apples does Tom have now? Give only the final "
                           "number.", "answer": "12", "kind": "word"}
        assert bundled_data.verify_row(row)
        assert not bundled_data.verify_row({**row, "answer": "13"})
        assert not bundled_data.verify_row({**row, "question": row["question"].replace("Tom have", "Ann have")})
        assert not bundled_data.verify_row({**row, "question": "Tom has 7 apples. How many?"})

    def test_train_and_test_share_no_question(self):
        train = {r["question"] for r in bundled_data.read_bundled("arithmetic", "train")}
        test = [r["question"] for r in bundled_data.read_bundled("arithmetic", "test")]
        assert len(test) >= 100 and len(train) + len(test) >= 600
        assert len(set(test)) == len(test)
        assert train.isdisjoint(test)

    def test_addition_benchmark_template_is_the_majority_of_each_split(self):
        template = re.compile(r"^What is (\d+) \+ (\d+)\? Give only the final number\.$")
        for split in ("train", "test"):
            rows = bundled_data.read_bundled("arithmetic", split)
            additions = [template.match(r["question"]) for r in rows if r["kind"] == "addition"]
            assert all(additions) and 0.65 <= len(additions) / len(rows) <= 0.75
            assert all(2 <= int(m[1]) <= 30 and 2 <= int(m[2]) <= 30 for m in additions)
            assert {r["kind"] for r in rows} == {"addition", "subtraction", "multiplication", "word"}

    def test_generation_is_deterministic_and_depends_on_the_seed(self):
        assert bundled_data.generate_arithmetic(7) == bundled_data.generate_arithmetic(7)
        assert bundled_data.generate_arithmetic(7) != bundled_data.generate_arithmetic(8)

    def test_stable_shuffle_is_a_fixed_permutation(self):
        # Pinned values: a change of the shuffle would silently change every max_train_samples subset.
        assert bundled_data.stable_shuffle(list(range(8)), 3409) == [2, 1, 5, 0, 7, 3, 4, 6]
        assert sorted(bundled_data.stable_shuffle(list(range(50)), 1)) == list(range(50))


class TestLoadRowsSources:
    def test_bundled_arithmetic_loads_both_splits(self, tmp_path):
        cfg = make_cfg(tmp_path, "bundled:arithmetic")
        train, test = load_rows(cfg, "train"), load_rows(cfg, "test")
        assert (len(train.dataset), len(test.dataset)) == (680, 120)
        assert train.dataset.column_names == ["question", "answer", "kind"]
        assert (train.skipped, train.total, test.source) == (0, 680, "bundled:arithmetic")

    def test_unknown_bundled_name_lists_the_available_names(self, tmp_path):
        with pytest.raises(DataError, match=r"unknown bundled dataset 'bundled:nope'; available: bundled:arithmetic"):
            load_rows(make_cfg(tmp_path, "bundled:nope"), "train")

    def test_unknown_bundled_split_lists_the_splits(self, tmp_path):
        with pytest.raises(DataError, match="splits: train, test"):
            load_rows(make_cfg(tmp_path, "bundled:arithmetic"), "validation")

    @pytest.mark.parametrize("kind", sorted(WRITERS))
    def test_local_file_is_read_whole_for_the_train_split(self, tmp_path, kind):
        path = WRITERS[kind](tmp_path / f"data.{kind}", ROWS)
        loaded = load_rows(make_cfg(tmp_path, path), "train")
        assert loaded.dataset.to_list() == ROWS
        assert (loaded.skipped, loaded.total, loaded.source) == (0, 3, str(path))

    @pytest.mark.parametrize("kind", sorted(WRITERS))
    def test_eval_split_of_a_file_comes_from_its_sibling(self, tmp_path, kind):
        WRITERS[kind](tmp_path / f"data_train.{kind}", ROWS)
        sibling = WRITERS[kind](tmp_path / f"data_test.{kind}", ROWS[:1])
        loaded = load_rows(make_cfg(tmp_path, tmp_path / f"data_train.{kind}"), "test")
        assert loaded.dataset["question"] == [ROWS[0]["question"]] and loaded.source == str(sibling)

    def test_eval_split_without_a_sibling_names_the_files_looked_for(self, tmp_path):
        path = write_jsonl(tmp_path / "data.jsonl", ROWS)
        with pytest.raises(DataError, match=re.escape(str(tmp_path / "data_test.jsonl"))):
            load_rows(make_cfg(tmp_path, path), "test")

    def test_sibling_names_swap_in_the_split(self):
        assert [p.name for p in split_siblings(Path("train.csv"), "train", "test")] == ["test.csv", "train_test.csv"]
        assert [p.name for p in split_siblings(Path("data.jsonl"), "train", "eval")] == ["data_eval.jsonl"]
        assert [p.name for p in split_siblings(Path("trainset.jsonl"), "train", "test")] == ["trainset_test.jsonl"]

    def test_json_file_with_columns_or_a_data_key_is_read(self, tmp_path):
        columns = {k: [r[k] for r in ROWS] for k in ROWS[0]}
        (tmp_path / "cols.json").write_text(json.dumps(columns), encoding="utf-8")
        (tmp_path / "keyed.json").write_text(json.dumps({"data": ROWS}), encoding="utf-8")
        for name in ("cols.json", "keyed.json"):
            assert load_rows(make_cfg(tmp_path, tmp_path / name), "train").dataset.to_list() == ROWS

    def test_invalid_json_line_is_named(self, tmp_path):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
        with pytest.raises(DataError, match="line 2: invalid JSON"):
            load_rows(make_cfg(tmp_path, path), "train")

    def test_save_to_disk_dataset_dict_gives_the_asked_split(self, tmp_path):
        folder = tmp_path / "dd"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                              "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(folder))
        cfg = make_cfg(tmp_path, folder)
        assert load_rows(cfg, "train").dataset.to_list() == ROWS
        assert load_rows(cfg, "test").dataset.to_list() == ROWS[2:]
        with pytest.raises(DataError, match="has no split 'validation'; splits: train, test"):
            load_rows(cfg, "validation")

    def test_save_to_disk_dataset_is_used_whole_and_its_eval_split_is_a_sibling(self, tmp_path):
        datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
        cfg = make_cfg(tmp_path, tmp_path / "ds")
        assert load_rows(cfg, "train").dataset.to_list() == ROWS
        with pytest.raises(DataError, match="ds_test"):
            load_rows(cfg, "test")
        datasets.Dataset.from_list(ROWS[1:]).save_to_disk(str(tmp_path / "ds_test"))
        assert load_rows(cfg, "test").dataset.to_list() == ROWS[1:]

    def test_folder_of_split_files_gives_the_asked_split(self, tmp_path):
        write_jsonl(tmp_path / "train.jsonl", ROWS)
        write_csv(tmp_path / "test.csv", ROWS[:2])
        cfg = make_cfg(tmp_path, tmp_path)
        assert len(load_rows(cfg, "train").dataset) == 3 and len(load_rows(cfg, "test").dataset) == 2
        with pytest.raises(DataError, match="validation.jsonl"):
            load_rows(cfg, "validation")

    def test_missing_local_file_is_an_error_not_a_hub_lookup(self, tmp_path):
        with pytest.raises(DataError, match="no such file or folder"):
            load_rows(make_cfg(tmp_path, tmp_path / "nope.jsonl"), "train")


def run_load_in_subprocess(env_extra: dict, name: str, cache_dir: Path) -> tuple[subprocess.CompletedProcess, float]:
    """load_rows in a fresh process: datasets and huggingface_hub read HF_* variables at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and not k.lower().endswith("_proxy")}
    env.update(env_extra, PYTHONPATH=str(Path(grpo_llm_eval.__file__).parents[1]))
    code = ("import sys\nfrom grpo_llm_eval.config import Config\nfrom grpo_llm_eval.data import DataError, load_rows\n"
            "try:\n    rows = load_rows(Config(dataset_name=sys.argv[1], cache_dir=sys.argv[2]), 'train')\n"
            "except DataError as exc:\n    print('DATAERROR', exc)\n    sys.exit(3)\nprint('ROWS', rows.dataset.to_list())\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, name, str(cache_dir)], env=env, capture_output=True, text=True,
                          timeout=120)
    return proc, time.monotonic() - start


def closed_loopback_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class TestHubWhenOffline:
    def test_uncached_hub_id_with_the_offline_switches_fails_fast_with_one_line(self, tmp_path):
        proc, elapsed = run_load_in_subprocess({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                                "HF_HOME": str(tmp_path / "hf")}, "no-such-org/no-such-data", tmp_path)
        assert proc.returncode == 3, proc.stderr[-2000:]
        line = proc.stdout.strip()
        assert "\n" not in line and line.startswith("DATAERROR Hub dataset 'no-such-org/no-such-data' split 'train'")
        assert "offline" in line and "bundled:arithmetic" in line and ".jsonl" in line
        assert "Traceback" not in proc.stderr and elapsed < 60

    def test_a_bundled_name_without_its_prefix_gets_a_hint(self, tmp_path):
        proc, _ = run_load_in_subprocess({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}, "arithmetic", tmp_path)
        assert proc.returncode == 3 and "(did you mean bundled:arithmetic?)" in proc.stdout, proc.stderr[-2000:]

    def test_unreachable_hub_fails_fast_instead_of_retrying(self, tmp_path):
        # huggingface_hub alone retries for about 25 s before giving up.
        proc, elapsed = run_load_in_subprocess({"HF_ENDPOINT": closed_loopback_url(), "HF_HOME": str(tmp_path / "hf")},
                                               "no-such-org/no-such-data", tmp_path)
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert "unreachable and not cached" in proc.stdout and "bundled:arithmetic" in proc.stdout
        assert elapsed < 15

    def test_a_cached_hub_dataset_loads_when_the_hub_is_unreachable(self, tmp_path):
        # Lay out datasets' cache as an earlier online load_dataset("acme/toy") leaves it.
        source = write_jsonl(tmp_path / "toy.jsonl", ROWS)
        datasets.load_dataset("json", data_files={"train": str(source)}, cache_dir=str(tmp_path / "built"))
        built = next(p for p in (tmp_path / "built" / "json").glob("*/*/*") if p.is_dir())
        target = tmp_path / "cache" / "datasets" / "acme___toy" / "default" / "0.0.0" / built.name
        target.mkdir(parents=True)
        (target / "dataset_info.json").write_bytes((built / "dataset_info.json").read_bytes())
        (target / "toy-train.arrow").write_bytes((built / "json-train.arrow").read_bytes())
        proc, _ = run_load_in_subprocess({"HF_ENDPOINT": closed_loopback_url(), "HF_HOME": str(tmp_path / "hf")},
                                         "acme/toy", tmp_path / "cache")
        assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1] == f"ROWS {ROWS}"


class TestColumns:
    def test_configured_columns_are_renamed_to_question_and_answer(self, tmp_path):
        rows = [{"problem": "1+1?", "solution": 2, "question": "decoy", "id": 1}]
        path = write_jsonl(tmp_path / "d.jsonl", rows)
        cfg = make_cfg(tmp_path, path, dataset_question_column="problem", dataset_answer_column="solution")
        assert load_rows(cfg, "train").dataset.to_list() == [{"question": "1+1?", "answer": "2", "id": 1}]

    def test_missing_column_names_it_and_the_available_columns(self, tmp_path):
        path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "answer": "a"}])
        with pytest.raises(DataError, match=r"no column 'question' \(set by dataset_question_column\); "
                                            r"available columns: prompt, answer"):
            load_rows(make_cfg(tmp_path, path), "train")


class TestSkippingEmptyRows:
    ROWS_WITH_EMPTIES = [{"question": "q1", "answer": "1"}, {"question": "", "answer": "2"},
                         {"question": "q3", "answer": None}, {"question": "  \n", "answer": "4"},
                         {"question": "q5", "answer": 5}, {"question": None, "answer": None}]

    def test_empty_rows_are_skipped_counted_and_logged_once(self, tmp_path, caplog):
        path = write_jsonl(tmp_path / "d.jsonl", self.ROWS_WITH_EMPTIES)
        with caplog.at_level(logging.WARNING, logger="grpo_llm_eval.data"):
            loaded = load_rows(make_cfg(tmp_path, path), "train")
        assert loaded.dataset.to_list() == [{"question": "q1", "answer": "1"}, {"question": "q5", "answer": "5"}]
        assert (loaded.skipped, loaded.total) == (4, 6)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "skipped 4 of 6 rows with an empty question or answer" in warnings[0]

    def test_nan_answers_from_parquet_are_skipped(self, tmp_path):
        path = write_parquet(tmp_path / "d.parquet", [{"question": "a", "answer": 1.5},
                                                      {"question": "b", "answer": float("nan")}])
        loaded = load_rows(make_cfg(tmp_path, path), "train")
        assert loaded.dataset.to_list() == [{"question": "a", "answer": "1.5"}] and loaded.skipped == 1

    def test_no_warning_when_nothing_is_skipped(self, tmp_path, caplog):
        with caplog.at_level(logging.WARNING, logger="grpo_llm_eval.data"):
            assert load_rows(make_cfg(tmp_path, write_jsonl(tmp_path / "d.jsonl", ROWS)), "train").skipped == 0
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    def test_all_rows_empty_is_an_error_that_counts_them(self, tmp_path):
        path = write_jsonl(tmp_path / "d.jsonl", [{"question": "", "answer": "1"}, {"question": "q", "answer": " "}])
        with pytest.raises(DataError, match=r"split 'train' has no usable rows \(2 rows, all with an empty question"):
            load_rows(make_cfg(tmp_path, path), "train")

    def test_a_file_without_rows_is_an_error(self, tmp_path):
        (tmp_path / "d.jsonl").write_text("\n", encoding="utf-8")
        with pytest.raises(DataError, match="has no rows"):
            load_rows(make_cfg(tmp_path, tmp_path / "d.jsonl"), "train")


class TestTextCleaning:
    def test_numeric_answers_become_strings(self, tmp_path):
        rows = [{"question": "a", "answer": 12}, {"question": "b", "answer": 12.0}, {"question": "c", "answer": 2.5},
                {"question": "d", "answer": "007"}]
        path = write_jsonl(tmp_path / "d.jsonl", rows)
        assert load_rows(make_cfg(tmp_path, path), "train").dataset["answer"] == ["12", "12", "2.5", "007"]

    def test_integers_beyond_64_bits_become_strings(self, tmp_path):
        path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": 2**70}, {"question": "b", "answer": 1}])
        assert load_rows(make_cfg(tmp_path, path), "train").dataset["answer"] == [str(2**70), "1"]

    def test_csv_cells_keep_their_text(self, tmp_path):
        (tmp_path / "d.csv").write_text("question,answer\nq1,007\nq2,\nq3,1e3\n", encoding="utf-8")
        loaded = load_rows(make_cfg(tmp_path, tmp_path / "d.csv"), "train")
        assert loaded.dataset["answer"] == ["007", "1e3"] and loaded.skipped == 1

    def test_nul_bytes_bad_utf8_and_lone_surrogates_do_not_crash(self, tmp_path):
        path = tmp_path / "d.jsonl"
        path.write_bytes(b'{"question": "a\\u0000b\\ud800", "answer": "1"}\n'
                         b'{"question": "caf\xe9 \x01", "answer": "2\\u0000"}\n')
        loaded = load_rows(make_cfg(tmp_path, path), "train")
        assert loaded.dataset["question"] == ["ab?", "caf\ufffd \x01"]
        assert loaded.dataset["answer"] == ["1", "2"]


class TestMaxTrainSamples:
    def test_limits_train_rows_deterministically_by_seed(self, tmp_path):
        cfg = make_cfg(tmp_path, "bundled:arithmetic", max_train_samples=50)
        first, again = load_rows(cfg, "train").dataset, load_rows(cfg, "train").dataset
        assert len(first) == 50 and first["question"] == again["question"]
        other = load_rows(make_cfg(tmp_path, "bundled:arithmetic", max_train_samples=50, seed=1), "train").dataset
        assert other["question"] != first["question"]
        assert first["question"] != load_rows(make_cfg(tmp_path, "bundled:arithmetic"), "train").dataset["question"][:50]

    def test_eval_split_and_zero_are_not_limited(self, tmp_path):
        assert len(load_rows(make_cfg(tmp_path, "bundled:arithmetic", max_train_samples=50), "test").dataset) == 120
        assert len(load_rows(make_cfg(tmp_path, "bundled:arithmetic", max_train_samples=0), "train").dataset) == 680


class TestBuildPrompts:
    def test_prompt_has_system_then_user_message(self, tmp_path):
        cfg = make_cfg(tmp_path, "bundled:arithmetic", system_prompt="Think first.")
        ds = build_prompts(datasets.Dataset.from_list(ROWS), cfg)
        assert ds[0]["prompt"] == [{"role": "system", "content": "Think first."},
                                   {"role": "user", "content": "What is 2 + 3?"}]
        assert (ds[0]["question"], ds[0]["answer"], ds[0]["kind"]) == ("What is 2 + 3?", "5", "addition")

    def test_empty_system_prompt_gives_only_the_user_message(self, tmp_path):
        ds = build_prompts(datasets.Dataset.from_list(ROWS), make_cfg(tmp_path, "x", system_prompt=""))
        assert [row["prompt"] for row in ds] == [[{"role": "user", "content": r["question"]}] for r in ROWS]

    def test_an_existing_prompt_column_is_replaced(self, tmp_path):
        ds = datasets.Dataset.from_list([{**ROWS[0], "prompt": "old"}])
        out = build_prompts(ds, make_cfg(tmp_path, "x", system_prompt=""))
        assert out[0]["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}]

    def test_rows_without_question_or_answer_are_refused(self, tmp_path):
        with pytest.raises(DataError, match="missing \\['answer'\\]"):
            build_prompts(datasets.Dataset.from_list([{"question": "q"}]), make_cfg(tmp_path, "x"))

    def test_loaded_bundled_rows_become_prompts_end_to_end(self, tmp_path):
        cfg = make_cfg(tmp_path, "bundled:arithmetic")
        ds = build_prompts(load_rows(cfg, "test").dataset, cfg)
        assert len(ds) == 120 and all(p[0]["content"] == cfg.system_prompt for p in ds["prompt"])
        assert all(bundled_data.verify_row(r) for r in ds.select_columns(["question", "answer"]))
