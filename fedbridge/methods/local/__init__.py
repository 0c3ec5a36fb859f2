"""Baseline ``local``."""
