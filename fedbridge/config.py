"""Typed experiment configuration, and its mapping to Flower's flat run config.

Flower run config is flat (``task.name``, ``slm.epochs``); here it becomes small frozen dataclasses.
Each dataclass field ``foo_bar`` in section ``sec`` is the run-config key ``sec.foo-bar``. Method sections
(``fdkt.*``, ``crosslm.*`` ...) are parsed by the method's own dataclass with the same rule.
The defaults below are the single source of truth; ``pyproject.toml`` repeats them because Flower only
accepts overrides of keys it declares, and a test keeps the two equal.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch

from fedbridge.errors import ConfigError
from fedbridge.models.device import DEVICE_SETTING, resolve_device
from fedbridge.models.slm import SLMOptions

Flat = dict[str, bool | int | float | str]
T = TypeVar("T")


@dataclass(frozen=True)
class TaskConfig:
    name: str = "drug-reviews"  # built-in name, local file path, or HF dataset id
    text_column: str = ""  # "" = the task's default ("text" for files)
    label_column: str = ""  # "" = the task's default ("label" for files)
    labels: tuple[str, ...] = ()  # () = every distinct value, sorted
    max_examples: int = 0  # 0 = the task's default cap (all rows for small data)
    global_test_fraction: float = 0.2
    silo_test_fraction: float = 0.2
    encoding: str = "utf-8"
    description: str = ""  # what one example is, for LLM prompts ("" = the task's default, e.g. "drug review")
    instruction: str = ""  # how the LLM is asked to classify one example ("" = the task's default)


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = "natural"  # iid | dirichlet | natural
    num_silos: int = 4
    column: str = "condition"  # natural: the column whose values stay together in one silo
    alpha: float = 0.5  # dirichlet: label-skew concentration; smaller = more skewed

    def __post_init__(self) -> None:
        if self.num_silos < 1:
            raise ConfigError(f"partition.num-silos must be at least 1, not {self.num_silos}.")
        if self.kind == "dirichlet" and not 0 < self.alpha < float("inf"):
            raise ConfigError(f"partition.alpha must be a finite number > 0 for partition.kind=dirichlet, not "
                              f"{self.alpha:g}; small values (e.g. 0.1) give strongly skewed silos, large (100) "
                              "nearly iid ones.")


@dataclass(frozen=True)
class SLMConfig(SLMOptions):
    """The silos' SLMs: which encoder (``model``) and how it is built and trained (``SLMOptions``)."""

    model: str = "embedded"  # one spec, or a comma list assigned to silos round-robin (mixed architectures)

    def options(self, **changes: Any) -> SLMOptions:
        """The build-and-train options alone (e.g. ``options(epochs=2)`` for a fixed number of epochs)."""
        values = {f.name: getattr(self, f.name) for f in fields(SLMOptions)}
        return SLMOptions(**{**values, **changes})

    def spec_for(self, silo: int) -> str:
        specs = [s.strip() for s in self.model.split(",") if s.strip()]
        return specs[silo % len(specs)]


@dataclass(frozen=True)
class LLMConfig:
    model: str = "embedded"
    batch_size: int = 8
    max_length: int = 384  # prompt tokens kept for classification
    calibrate: bool = False  # contextual calibration of label answers (divide by a content-free input's)


@dataclass(frozen=True)
class DeviceConfig:
    """``device.*``: where models run. ``auto`` is the first CUDA GPU torch sees, else the CPU; each side resolves
    its own setting on its own machine (frozen models in bfloat16 on a GPU, float32 on the CPU)."""

    server: str = "auto"  # the server's LLM (generation, scoring, CrossLM's LoRA), its SLM copies and embeddings
    silo: str = "auto"  # each silo's SLM and LLM (FDKT's generator, Social's teacher); node config 'device' overrides
    gpus_per_silo: float = 0.0  # simulation engine: the GPU share each silo's process gets (0.1: ten silos per GPU)
    cpus_per_silo: int = 1  # simulation engine: CPU cores each silo's process gets
    ray_address: str = ""  # simulation engine: a running Ray cluster (head's host:port) to run on; "" = Ray of its own

    def __post_init__(self) -> None:
        for key, value in (("device.server", self.server), ("device.silo", self.silo)):
            if not DEVICE_SETTING.fullmatch(value):
                raise ConfigError(f"{key}='{value}' is not a device: use auto, cpu, cuda or cuda:<index>.")
        if self.gpus_per_silo < 0 or self.cpus_per_silo < 1:
            raise ConfigError("device.gpus-per-silo must be >= 0 and device.cpus-per-silo >= 1.")

    def for_server(self) -> torch.device:
        """``device.server`` resolved on this machine (the server's, or an auditor's)."""
        return resolve_device(self.server, "device.server")


CANARY_KINDS = ("digits", "name")


@dataclass(frozen=True)
class CanaryConfig:
    """``canaries.*``: a secret sentence every silo plants in its own training split, for any method, so that what
    crosses the wire can be audited for it (rank among comparison secrets and exposure; ``fedbridge audit``)."""

    enabled: bool = False
    kind: str = "digits"  # digits: "My PIN code is NNNN." | name: "My secret contact is FIRST LAST."
    copies: int = 1  # copies planted in each silo's training split
    candidates: int = 999  # comparison secrets the canary is ranked against

    def __post_init__(self) -> None:
        if self.kind not in CANARY_KINDS:
            raise ConfigError(f"canaries.kind='{self.kind}' is not one of: {', '.join(CANARY_KINDS)}.")
        if self.copies < 1 or self.candidates < 1:
            raise ConfigError("canaries.copies and canaries.candidates must be >= 1.")


@dataclass(frozen=True)
class ExperimentConfig:
    method: str = "local"
    seed: int = 0
    rounds: int = 10  # FedAvg rounds
    timeout: float = 3600.0  # seconds to wait for silo replies in one exchange
    results_dir: str = "results"
    run_name: str = ""
    resume: bool = False  # continue the run named run-name from its checkpoint, skipping its completed steps
    task: TaskConfig = TaskConfig()
    partition: PartitionConfig = PartitionConfig()
    slm: SLMConfig = SLMConfig()
    llm: LLMConfig = LLMConfig()
    canaries: CanaryConfig = CanaryConfig()
    device: DeviceConfig = DeviceConfig()
    method_options: dict[str, bool | int | float | str] = field(default_factory=dict, hash=False, compare=False)

    @classmethod
    def from_run_config(cls, flat: typing.Mapping[str, Any]) -> ExperimentConfig:
        flat = current_keys(flat)
        top = {k: v for k, v in flat.items() if "." not in k}
        nested = {name: from_flat(_SECTIONS[name], flat, name) for name in _SECTIONS}
        method_options = {k: v for k, v in flat.items() if "." in k and k.split(".")[0] not in _SECTIONS}
        return from_flat(cls, top, "", method_options=method_options, **nested)

    def to_run_config(self) -> Flat:
        flat: Flat = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "method_options":
                flat.update(value)
            elif dataclasses.is_dataclass(value):
                flat.update(to_flat(value, f.name))
            else:
                flat[_key(f.name)] = value
        return flat


_SECTIONS: dict[str, type] = {"task": TaskConfig, "partition": PartitionConfig, "slm": SLMConfig, "llm": LLMConfig,
                              "canaries": CanaryConfig, "device": DeviceConfig}
# keys that moved, old -> new: run records and checkpoints written before the move still read
RENAMED = {"social.canaries": "canaries.enabled", "social.canary-kind": "canaries.kind",
           "social.canary-copies": "canaries.copies", "social.canary-candidates": "canaries.candidates"}


def current_keys(flat: typing.Mapping[str, Any]) -> dict[str, Any]:
    """``flat`` with every moved key under its current name (``RENAMED``)."""
    return {RENAMED.get(k, k): v for k, v in flat.items()}


def _key(name: str, prefix: str = "") -> str:
    return f"{prefix}.{name.replace('_', '-')}" if prefix else name.replace("_", "-")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    try:
        if origin is tuple:
            items = value if isinstance(value, (list, tuple)) else [s.strip() for s in str(value).split(",")]
            return tuple(s for s in items if s != "")
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                return value.lower() in ("true", "1")
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"Config '{key}' = {value!r} is not a valid {getattr(annotation, '__name__', annotation)}.") from err


def from_flat(cls: type[T], flat: typing.Mapping[str, Any], prefix: str, **given: Any) -> T:
    """Build dataclass ``cls`` from the keys ``prefix.field-name`` of ``flat``; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    known = {_key(f.name, prefix): f for f in fields(cls) if f.name not in given}
    scoped = {k: v for k, v in flat.items() if (k.startswith(prefix + ".") if prefix else "." not in k)}
    for key in scoped:
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."
            raise ConfigError(f"Unknown config key '{key}'.{hint}")
    values = {f.name: _coerce(scoped[k], hints[f.name], k) for k, f in known.items() if k in scoped}
    return cls(**values, **given)


def to_flat(obj: Any, prefix: str) -> Flat:
    out: Flat = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[_key(f.name, prefix)] = ",".join(value) if isinstance(value, tuple) else value
    return out
