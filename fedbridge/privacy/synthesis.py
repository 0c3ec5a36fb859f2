"""What the DP synthesis mechanisms share: their result type and the source of their secret randomness."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from fedbridge.privacy.accounting import PrivacyEvent


@dataclass
class SynthesisResult:
    """Synthetic ``(text, label_id)`` pairs (DP post-processing of the charged events) and their cost.

    ``epsilon`` is this release alone at ``delta``; ``epsilon_total`` is the silo ledger after it.
    ``steps`` counts the Gaussian compositions charged (optimizer steps, or noisy token queries).
    ``tokens`` holds only counts derived from the released output and the config, so they may leave the silo.
    ``local`` holds diagnostics computed from the private data outside the DP guarantee (tokens trained on
    or read from private prompts, training loss): silo-local logs only, never to be sent.
    """

    examples: list[tuple[str, int]]
    mechanism: str
    epsilon: float
    epsilon_total: float
    delta: float
    steps: int
    noise_multiplier: float
    events: tuple[PrivacyEvent, ...]
    seconds: dict[str, float]
    tokens: dict[str, int]
    local: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Everything that may leave the silo except the texts, for the run record."""
        out = asdict(replace(self, examples=[], local={}))
        del out["local"]
        return {**out, "examples": len(self.examples)}


def privacy_generator(noise_seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """An RNG for a mechanism's secret randomness (Poisson subsampling, noise, group assignment).

    The DP guarantee holds only if these draws are unpredictable to the adversary, so by default they come
    from OS entropy, never from the run seed (which sits in the public run config). An explicit ``noise_seed``
    makes runs reproducible (tests, debugging) at the price of that seed having to stay secret.
    """
    seed = int.from_bytes(os.urandom(8), "little") if noise_seed is None else noise_seed
    return torch.Generator(device=device).manual_seed(seed)
