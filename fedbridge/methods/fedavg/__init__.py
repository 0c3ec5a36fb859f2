"""Baseline ``fedavg``: weight sharing with any of Flower's strategies."""
