"""Evaluation reports: per-group detail, bootstrap intervals, controllability."""
