"""CrossLM: silo SLMs score LLM generations; the LLM learns from the reward; SLMs learn from the kept data."""
