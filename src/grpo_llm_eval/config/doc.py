"""The README's configuration table, generated from the config dataclasses' help metadata.

`python -m grpo_llm_eval.config.doc README.md` rewrites the table between its markers; a test fails when the
README drifts from the dataclasses.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from grpo_llm_eval.config import Config, LoraSection

START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return "(section)"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return "`" + text.replace("|", "\\|").replace("\n", "\\n") + "`"


def _rows(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        kind = getattr(hint, "__name__", str(hint).replace("typing.", "")).replace(" | ", " or ")  # a | ends the cell
        meta = f.metadata
        help_text = meta.get("help", "")
        if "choices" in meta:
            help_text += " One of: " + ", ".join(f"`{c}`" for c in meta["choices"]) + "."
        rows.append(f"| `{prefix}{f.name}` | {help_text.replace('|', '/')} | {kind} | {_default(f)} |")
    return rows


def config_table() -> str:
    """Markdown table: key, meaning, type, default (top-level keys, then the lora section)."""
    lines = ["| key | meaning | type | default |", "| --- | --- | --- | --- |"]
    lines += _rows(Config)
    lines += _rows(LoraSection, "lora.")
    return "\n".join(lines)


def render_into(text: str) -> str:
    """TEXT with the block between the markers replaced by the current table."""
    head, sep, rest = text.partition(START)
    if not sep or END not in rest:
        raise ValueError(f"the README has no {START} ... {END} block")
    return head + START + "\n" + config_table() + "\n" + END + rest.split(END, 1)[1]


if __name__ == "__main__":
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    path.write_text(render_into(path.read_text(encoding="utf-8")), encoding="utf-8")
