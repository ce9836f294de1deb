"""Test helpers that ship with the package: a fault-injecting OpenAI-compatible teacher server.

They live in the package (not under tests/) because benchmarks and demos use them too.
"""

from grpo_llm_eval.testing.teacher_server import ALL_FAULTS, EXTRA_FAULTS, FAULT_KINDS, TeacherServer

__all__ = ["ALL_FAULTS", "EXTRA_FAULTS", "FAULT_KINDS", "TeacherServer"]
