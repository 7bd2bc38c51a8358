"""Helpers for tests that need real process groups (see multirank.py)."""

from megatron_amopo.testing.multirank import MultiRankError, run_multirank

__all__ = ["MultiRankError", "run_multirank"]
