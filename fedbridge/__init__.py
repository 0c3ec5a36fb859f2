"""fedbridge: cross-silo knowledge transfer between a server LLM and silo SLMs, built on Flower."""

__version__ = "0.1.0"
