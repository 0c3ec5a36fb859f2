"""Baseline ``llm-zero-shot``."""
