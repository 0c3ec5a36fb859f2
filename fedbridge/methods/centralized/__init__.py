"""Baseline ``centralized``."""
