"""DP nearest-neighbour votes: a silo's private judgement of server-written candidates, released as one noisy
histogram per batch (Private Evolution: Aug-PE, Xie et al. ICML 2024; PrE-Text, Hou et al. ICML 2024).

Every private record ``(x, y)`` votes for the ``k`` candidates nearest to it (cosine similarity of the silo SLM
encoder's features) with weight ``1/√k`` each, in row ``y`` of a (candidates x labels) histogram. So

  * the histogram says both *which* candidates look like the silo's data and *which label* they look like: the
    server labels a candidate by its votes, never by the label it asked the LLM to write;
  * one record's contribution is a vector with ``k`` entries of ``1/√k``: L2 norm exactly 1. Adding or removing
    one record moves the histogram by at most 1 in L2 (the sensitivity, ``SENSITIVITY``), whatever the other
    records, the candidates or ``k``; replacing one moves it by at most √2 (remove + add).

The release adds N(0, σ²) to every cell: a Gaussian mechanism of sensitivity 1, no subsampling (q = 1), charged to
the silo's ledger *before* the data is read, as ``PrivacyEvent(σ, 1, 1)``. σ is calibrated on the silo from
public quantities only: the ε the run asks of it, the number of vote releases the run plans, and the silo's δ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedbridge.errors import ConfigError
from fedbridge.privacy.accounting import PrivacyEvent, PrivacyLedger, calibrate_noise, compute_epsilon
from fedbridge.privacy.synthesis import privacy_generator

MECHANISM = "dp-nn-votes"
SENSITIVITY = 1.0  # L2, add/remove one record (see the module docstring)


def vote_histogram(private: np.ndarray, labels: Sequence[int], candidates: np.ndarray, num_labels: int,
                   k: int) -> np.ndarray:
    """The noiseless histogram, shape (candidates, labels): each private row (a feature vector, any norm) with
    label ``labels[i]`` gives ``1/√k`` to each of its ``k`` nearest candidates by cosine similarity (``k`` is cut to
    the number of candidates, so every record's vector keeps L2 norm 1)."""
    hist = np.zeros((len(candidates), num_labels))
    k = min(int(k), len(candidates))
    if k < 1 or len(private) == 0:
        return hist
    sims = _unit(private) @ _unit(candidates).T
    nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    np.add.at(hist, (nearest, np.asarray(labels)[:, None]), 1.0 / math.sqrt(k))
    return hist


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def vote_event(sigma: float, releases: int = 1) -> PrivacyEvent:
    """``releases`` vote histograms at noise multiplier σ (noise std / sensitivity), no subsampling."""
    return PrivacyEvent(sigma, 1.0, releases, MECHANISM)


def sigma_for_votes(epsilon: float, delta: float, releases: int) -> float:
    """The σ at which ``releases`` vote histograms compose to ``epsilon`` at ``delta`` (0 for ε = ∞)."""
    if releases < 1:
        raise ConfigError(f"A DP vote needs at least one planned release, got {releases}.")
    return calibrate_noise(epsilon, delta, lambda sigma: [vote_event(sigma, releases)])


@dataclass
class VoteRelease:
    """One released histogram and what it cost (the fields ``Silo.dp_release`` reports)."""

    histogram: np.ndarray  # (candidates, labels), noisy
    mechanism: str
    epsilon: float  # this release alone
    noise_multiplier: float
    steps: int


def dp_vote(private: np.ndarray, labels: Sequence[int], candidates: np.ndarray, num_labels: int, k: int,
            epsilon: float, releases: int, ledger: PrivacyLedger, noise_seed: int | None = None) -> VoteRelease:
    """One DP release of the vote histogram: σ for ``releases`` releases at the run's ``epsilon``, charged to
    ``ledger`` before any private feature is read (a refused charge releases nothing), then noise from the secret
    generator (``noise_seed=None``: OS entropy)."""
    sigma = sigma_for_votes(epsilon, ledger.delta, releases)
    event = vote_event(sigma)
    ledger.charge(event)
    hist = vote_histogram(private, labels, candidates, num_labels, k)
    if sigma > 0:
        rng = privacy_generator(noise_seed)
        hist = hist + sigma * SENSITIVITY * torch.randn(hist.shape, generator=rng, dtype=torch.float64).numpy()
    return VoteRelease(hist, MECHANISM, compute_epsilon([event], ledger.delta), sigma, 1)



def vote_shares(histogram: np.ndarray) -> np.ndarray:
    """Each candidate's votes as a distribution over labels (post-processing): the positive part of its noisy row,
    normalised; uniform where no label has a positive count. CrossLM reads them as S(y|x)."""
    positive = np.clip(np.asarray(histogram, dtype=float), 0.0, None)
    totals = positive.sum(axis=1, keepdims=True)
    uniform = np.full_like(positive, 1.0 / max(positive.shape[1], 1))
    return np.where(totals > 0, positive / np.where(totals > 0, totals, 1.0), uniform)
