"""The run record: one JSON file per run, the unit that ``fedbridge compare`` aggregates.

Schema (version 1); every field is always present so that records compare side by side:
  schema, run_name, method, seed, status ("ok" | "failed"), error
  config          the flat run config that ran
  versions        fedbridge, flwr, torch, transformers, peft, opacus, python
  started_at      ISO time;  wall_seconds
  global_metrics  on the server's global test set: accuracy, macro_f1, n (methods with one model per silo
                  report the mean over silos, and also silo_test_accuracy / silo_test_macro_f1 means)
  silo_metrics    {silo-k: {"silo-test.accuracy": ..., "global-test.accuracy": ..., ...}}
  server_metrics  what the server measured about its own work (e.g. FedAvg round losses, FDKT filter counts)
  communication   bytes_sent, bytes_received, by_round {round: {sent, received}}, by_message_type
  tokens          prompt / generated tokens of the server LLM; silo-generated: tokens silos generated (FDKT)
  seconds         wall seconds by phase
  privacy         null for methods that share no private-data-derived content; else
                  {silo-k: {epsilon, delta, mechanism, ...}} ("epsilon": "inf" marks non-private)
  failures        [{silo, message_type, round, reason}] silos that errored or timed out
  timelines       {silo-k: [{event: sent|received|failed|processed, message_type, round, t}]} with t in
                  seconds since the run started: when each silo's messages left, came back and were used
  artifacts       {name: path} files the run wrote beside its record (e.g. what crossed the wire, for audit)
  notes           caveats a reader must see (e.g. "centralized: non-private upper bound")
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("fedbridge", "flwr", "torch", "transformers", "peft", "opacus", "datasets"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass
class RunRecord:
    run_name: str
    method: str
    seed: int
    config: dict[str, Any]
    schema: int = SCHEMA_VERSION
    status: str = "running"
    error: str | None = None
    versions: dict[str, str] = field(default_factory=package_versions)
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    wall_seconds: float = 0.0
    global_metrics: dict[str, float] = field(default_factory=dict)
    silo_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    server_metrics: dict[str, float] = field(default_factory=dict)
    communication: dict[str, Any] = field(default_factory=lambda: {
        "bytes_sent": 0, "bytes_received": 0, "by_round": {}, "by_message_type": {}})
    tokens: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "generated": 0})
    seconds: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, dict[str, Any]] | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    timelines: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def path(self, results_dir: str | Path) -> Path:
        return Path(results_dir) / f"{self.run_name}.json"

    def write(self, results_dir: str | Path) -> Path:
        """Atomic write: a reader never sees half a record, and a crash never leaves one."""
        path = self.path(results_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1, default=_json_default, allow_nan=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        data = json.loads(Path(path).read_text())
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"{path}: run record schema {data.get('schema')} is not {SCHEMA_VERSION}")
        return cls(**data)


def contributions_path(results_dir: str | Path, run_name: str) -> Path:
    """Where a run keeps what silos sent (one JSON line each), beside its record; ``fedbridge audit`` reads it."""
    return Path(results_dir) / f"{run_name}.contributions.jsonl"


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
