"""Fault injection for benchmarks and fault-tolerance tests: a Flower client mod that slows or crashes chosen silos.

Configured in the run config (``faults.*``), so the same switch works in simulation and deployment:
  faults.slow-silos   partition ids (comma list) that reply ``slow-factor`` times later than they computed
  faults.slow-factor  5.0 = a silo that takes 5x its own compute time (it sleeps (factor-1) x compute)
  faults.crash-silos  partition ids that fail ``crash-message-types`` messages (an error reply, as a crashed app)
  faults.crash-message-types  comma list of Flower message types to fail ("" = all)

Nothing here is active by default; a run with faults gets a note in its record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedbridge.config import from_flat


@dataclass(frozen=True)
class FaultConfig:
    slow_silos: str = ""
    slow_factor: float = 5.0
    crash_silos: str = ""
    crash_message_types: str = ""

    @staticmethod
    def _ids(text: str) -> set[int]:
        return {int(x) for x in text.replace(" ", "").split(",") if x}

    def is_slow(self, partition: int) -> bool:
        return partition in self._ids(self.slow_silos)

    def crashes(self, partition: int, message_type: str) -> bool:
        types = {t for t in self.crash_message_types.replace(" ", "").split(",") if t}
        return partition in self._ids(self.crash_silos) and (not types or message_type in types)

    @property
    def active(self) -> bool:
        return bool(self.slow_silos or self.crash_silos)

    def describe(self) -> str:
        parts = ([f"silos {self.slow_silos} {self.slow_factor:g}x slower"] if self.slow_silos else []) + (
            [f"silos {self.crash_silos} crash on {self.crash_message_types or 'every message'}"]
            if self.crash_silos else [])
        return "faults injected: " + "; ".join(parts)


class InjectedFault(RuntimeError):
    """A crash asked for by ``faults.crash-silos``: the message gets an error reply, like a crashed ClientApp."""


def fault_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    method_options = {k: v for k, v in context.run_config.items() if k.startswith("faults.")}
    cfg = from_flat(FaultConfig, method_options, "faults")
    if not cfg.active or "partition-id" not in context.node_config:
        return call_next(msg, context)
    partition = int(context.node_config["partition-id"])
    if cfg.crashes(partition, msg.metadata.message_type):
        raise InjectedFault(f"silo-{partition}: injected crash on {msg.metadata.message_type}")
    t0 = time.perf_counter()
    reply = call_next(msg, context)
    if cfg.is_slow(partition):
        time.sleep((cfg.slow_factor - 1.0) * (time.perf_counter() - t0))
    return reply
