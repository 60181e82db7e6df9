"""Insight: evaluation, the HTML reports and calibration plots."""
