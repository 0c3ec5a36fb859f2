"""The server's side of the silos' DP nearest-neighbour votes (``query.dp_vote``; the mechanism is
``fedbridge.privacy.dp_votes``): ask every silo, sum the noisy histograms, read labels and margins from the sum. All of
it is post-processing of the silos' DP releases, so it costs no further privacy. Private Evolution labels and keeps its
candidates this way; FDKT relabels its augmented examples this way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedbridge import protocol as p
from fedbridge.methods.base import Session
from fedbridge.tasks import Examples


@dataclass(frozen=True)
class VoteRequest:
    """What one vote asks of every silo (the silo calibrates σ from these and its own δ)."""

    epsilon: float  # the run's ε on each silo for all ``releases`` together
    releases: int  # how many votes the run plans (σ is calibrated so that all of them together spend ``epsilon``)
    k: int  # nearest candidates each private record votes for
    noise_seed: int = -1


def collect_votes(session: Session, candidates: Examples, request: VoteRequest,
                  round_: int) -> tuple[np.ndarray, float]:
    """Every silo's DP vote histogram of ``candidates``, summed; and the summed noise's standard deviation. Each
    silo's privacy entry in the record becomes what the run has released on it so far (``compose_privacy``)."""
    num_labels = len(session.task.labels)
    content = p.request({"epsilon": request.epsilon, "releases": request.releases, "k": request.k,
                         "noise-seed": request.noise_seed}, examples=p.examples_record(candidates))

    def parse(reply):
        return p.read_histogram(reply, len(candidates), num_labels), p.read_privacy(reply)

    total, variance, replied = np.zeros((len(candidates), num_labels)), 0.0, 0
    record = session.record
    record.privacy = record.privacy or {}
    for node, (histogram, privacy) in session.iter_replies(p.DP_VOTE, {n: content for n in session.silos}, round_,
                                                           parse=parse):
        total, variance, replied = total + histogram, variance + privacy["noise-multiplier"] ** 2, replied + 1
        silo = session.silo_name(node)
        record.privacy[silo] = compose_privacy(record.privacy.get(silo), privacy)
        session.event(node, "processed", p.DP_VOTE, round_)
    if not replied:
        raise session.no_silo_completed(f"the DP vote of round {round_}")
    return total, math.sqrt(variance)


def compose_privacy(before: dict | None, privacy: dict) -> dict:
    """A silo's privacy entry after a DP vote: the run's total for its votes (``epsilon-total``), plus what an earlier
    release of another mechanism cost (FDKT's or the pipeline's DP demonstrations), summed: basic composition, a valid
    upper bound at the summed δ."""
    entry = {**privacy, "epsilon": privacy["epsilon-total"]}
    other = (before or {}).get("other")
    if other is None and before and before["mechanism"] != privacy["mechanism"]:
        other = {**before, "epsilon": before.get("epsilon-total", before["epsilon"]),
                 "private": before.get("private", True)}  # the earlier release's whole entry (its steps, σ, budget)
    if other:
        entry |= {"other": other, "epsilon": entry["epsilon"] + other["epsilon"],
                  "delta": privacy["delta"] + other["delta"], "private": privacy["private"] and other["private"],
                  "mechanism": f"{other['mechanism']} + {privacy['mechanism']} (basic composition)"}
    return entry


@dataclass(frozen=True)
class Tally:
    """The federation's summed DP votes on one population, read as labels and scores."""

    labels: np.ndarray  # (candidates,) the voted label
    margins: np.ndarray  # (candidates,) votes for that label minus the runner-up's: how clearly it is that label
    kept: np.ndarray  # (candidates,) bool: the margin clears the noise


def tally(histogram: np.ndarray, noise_std: float, balance: bool, threshold: float) -> Tally:
    """Labels and margins from the summed histogram (pure post-processing of the DP releases). ``balance`` rescales
    each label's column to the mean column total first, so a label most silos hold many records of does not win every
    candidate. A candidate is kept if its margin reaches ``threshold`` standard deviations of the difference of two
    noisy cells (√2 x the summed noise's std)."""
    if balance and len(histogram):
        totals = np.maximum(histogram.sum(axis=0, keepdims=True), 1.0)
        histogram = histogram / totals * totals.mean()
    if histogram.shape[1] < 2:
        return Tally(np.zeros(len(histogram), dtype=int), histogram[:, 0] if len(histogram) else np.zeros(0),
                     np.ones(len(histogram), dtype=bool))
    ordered = np.sort(histogram, axis=1)
    margins = ordered[:, -1] - ordered[:, -2]
    return Tally(histogram.argmax(axis=1), margins, margins >= max(threshold * math.sqrt(2) * noise_std, 1e-9))


def best_per_label(labels: np.ndarray, votes: np.ndarray, eligible: np.ndarray, num_labels: int,
                   n: int) -> list[int]:
    """Indices of the ``n`` eligible candidates of each label with the highest ``votes`` (margins)."""
    chosen = []
    for y in range(num_labels):
        mine = np.flatnonzero(eligible & (labels == y))
        chosen += mine[np.argsort(-votes[mine], kind="stable")][:n].tolist()
    return chosen
