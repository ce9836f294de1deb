"""Evaluation: `evaluate`, `judge` on a file, calibration and monitors of the judge, statistics, the HTML report."""
