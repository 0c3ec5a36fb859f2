"""Private Evolution: the federation's DP votes choose and label the LLM's candidates, which the LLM then varies."""
