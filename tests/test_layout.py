"""The package's layout shows its architecture: stage folders, and no import cycle between them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "grpo_llm_eval"


def imported_after(modules: list[str]) -> set[str]:
    """The grpo_llm_eval modules a fresh interpreter holds after importing MODULES."""
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print('\\n'.join(m for m in sys.modules if m.startswith('grpo_llm_eval')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return {m for m in out.split() if "." in m}


class TestLayout:
    def test_the_teacher_imports_nothing_from_config_training_or_evaluation(self):
        """Before: config.py imported the teacher's backend registry and teacher/grading/rubric.py imported config.py's
        seed prompt, a cycle. The teacher is the lower layer: config, training and evaluation use it."""
        teacher = sorted("grpo_llm_eval." + ".".join(p.relative_to(PKG).with_suffix("").parts)
                         for p in (PKG / "teacher").rglob("*.py") if p.stem not in ("__init__", "__main__"))
        assert "grpo_llm_eval.teacher.backends.openai_backend" in teacher and "grpo_llm_eval.teacher.grading.rubric" in teacher
        loaded = imported_after(teacher)
        assert not {m for m in loaded if m.split(".")[1] in ("config", "training", "evaluation", "data")}, loaded

    def test_the_teacher_shows_its_two_halves(self):
        """Backends (transport, processes) in teacher/backends/, the rubric and its parsing in teacher/grading/; the
        wrappers and the spend stay beside them. Grading never imports a backend."""
        top = {p.stem for p in (PKG / "teacher").glob("*.py")}
        assert not top & {"openai_backend", "local_backend", "llamacpp", "probe", "rubric", "parse", "group_prompt"}, top
        grading = sorted(f"grpo_llm_eval.teacher.grading.{p.stem}" for p in (PKG / "teacher" / "grading").glob("*.py"))
        assert not {m for m in imported_after(grading) if m.startswith("grpo_llm_eval.teacher.backends")}

    def test_config_does_not_import_training_or_evaluation(self):
        loaded = imported_after(["grpo_llm_eval.config", "grpo_llm_eval.config.load", "grpo_llm_eval.config.doc"])
        assert not {m for m in loaded if m.split(".")[1] in ("training", "evaluation")}, loaded

    def test_the_top_level_holds_the_entry_point_and_the_shared_pieces_only(self):
        top = sorted(p.stem for p in PKG.glob("*.py"))
        assert top == ["__init__", "cli", "models", "rewards", "verifiers", "verify_worker"], top
        assert {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"} == {
            "assets", "config", "data", "evaluation", "teacher", "testing", "training"}
