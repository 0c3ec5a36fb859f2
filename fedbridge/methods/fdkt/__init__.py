"""FDKT (Li et al. 2024): DP synthetic demonstrations from silos, LLM augmentation on the server."""
