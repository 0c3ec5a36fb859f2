"""Fault injection for benchmarks and fault-tolerance tests: a Flower client mod that slows or crashes chosen silos.

Configured in the run config (``faults.*``), so the same switch works in simulation and deployment:
  faults.slow-silos   partition ids (comma list) that reply ``slow-factor`` times later than they computed
  faults.slow-factor  5.0 = a silo that takes 5x its own compute time (it sleeps (factor-1) x compute)
  faults.crash-silos  partition ids that fail ``crash-message-types`` messages (an error reply, as a crashed app)
  faults.crash-fraction  also crash this fraction of the ``partition.num-silos`` silos, chosen at random
  faults.crash-message-types  comma list of Flower message types to fail ("" = all)
  faults.crash-probability  chance that a crashing silo fails one such message (1 = every one); the draw is per
                      (silo, message type, round), so crashes land at random points and a silo may come back later
  faults.crash-point  before: the request is lost (nothing computed); after: the silo computed (and spent any
                      privacy budget) and the reply is lost; random: either, drawn per message
  faults.crash-seed   seeds which silos crash (crash-fraction) and where
  faults.adversarial-silos  partition ids whose replies are poisoned after their handler ran: SLM weights times
                      ``adversarial-scale`` (FedAvg, CrossLM uploads), class probabilities inverted (CrossLM scores:
                      1 - p, renormalised), to measure which aggregators hold
  faults.adversarial-scale  the factor on a poisoned silo's weights (-10: flipped and amplified)

Draws are seeded strings, so every process (simulation workers, deployed SuperNodes) makes the same ones.
Nothing here is active by default; a run with faults gets a note in its record.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedbridge import protocol as p
from fedbridge.config import from_flat
from fedbridge.errors import ConfigError

CRASH_POINTS = ("before", "after", "random")


@dataclass(frozen=True)
class FaultConfig:
    slow_silos: str = field(default="", metadata={
        "help": "partition ids (comma list) that reply slow-factor times later than they computed"})
    slow_factor: float = field(default=5.0, metadata={
        "help": "5.0 = a slow silo takes 5x its own compute time (it sleeps (factor-1) x compute)"})
    crash_silos: str = field(default="", metadata={
        "help": "partition ids (comma list) that fail crash-message-types messages (an error reply, as a crashed "
                "app)"})
    crash_fraction: float = field(default=0.0, metadata={
        "help": "also crash this fraction of the partition.num-silos silos (rounded half up), drawn with crash-seed; "
                "in [0, 1]"})
    crash_message_types: str = field(default="", metadata={
        "help": "comma list of Flower message types a crashing silo fails (\"\" = all)"})
    crash_probability: float = field(default=1.0, metadata={
        "help": "chance that a crashing silo fails one such message (1 = every one), in [0, 1]; drawn per (silo, "
                "message type, round), so crashes land at random points and a silo may come back later"})
    crash_point: str = field(default="before", metadata={
        "help": "before: the request is lost (nothing computed) | after: the silo computed (and spent any privacy "
                "budget) and the reply is lost | random: either, drawn per message"})
    crash_seed: int = field(default=0, metadata={"help": "seeds which silos crash (crash-fraction) and where"})
    adversarial_silos: str = field(default="", metadata={
        "help": "partition ids (comma list) whose replies are poisoned after their handler ran: SLM weights times "
                "adversarial-scale (FedAvg, CrossLM uploads), class probabilities inverted (CrossLM scores)"})
    adversarial_scale: float = field(default=-10.0, metadata={
        "help": "the factor on a poisoned silo's weights (-10: flipped and amplified)"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.crash_fraction <= 1.0 or not 0.0 <= self.crash_probability <= 1.0:
            raise ConfigError("faults.crash-fraction and faults.crash-probability must lie in [0, 1].")
        if self.crash_point not in CRASH_POINTS:
            raise ConfigError(f"Unknown faults.crash-point '{self.crash_point}'. "
                              f"Use one of: {', '.join(CRASH_POINTS)}.")

    @staticmethod
    def _ids(text: str) -> set[int]:
        return {int(x) for x in text.replace(" ", "").split(",") if x}

    def is_slow(self, partition: int) -> bool:
        return partition in self._ids(self.slow_silos)

    def is_adversarial(self, partition: int) -> bool:
        return partition in self._ids(self.adversarial_silos)

    def crashing_silos(self, num_silos: int) -> set[int]:
        """``crash-silos`` plus ``crash-fraction`` of the ``num_silos`` (rounded half up), drawn with ``crash-seed``."""
        drawn = random.Random(f"{self.crash_seed}:silos").sample(range(num_silos),
                                                                  int(self.crash_fraction * num_silos + 0.5))
        return self._ids(self.crash_silos) | set(drawn)

    def crash_at(self, partition: int, num_silos: int, message_type: str, round_: str) -> str | None:
        """Where silo ``partition`` crashes on this message: 'before' or 'after' its handler, or None (no crash)."""
        types = {t for t in self.crash_message_types.replace(" ", "").split(",") if t}
        if partition not in self.crashing_silos(num_silos) or (types and message_type not in types):
            return None
        draw = random.Random(f"{self.crash_seed}:{partition}:{message_type}:{round_}")
        if draw.random() >= self.crash_probability:
            return None
        return draw.choice(("before", "after")) if self.crash_point == "random" else self.crash_point

    @property
    def active(self) -> bool:
        return bool(self.slow_silos or self.crash_silos or self.crash_fraction > 0 or self.adversarial_silos)

    def describe(self) -> str:
        crashing = " + ".join(([f"silos {self.crash_silos}"] if self.crash_silos else [])
                              + ([f"{self.crash_fraction:g} of the silos (seed {self.crash_seed})"]
                                 if self.crash_fraction else []))
        parts = ([f"silos {self.slow_silos} {self.slow_factor:g}x slower"] if self.slow_silos else []) + (
            [f"{crashing} crash on {self.crash_message_types or 'every message'}"
             + (f" with probability {self.crash_probability:g}" if self.crash_probability < 1 else "")
             + f", {self.crash_point} the handler"] if crashing else [])
        if self.adversarial_silos:
            parts.append(f"silos {self.adversarial_silos} adversarial (weights x {self.adversarial_scale:g}, "
                         "scores inverted)")
        return "faults injected: " + "; ".join(parts)


class InjectedFault(RuntimeError):
    """A crash asked for by ``faults.*``: the message gets an error reply, like a crashed ClientApp."""


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    method_options = {k: v for k, v in context.run_config.items() if k.startswith("faults.")}
    cfg = from_flat(FaultConfig, method_options, "faults")
    if not cfg.active or "partition-id" not in context.node_config or "data-path" in context.node_config:
        return call_next(msg, context)  # a deployed silo (its own data-path) takes no fault orders from a run
    partition, kind = int(context.node_config["partition-id"]), msg.metadata.message_type
    crash = cfg.crash_at(partition, int(context.run_config.get("partition.num-silos", 0)), kind, msg.metadata.group_id)
    if crash == "before":
        raise InjectedFault(f"silo-{partition}: injected crash on {kind} (round {msg.metadata.group_id})")
    t0 = time.perf_counter()
    reply = call_next(msg, context)
    if crash == "after":
        raise InjectedFault(f"silo-{partition}: injected crash after handling {kind} (round {msg.metadata.group_id}); "
                            "its reply is lost")
    if cfg.is_slow(partition):
        time.sleep((cfg.slow_factor - 1.0) * (time.perf_counter() - t0))
    if cfg.is_adversarial(partition) and not reply.has_error():
        poison(reply, cfg.adversarial_scale)
    return reply


def poison(reply: Message, scale: float) -> None:
    """An adversarial silo's reply: its weights times ``scale``, its class probabilities inverted (1 - p,
    renormalised), everything else as it was."""
    content = reply.content
    if isinstance(content.get(p.ARRAYS), ArrayRecord):
        content[p.ARRAYS] = ArrayRecord({k: Array((v.numpy() * scale).astype(v.dtype))
                                         for k, v in content[p.ARRAYS].items()})
    if p.SCORES in content:
        record = content[p.SCORES]
        probs = 1.0 - np.asarray(record["probs"], dtype=float).reshape(-1, int(record["num-labels"]))
        content[p.SCORES] = p.probabilities_record(probs / probs.sum(axis=1, keepdims=True).clip(1e-12))
