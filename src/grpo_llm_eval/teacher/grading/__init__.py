"""Grading: the rubric (prompt rendering, items, output formats), parsing of grades, group prompts, and the
turning of a teacher completion into Judgements."""
