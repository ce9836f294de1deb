"""Datasets: a Hub id, a local .jsonl/.json/.csv/.parquet file, a `save_to_disk` folder, or `bundled:NAME`.

Two public steps, called in this order by the entry points:

- `load_rows(cfg, split) -> LoadedData`: read one split, rename the configured columns to `question` and
  `answer` (the ground truth), skip and count rows with an empty question or answer, apply
  `max_train_samples` to the train split.
- `build_prompts(dataset, cfg) -> Dataset`: add TRL's conversational `prompt` column.

Splits of a single-split source (one file, a folder written from a `Dataset`): the source itself serves
`cfg.dataset_split` whole. Any other split (e.g. the eval split) is read from a sibling holding that
split's name: `data_train.jsonl` -> `data_test.jsonl`, `train.csv` -> `test.csv`, `data.jsonl` ->
`data_test.jsonl`; without one, a `DataError` says which files were looked for. We never carve a
held-out tail out of the training file silently, since the model would then train on fewer rows than
the user asked for and "held-out" would depend on row order.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import datasets
import datasets.table
import huggingface_hub
import pyarrow.parquet

from grpo_llm_eval.config import Config
from grpo_llm_eval.data import rubrics
from grpo_llm_eval.data.bundled import BUNDLED_DATASETS, read_bundled, stable_shuffle

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")
_WAY_OUT = "use a local .jsonl/.json/.csv/.parquet file, a save_to_disk folder, or bundled:arithmetic"


class DataError(Exception):
    """A dataset that cannot be used; the message is one line that names the dataset and the fix."""


@dataclass(frozen=True)
class LoadedData:
    """One loaded split: `dataset` has `question` and `answer` (str) plus the source's other columns."""

    dataset: datasets.Dataset
    skipped: int  # rows dropped for an empty question or answer
    total: int  # rows in the source split before skipping and before max_train_samples
    source: str  # what was actually read (the sibling file for an eval split, say)
    split: str


def load_rows(cfg: Config, split: str) -> LoadedData:
    """Load `split` of `cfg.dataset_name` with `question` and `answer` string columns.

    Rows whose question or answer is empty (None, NaN, blank) are skipped, counted and logged in one
    warning line. For `split == cfg.dataset_split`, `cfg.max_train_samples > 0` keeps the first N rows
    after a shuffle seeded with `cfg.seed`. Raises `DataError` with a one-line message on any problem.

    >>> loaded = load_rows(Config(dataset_name="bundled:arithmetic"), "test")
    >>> len(loaded.dataset), loaded.skipped
    (120, 0)
    """
    name = cfg.dataset_name.strip()
    if not name:
        raise DataError(f"dataset_name is empty; {_WAY_OUT}.")
    raw, source = _read_source(name, split, cfg)
    loaded = _normalize(raw, cfg, name, split, source)
    if split == cfg.dataset_split and cfg.max_train_samples > 0 and cfg.max_train_samples < len(loaded.dataset):
        order = stable_shuffle(list(range(len(loaded.dataset))), cfg.seed)[: cfg.max_train_samples]
        loaded = LoadedData(loaded.dataset.select(order), loaded.skipped, loaded.total, source, split)
    logger.info("dataset %s split %s: %d rows from %s", name, split, len(loaded.dataset), source)
    return loaded


def build_prompts(dataset: datasets.Dataset, cfg: Config) -> datasets.Dataset:
    """Add a `prompt` column in TRL's conversational format; `question` and `answer` stay for the rewards.

    The prompt is `[{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": question}]`,
    without the system message when `cfg.system_prompt` is empty.

    >>> ds = datasets.Dataset.from_list([{"question": "What is 2 + 3?", "answer": "5"}])
    >>> build_prompts(ds, Config(system_prompt=""))[0]["prompt"]
    [{'role': 'user', 'content': 'What is 2 + 3?'}]
    """
    missing = [c for c in ("question", "answer") if c not in dataset.column_names]
    if missing:
        raise DataError(f"build_prompts needs columns question and answer (from load_rows); missing {missing}, "
                        f"available: {', '.join(dataset.column_names)}.")
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    prompts = [system + [{"role": "user", "content": q}] for q in dataset["question"]]
    if "prompt" in dataset.column_names:
        logger.warning("the dataset's own 'prompt' column is replaced by one built from 'question'")
        dataset = dataset.remove_columns("prompt")
    return dataset.add_column("prompt", prompts)


# ---- sources -------------------------------------------------------------------------------------


def _read_source(name: str, split: str, cfg: Config) -> tuple[datasets.Dataset, str]:
    """The raw split and a description of what was read."""
    if name.startswith(BUNDLED_PREFIX):
        return _read_bundled(name[len(BUNDLED_PREFIX):], split), name
    path = Path(name).expanduser()
    if path.is_dir():
        return _read_folder(path, split, cfg)
    if path.is_file():
        return _read_single(path, split, cfg, _read_file)
    if path.suffix.lower() in FILE_SUFFIXES or name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise DataError(f"dataset_name {name!r}: no such file or folder (and not a Hub id); {_WAY_OUT}.")
    return _read_hub(name, split, cfg), f"hub:{name}"


def _read_bundled(name: str, split: str) -> datasets.Dataset:
    spec = BUNDLED_DATASETS.get(name)
    if spec is None:
        available = ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_DATASETS)
        raise DataError(f"unknown bundled dataset {BUNDLED_PREFIX + name!r}; available: {available}.")
    if split not in spec.splits:
        raise DataError(f"bundled dataset {BUNDLED_PREFIX + name!r} has no split {split!r}; splits: "
                        f"{', '.join(spec.splits)}.")
    return datasets.Dataset.from_list(read_bundled(name, split))


def _read_folder(path: Path, split: str, cfg: Config) -> tuple[datasets.Dataset, str]:
    is_saved = any((path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json"))
    if is_saved:
        return _read_saved(path, split, cfg)
    # A plain folder of split files, like the Hub's layout: train.jsonl, test.csv, ...
    for suffix in FILE_SUFFIXES:
        if (path / f"{split}{suffix}").is_file():
            return _read_file(path / f"{split}{suffix}"), str(path / f"{split}{suffix}")
    raise DataError(f"dataset folder {str(path)!r} is neither a save_to_disk folder nor holds "
                    f"{split}.jsonl/.json/.csv/.parquet for split {split!r}; {_WAY_OUT}.")


def _read_saved(path: Path, split: str, cfg: Config) -> tuple[datasets.Dataset, str]:
    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as exc:  # a damaged folder: one line, not the arrow traceback
        raise DataError(f"dataset folder {str(path)!r} could not be read by datasets.load_from_disk "
                        f"({type(exc).__name__}: {_first_line(exc)}).") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"dataset folder {str(path)!r} has no split {split!r}; splits: {', '.join(saved)}.")
        return saved[split], f"{path} [{split}]"
    return _read_single(path, split, cfg, lambda p: datasets.load_from_disk(str(p)))


def _read_single(path: Path, split: str, cfg: Config, read) -> tuple[datasets.Dataset, str]:
    """A single-split source serves the train split; other splits come from a sibling named after them."""
    if split == cfg.dataset_split:
        return read(path), str(path)
    candidates = split_siblings(path, cfg.dataset_split, split)
    for candidate in candidates:
        if candidate.exists():
            return read(candidate), str(candidate)
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"dataset {str(path)!r} is a single split (used for {cfg.dataset_split!r}); for split "
                    f"{split!r} none of these exist: {looked}; put the held-out rows there.")


def split_siblings(path: Path, train_split: str, split: str) -> list[Path]:
    """Where the `split` rows of a single-split source live: its name with the split's name swapped in.

    >>> [p.name for p in split_siblings(Path("d/data_train.jsonl"), "train", "test")]
    ['data_test.jsonl', 'data_train_test.jsonl']
    """
    stem, suffix = (path.stem, path.suffix) if path.suffix.lower() in FILE_SUFFIXES else (path.name, "")
    token = re.compile(rf"(?<![A-Za-z0-9]){re.escape(train_split)}(?![A-Za-z0-9])")
    names = []
    hits = list(token.finditer(stem))
    if hits:
        last = hits[-1]
        names.append(stem[: last.start()] + split + stem[last.end():] + suffix)
    names.append(f"{stem}_{split}{suffix}")
    return [path.with_name(n) for n in dict.fromkeys(names)]


def _read_file(path: Path) -> datasets.Dataset:
    """Read a .jsonl/.json/.csv/.parquet file fully into memory."""
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"dataset file {str(path)!r}: unsupported type {suffix or '(none)'}; use one of "
                        f"{', '.join(FILE_SUFFIXES)}.")
    if suffix == ".parquet":
        try:
            # Read with pyarrow directly: Dataset.from_parquet would also write an arrow copy to HF's cache.
            return datasets.Dataset(datasets.table.InMemoryTable(pyarrow.parquet.read_table(path)))
        except Exception as exc:
            raise DataError(f"dataset file {str(path)!r} is not readable parquet "
                            f"({type(exc).__name__}: {_first_line(exc)}).") from None
    # utf-8-sig drops a BOM; bad bytes become U+FFFD instead of a crash.
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    rows = _parse_csv(text) if suffix == ".csv" else _parse_json(text, path)
    if not rows:
        return datasets.Dataset.from_dict({})
    rows = _uniform_columns([{str(k): _clean_value(v) for k, v in row.items()} for row in rows])
    try:
        return datasets.Dataset.from_list(rows)
    except Exception:  # nested values of differing shapes (rubric items: strings beside objects): keep them as JSON
        pass
    try:
        return datasets.Dataset.from_list([{k: _nested_as_json(v) for k, v in row.items()} for row in rows])
    except Exception as exc:  # e.g. a column that mixes lists and objects
        raise DataError(f"dataset file {str(path)!r}: rows do not form a table "
                        f"({type(exc).__name__}: {_first_line(exc)}).") from None


def _nested_as_json(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value


def _parse_csv(text: str) -> list[dict]:
    # Every cell stays a string: no type guessing that turns "007" into 7 or a blank cell into NaN.
    reader = csv.DictReader(io.StringIO(text.replace("\0", ""), newline=""))
    return [{k: v for k, v in row.items() if k is not None} for row in reader]


def _parse_json(text: str, path: Path) -> list[dict]:
    """A JSON array of objects, {"key": [objects]}, columns {"col": [values]}, or JSON Lines."""
    try:
        data = json.loads(text, strict=False)  # strict=False: raw control characters in strings are fine
    except json.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data, values, strict=True)) for values in zip(*lists, strict=True)]
        else:
            data = [data]  # one JSON Lines row
    if isinstance(data, list):
        if not all(isinstance(r, dict) for r in data):
            raise DataError(f"dataset file {str(path)!r}: expected a list of objects with named fields.")
        return data
    rows = []
    # Rows end at "\n" only: str.splitlines() would also cut at "\r", "\x85" or "\u2028", which JSON allows raw
    # inside strings, and so split one valid row into two invalid ones.
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, strict=False)
        except json.JSONDecodeError as exc:
            raise DataError(f"dataset file {str(path)!r} line {number}: invalid JSON ({exc.msg}); "
                            f"fix or remove that line.") from None
        if not isinstance(row, dict):
            raise DataError(f"dataset file {str(path)!r} line {number}: expected an object, got "
                            f"{type(row).__name__}.")
        rows.append(row)
    return rows


def _clean_value(value: Any) -> Any:
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, list):
        return [_clean_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean_value(v) for k, v in value.items()}
    return value


def _uniform_columns(rows: list[dict]) -> list[dict]:
    """Give every row every column, and make a column that mixes types (3 and "3") all strings."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    for column in columns:
        kinds = {type(row.get(column)) for row in rows} - {type(None)}
        huge = int in kinds and any(isinstance(row.get(column), int) and abs(row[column]) >= 2**63 for row in rows)
        mixed = huge or (len(kinds) > 1 and not kinds <= {int, float})
        for row in rows:
            value = row.get(column)
            row[column] = _as_text(value) if mixed and value is not None else value
    return rows


def _read_hub(name: str, split: str, cfg: Config) -> datasets.Dataset:
    repo, _, config_name = name.partition(":")
    cache_dir = os.path.join(os.path.expanduser(cfg.cache_dir), "datasets")
    offline = bool(datasets.config.HF_HUB_OFFLINE)  # HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, read at import
    why = "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and not cached"
    if not offline and not _hub_reachable():
        # huggingface_hub retries an unreachable Hub for ~25 s with no public knob; the cache is all we can use.
        logger.warning("cannot reach %s; looking for dataset %s in the local cache only", _hub_endpoint(), name)
        offline, why = True, f"{_hub_endpoint()} unreachable and not cached"
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(repo, config_name or None, split=split, cache_dir=cache_dir)
    except Exception as exc:  # network, auth, missing split or config: one line, not a page of traceback
        logger.debug("load_dataset(%r, split=%r) failed", name, split, exc_info=True)
        hint = f" (did you mean {BUNDLED_PREFIX}{name}?)" if name in BUNDLED_DATASETS else ""
        raise DataError(f"Hub dataset {name!r}{hint} split {split!r}: {why if offline else 'not loadable'} "
                        f"({type(exc).__name__}: {_first_line(exc)}); {_WAY_OUT} (cache: {cache_dir}; a Hub "
                        f"config goes after a colon, e.g. openai/gsm8k:main).") from None


def _hub_endpoint() -> str:
    return huggingface_hub.constants.ENDPOINT


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A TCP connect to the Hub endpoint; True behind a proxy, where only the proxy can tell."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                       "all_proxy")):
        return True
    url = urlsplit(_hub_endpoint())
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_mode(on: bool):
    """Switch datasets and huggingface_hub to offline for one call (both read their switch at import)."""
    if not on:
        yield
        return
    modules = [m for m in (datasets.config, huggingface_hub.constants) if hasattr(m, "HF_HUB_OFFLINE")]
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for m, value in zip(modules, saved, strict=True):
            m.HF_HUB_OFFLINE = value


# ---- normalising ---------------------------------------------------------------------------------


def _normalize(raw: datasets.Dataset, cfg: Config, name: str, split: str, source: str) -> LoadedData:
    qcol, acol = cfg.dataset_question_column, cfg.dataset_answer_column
    total = len(raw)
    if total == 0:
        raise DataError(f"dataset {name!r} split {split!r} has no rows ({source}).")
    own_rubrics = _rubrics(raw, cfg, name, split)
    for column, key in ((qcol, "dataset_question_column"), (acol, "dataset_answer_column")):
        if column not in raw.column_names and not (column == acol and own_rubrics is not None):
            raise DataError(f"dataset {name!r} split {split!r} has no column {column!r} (set by {key}); "
                            f"available columns: {', '.join(raw.column_names)}.")
    questions = [_as_text(q) for q in raw[qcol]]
    answers = [_as_text(a) for a in raw[acol]] if acol in raw.column_names else [""] * total
    has_rubric = own_rubrics or [""] * total
    # A row needs a question, and something to grade against: a ground truth or its own rubric.
    keep = [i for i, (q, a, r) in enumerate(zip(questions, answers, has_rubric, strict=True))
            if q.strip() and (a.strip() or r)]
    skipped = total - len(keep)
    if not keep:
        raise DataError(f"dataset {name!r} split {split!r} has no usable rows ({total} rows, all with an empty "
                        f"question or answer); check dataset_question_column={qcol!r} and "
                        f"dataset_answer_column={acol!r}.")
    if skipped:
        logger.warning("dataset %s split %s: skipped %d of %d rows with an empty question or answer%s",
                       name, split, skipped, total, " (and no rubric)" if own_rubrics is not None else "")
    own = {qcol, acol, "question", "answer"} | ({cfg.dataset_rubric_column, "rubric"} if own_rubrics is not None else set())
    rest = raw.remove_columns([c for c in raw.column_names if c in own])
    if skipped:
        rest = rest.select(keep)
    columns = {"question": [questions[i] for i in keep], "answer": [answers[i] for i in keep]}
    if own_rubrics is not None:
        columns["rubric"] = [own_rubrics[i] for i in keep]
    if rest.num_columns == 0:  # nothing else to keep: a fresh in-memory table
        dataset = datasets.Dataset.from_dict(columns)
    else:
        dataset = rest.flatten_indices(keep_in_memory=True) if skipped else rest
        for column, values in columns.items():
            dataset = dataset.add_column(column, values)
        dataset = dataset.select_columns([*columns, *rest.column_names])
    return LoadedData(dataset, skipped, total, source, split)


def _rubrics(raw: datasets.Dataset, cfg: Config, name: str, split: str) -> list[str] | None:
    """Each row's own rubric as canonical JSON ("" for none), checked; None when the data has no rubric column."""
    column = cfg.dataset_rubric_column
    if column not in raw.column_names:
        if column != "rubric":
            raise DataError(f"dataset {name!r} split {split!r} has no column {column!r} (set by "
                            f"dataset_rubric_column); available columns: {', '.join(raw.column_names)}.")
        return None
    try:
        own = rubrics.column_items(raw[column], column, f"dataset {name!r} split {split!r}")
    except rubrics.RubricError as exc:
        raise DataError(f"{exc}.") from None
    limit = rubrics.context_chars(cfg)
    for i, items in enumerate(own):
        chars = sum(len(item.text) + len(item.id) + 30 for item in items)
        if limit and chars > limit:
            raise DataError(f"dataset {name!r} split {split!r} row {i + 1}, column {column!r}: the rubric has "
                            f"{chars} characters, too long for the teacher's context (about {limit} characters "
                            "left for it); shorten or split it, or use a teacher with a longer context.")
    return [rubrics.to_json(items) for items in own]


def _as_text(value: Any) -> str:
    """A cell as text: None/NaN -> "", 12.0 -> "12", other numbers via str, strings cleaned."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ""
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, str):
        return _clean_text(value)
    if isinstance(value, (list, dict)):
        return _clean_text(json.dumps(value, ensure_ascii=False))
    return _clean_text(str(value))


def _clean_text(text: str) -> str:
    # NUL bytes break tokenizers and C strings; lone surrogates (from JSON escapes) break arrow's UTF-8.
    return text.replace("\0", "").encode("utf-8", errors="replace").decode("utf-8")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else "no message")[:300]
