"""Resuming a run after the ServerApp restarts, and silo state that outlives any one run.

Server side, ``Checkpoint``: a run's resumable state, in a directory beside its record
(``<results-dir>/<run-name>.checkpoint/``). A method splits its work into named *steps* ("demonstrations/silo-0",
"round-2"). It writes a step's data first (``save_examples``, ``save_arrays``, ``save_adapter``), then calls
``complete(step)``, which atomically replaces ``state.json``: the completed steps, the run record as of that
moment, and the experiment id. A crash at any point leaves the last complete state. A run with ``resume=true`` and
the same run-name restores that record, and its method asks ``done(step)`` and skips what is done. A successful
run removes its checkpoint (the record is the result); a failed one keeps it.

Silo side, ``DEFAULT_SILO_STATE_DIR``: where a silo keeps what outlives a run (its lifetime privacy ledger,
``fedbridge.privacy.policy``; CrossLM's latest SLM). A restarted server is a new Flower run with fresh Flower node
state; these files are what make it unable to spend a silo's budget twice.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from flwr.app import ArrayRecord

from fedbridge.config import ExperimentConfig, current_keys
from fedbridge.errors import ConfigError
from fedbridge.results import RunRecord, contributions_path
from fedbridge.tasks import Examples

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
# run-config keys a resumed run may change: where and how patiently it runs, and injected faults; not what it computes
RESUMABLE_CHANGES = ("resume", "run-name", "results-dir", "timeout")
# the record fields a step's snapshot carries (the rest describe the attempt: status, versions, start time, ...)
RESTORED_FIELDS = ("global_metrics", "silo_metrics", "server_metrics", "communication", "tokens", "seconds",
                   "privacy", "failures", "timelines", "artifacts", "notes")
# node config 'state-dir' overrides it per silo
DEFAULT_SILO_STATE_DIR = Path(os.environ.get("FEDBRIDGE_SILO_STATE_DIR") or Path(
    os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedbridge" / "silo-state")
_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a restart after a crash) sees the old file or the new one,
    never a mix: a synced temporary file beside it, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a power cut
    finally:
        os.close(directory)


def save_tensors(path: Path, arrays: ArrayRecord | Mapping[str, torch.Tensor]) -> None:
    """A state dict (or Flower ArrayRecord) as a safetensors file, written atomically; tied weights are stored
    once per name."""
    tensors = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else arrays
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, safetensors.torch.save(tensors))


def checkpoint_dir(results_dir: str | Path, run_name: str) -> Path:
    return Path(results_dir) / f"{run_name}.checkpoint"


def _check_name(name: str) -> str:
    if not all(_NAME_PART.fullmatch(part) for part in name.split("/")):
        raise ValueError(f"checkpoint name {name!r}: use letters, digits, '_', '.', '-' and '/' between parts")
    return name


def _fingerprint(cfg: ExperimentConfig) -> dict[str, Any]:
    """The run config that decides what a run computes, as JSON gives it back."""
    flat = {k: v for k, v in cfg.to_run_config().items()
            if k not in RESUMABLE_CHANGES and not k.startswith("faults.")}
    return json.loads(json.dumps(flat))


def _json_item(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy scalars in metrics
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


class Checkpoint:
    """The resumable state of one run (see the module docstring). Methods use ``done``/``steps``/``complete`` and
    the ``save_*``/``load_*`` pairs; ``experiment`` is the id silos key their persistent state on."""

    def __init__(self, directory: Path, record: RunRecord, config: dict[str, Any], experiment: str,
                 steps: Mapping[str, dict] | None = None, elapsed: float = 0.0, attempt: int = 1) -> None:
        self.directory, self.record, self.config, self.experiment = Path(directory), record, config, experiment
        self.attempt, self.prior_elapsed = attempt, elapsed  # session seconds the earlier attempts' steps took
        self._steps: dict[str, dict] = dict(steps or {})
        self._t0 = time.monotonic()

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, record: RunRecord) -> Checkpoint:
        """The run's checkpoint. With ``cfg.resume``: the earlier attempt's, whose record is restored into
        ``record``, or a new one if there is none. Otherwise a new one, replacing any earlier attempt's."""
        directory = checkpoint_dir(cfg.results_dir, record.run_name)
        config = _fingerprint(cfg)
        if cfg.resume:
            if not cfg.run_name:
                raise ConfigError("resume=true needs the run-name of the run to resume (--set run-name=<name>).")
            state = _read_state(directory)
            if state is not None:
                _check_same_config(state["config"], config, directory)
                ckpt = cls(directory, record, config, state["experiment"], state["steps"], state["elapsed"],
                           state["attempt"] + 1)
                ckpt._restore(state["record"])
                return ckpt
            record.notes.append(f"resume: no checkpoint at {directory}; started from the beginning")
        elif directory.exists():
            log.warning("Discarding the checkpoint of an earlier attempt at %s (resume=false)", directory)
            record.notes.append("the checkpoint of an earlier attempt was discarded (resume=false)")
        shutil.rmtree(directory, ignore_errors=True)
        contributions_path(cfg.results_dir, record.run_name).unlink(missing_ok=True)  # a fresh run's wire, not two
        ckpt = cls(directory, record, config, uuid.uuid4().hex)
        ckpt._write_state()  # the experiment id is on disk before any silo spends budget under it
        return ckpt

    # ------------------------------------------------------------ steps

    @property
    def elapsed(self) -> float:
        return self.prior_elapsed + time.monotonic() - self._t0

    def done(self, step: str) -> dict | None:
        """The state ``step`` was completed with, or None if it is not done."""
        return self._steps.get(step)

    def steps(self, prefix: str = "") -> dict[str, dict]:
        """Completed steps whose names start with ``prefix``, in completion order."""
        return {k: v for k, v in self._steps.items() if k.startswith(prefix)}

    def complete(self, step: str, **state: Any) -> None:
        """Mark ``step`` done with its small JSON ``state``, and snapshot the run record. Write the step's data
        (``save_*``) before: a crash between the two redoes the step, never skips it."""
        self._steps[_check_name(step)] = state
        self._write_state()

    def _write_state(self) -> None:
        state = {"version": STATE_VERSION, "experiment": self.experiment, "attempt": self.attempt,
                 "elapsed": self.elapsed, "config": self.config, "steps": self._steps,
                 "record": {name: getattr(self.record, name) for name in RESTORED_FIELDS}}
        atomic_write(self.directory / STATE_FILE, json.dumps(state, default=_json_item))

    def _restore(self, snapshot: Mapping[str, Any]) -> None:
        new_notes = [n for n in self.record.notes if n not in snapshot["notes"]]
        for name in RESTORED_FIELDS:
            setattr(self.record, name, snapshot[name])
        self.record.notes += new_notes + [f"resumed from {self.directory} (attempt {self.attempt}): "
                                          f"{len(self._steps)} completed steps kept"]

    # ------------------------------------------------------------ data

    def _path(self, name: str, suffix: str) -> Path:
        return self.directory / f"{_check_name(name)}{suffix}"

    def save_examples(self, name: str, examples: Examples) -> None:
        atomic_write(self._path(name, ".examples.json"),
                     json.dumps({"texts": list(examples.texts), "labels": list(examples.labels)}, ensure_ascii=False))

    def load_examples(self, name: str) -> Examples | None:
        path = self._path(name, ".examples.json")
        if not path.exists():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return Examples.of(data["texts"], data["labels"])

    def save_arrays(self, name: str, arrays: ArrayRecord | Mapping[str, torch.Tensor]) -> None:
        save_tensors(self._path(name, ".safetensors"), arrays)

    def load_arrays(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self._path(name, ".safetensors")
        return safetensors.torch.load_file(path) if path.exists() else None

    def save_adapter(self, name: str, model: torch.nn.Module) -> None:
        """The adapter weights of a peft model (e.g. a LoRA-tuned LLM), not its frozen base."""
        from peft import get_peft_model_state_dict

        self.save_arrays(name, get_peft_model_state_dict(model))

    def load_adapter(self, name: str, model: torch.nn.Module) -> bool:
        """Load saved adapter weights into a peft model built the same way; False if there are none."""
        from peft import set_peft_model_state_dict

        state = self.load_arrays(name)
        if state is None:
            return False
        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise ConfigError(f"Checkpointed adapter '{name}' does not fit this model: unexpected "
                              f"{sorted(result.unexpected_keys)[:3]}. Resume with the same LoRA settings.")
        return True

    def save_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer's state (e.g. AdamW's moments), so a resumed run takes the same next step."""
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        atomic_write(self._path(name, ".optim.pt"), buffer.getvalue())

    def load_optimizer(self, name: str, optimizer: torch.optim.Optimizer) -> bool:
        path = self._path(name, ".optim.pt")
        if not path.exists():
            return False
        optimizer.load_state_dict(torch.load(path, weights_only=True))
        return True

    def delete(self, name: str) -> None:
        """Drop data saved under ``name`` (e.g. the previous round's weights once the next round is complete)."""
        for suffix in (".examples.json", ".safetensors", ".optim.pt"):
            self._path(name, suffix).unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the whole checkpoint: the run finished and its record holds the results."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _read_state(directory: Path) -> dict[str, Any] | None:
    path = directory / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"Checkpoint {path} is unreadable ({err}). Delete {directory} to start over.") from err
    if state.get("version") != STATE_VERSION:
        raise ConfigError(f"Checkpoint {path} has version {state.get('version')!r}, this fedbridge reads "
                          f"{STATE_VERSION}. Resume with the fedbridge that wrote it, or delete {directory}.")
    return state


def _check_same_config(saved: Mapping[str, Any], now: Mapping[str, Any], directory: Path) -> None:
    """Refuse a resume that would compute something else. A key the checkpoint lacks was added to fedbridge after
    it was written, and new keys default to the old behaviour: at its default it changes nothing."""
    defaults, saved = _fingerprint(ExperimentConfig()), current_keys(saved)
    missing = object()

    def before(key: str) -> Any:
        return saved[key] if key in saved else defaults.get(key, missing)

    changed = sorted(k for k in saved.keys() | now.keys() if before(k) != now.get(k, missing))
    if changed:
        diff = ", ".join(f"{k}: {saved.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in changed[:5])
        raise ConfigError(f"resume=true, but this run config differs from the checkpointed run's ({directory}): "
                          f"{diff}. Resume with the same config, or start a new run (resume=false or another "
                          "run-name).")
