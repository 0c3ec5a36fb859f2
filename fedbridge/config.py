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
    name: str = field(default="drug-reviews", metadata={
        "help": "the data: a built-in task (drug-reviews, tweets; see `fedbridge list`), a local file path (CSV, TSV, "
                "JSONL, JSON, Parquet) or a Hugging Face dataset id"})
    text_column: str = field(default="", metadata={
        "help": "the column holding the text, of a file or HF dataset; \"\" = the task's default (\"text\" for "
                "files)"})
    label_column: str = field(default="", metadata={
        "help": "the column holding the label; \"\" = the task's default (\"label\" for files)"})
    labels: tuple[str, ...] = field(default=(), metadata={
        "help": "the label set, comma-separated, in the order that defines label ids; a value outside it is an error; "
                "\"\" = every distinct value, sorted"})
    max_examples: int = field(default=0, metadata={
        "help": "subsample cap on the rows read; 0 = the task's default cap (all rows for small data, 4,000 for "
                "tweets)"})
    global_test_fraction: float = field(default=0.2, metadata={
        "help": "fraction of the data held out as the server's global test set, before partitioning"})
    silo_test_fraction: float = field(default=0.2, metadata={
        "help": "fraction of each simulated silo's partition held out as its own test split"})
    encoding: str = field(default="utf-8", metadata={"help": "text encoding of a local file (e.g. latin-1)"})
    description: str = field(default="", metadata={
        "help": "what one example is, for LLM prompts (\"\" = the task's default, e.g. \"drug review\")"})
    instruction: str = field(default="", metadata={
        "help": "how the LLM is asked to classify one example (\"\" = the task's default)"})


@dataclass(frozen=True)
class PartitionConfig:
    kind: str = field(default="natural", metadata={
        "help": "how the data is split into silos: iid | dirichlet (label skew, partition.alpha) | natural (by "
                "partition.column)"})
    num_silos: int = field(default=4, metadata={"help": "number of silos (= SuperNodes in simulation), at least 1"})
    column: str = field(default="condition", metadata={
        "help": "natural: the column whose values stay together in one silo"})
    alpha: float = field(default=0.5, metadata={
        "help": "dirichlet: label-skew concentration, a finite number > 0; smaller = more skewed (0.1 strongly "
                "skewed, 100 nearly iid)"})

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

    model: str = field(default="embedded", metadata={
        "help": "the silos' encoder: embedded (MiniLM-L6), minilm-l<k> (its first k layers), tiny-bert (tests), an "
                "HF id or a directory; or a comma list assigned to silos round-robin (mixed architectures)"})

    def options(self, **changes: Any) -> SLMOptions:
        """The build-and-train options alone (e.g. ``options(epochs=2)`` for a fixed number of epochs)."""
        values = {f.name: getattr(self, f.name) for f in fields(SLMOptions)}
        return SLMOptions(**{**values, **changes})

    def spec_for(self, silo: int) -> str:
        specs = [s.strip() for s in self.model.split(",") if s.strip()]
        return specs[silo % len(specs)]


LLM_ENGINES = ("auto", "fedbridge", "vllm")


@dataclass(frozen=True)
class LLMConfig:
    model: str = field(default="embedded", metadata={
        "help": "the server's LLM: embedded (SmolLM2-135M-Instruct), tiny-llama (tests), an HF id or a directory"})
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass when the LLM scores labels"})
    max_length: int = field(default=384, metadata={"help": "prompt tokens kept for classification"})
    calibrate: bool = field(default=False, metadata={
        "help": "contextual calibration of the LLM's label answers: probabilities divided by those of content-free "
                "inputs under the same prompt, then renormalised"})
    engine: str = field(default="auto", metadata={
        "help": "what answers every method's LLM asks (fedbridge.models.llm): fedbridge (transformers and "
                "fedbridge's decoder), vllm (vLLM's offline engine: pip install 'fedbridge[vllm]'), auto (on the "
                "server vllm where it is installed for its device and can load llm.model, else fedbridge; on a silo "
                "fedbridge). DP synthesis and training always take the exact path (docs/models.md)"})
    gpu_memory_fraction: float = field(default=0.5, metadata={
        "help": "llm.engine=vllm on a GPU: the share of the GPU's memory vLLM may take (weights and KV cache), "
                "in (0, 1]"})

    def __post_init__(self) -> None:
        if self.engine not in LLM_ENGINES:
            raise ConfigError(f"llm.engine='{self.engine}' is not one of: {', '.join(LLM_ENGINES)}.")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ConfigError(f"llm.gpu-memory-fraction must be in (0, 1], not {self.gpu_memory_fraction}.")


@dataclass(frozen=True)
class DeviceConfig:
    """``device.*``: where models run. ``auto`` is the first CUDA GPU torch sees, else the CPU; each side resolves
    its own setting on its own machine (frozen models in bfloat16 on a GPU, float32 on the CPU)."""

    server: str = field(default="auto", metadata={
        "help": "where the server's LLM (generation, scoring, CrossLM's LoRA), its SLM copies and embeddings run: "
                "auto | cpu | cuda | cuda:<index>"})
    silo: str = field(default="auto", metadata={
        "help": "where each silo's SLM and LLM (FDKT's generator, Social's teacher) run: auto | cpu | cuda | "
                "cuda:<index>; a deployed silo's node config 'device' overrides it"})
    gpus_per_silo: float = field(default=0.0, metadata={
        "help": "simulation engine: the GPU share each silo's process gets (0.1: ten silos per GPU), >= 0"})
    cpus_per_silo: int = field(default=1, metadata={
        "help": "simulation engine: CPU cores each silo's process gets, >= 1"})
    ray_address: str = field(default="", metadata={
        "help": "simulation engine: a running Ray cluster (its head's host:port) to run on; \"\" = a Ray of its own"})

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

    enabled: bool = field(default=False, metadata={
        "help": "plant a secret canary sentence in every silo's training split (a deployed silo only if its node "
                "config says canaries=allow), for any method, so `fedbridge audit` can measure its exposure"})
    kind: str = field(default="digits", metadata={
        "help": "the secret's space: digits (\"My PIN code is NNNN.\") | name (\"My secret contact is FIRST "
                "LAST.\")"})
    copies: int = field(default=1, metadata={"help": "copies planted in each silo's training split, >= 1"})
    candidates: int = field(default=999, metadata={
        "help": "comparison secrets the canary is ranked against, >= 1"})

    def __post_init__(self) -> None:
        if self.kind not in CANARY_KINDS:
            raise ConfigError(f"canaries.kind='{self.kind}' is not one of: {', '.join(CANARY_KINDS)}.")
        if self.copies < 1 or self.candidates < 1:
            raise ConfigError("canaries.copies and canaries.candidates must be >= 1.")


@dataclass(frozen=True)
class ExperimentConfig:
    method: str = field(default="local", metadata={
        "help": "the method to run: local, fedavg, centralized, llm-zero-shot, fdkt, crosslm, social, pipeline, pe "
                "(`fedbridge list`)"})
    seed: int = field(default=0, metadata={
        "help": "seeds the splits, model heads, training order and sampling"})
    rounds: int = field(default=10, metadata={"help": "FedAvg rounds"})
    timeout: float = field(default=3600.0, metadata={
        "help": "seconds to wait for silo replies in one exchange; late silos are recorded as failures"})
    results_dir: str = field(default="results", metadata={
        "help": "directory the run record (<run-name>.json) and its checkpoint go to"})
    run_name: str = field(default="", metadata={
        "help": "the run record's name; \"\" = <method>-<task>-s<seed>-<date-time>"})
    resume: bool = field(default=False, metadata={
        "help": "continue the run named run-name from its checkpoint, skipping its completed steps (the config must "
                "be the same)"})
    task: TaskConfig = field(default=TaskConfig(), metadata={
        "help": "The data: which task or file, its columns and labels, and the held-out test fractions."})
    partition: PartitionConfig = field(default=PartitionConfig(), metadata={
        "help": "How the task's training data is split into simulated silos (a deployed silo reads its own file "
                "instead)."})
    slm: SLMConfig = field(default=SLMConfig(), metadata={
        "help": "The silos' small language models: which encoder, and how it is built and trained (every method "
                "that trains an SLM)."})
    llm: LLMConfig = field(default=LLMConfig(), metadata={
        "help": "The server's large language model, and how it scores labels."})
    canaries: CanaryConfig = field(default=CanaryConfig(), metadata={
        "help": "A secret sentence every silo plants in its own training split, for any method, so that what "
                "crosses the wire can be audited for it (rank among comparison secrets and exposure; "
                "`fedbridge audit`)."})
    device: DeviceConfig = field(default=DeviceConfig(), metadata={
        "help": "Where models run. auto is the first CUDA GPU torch sees, else the CPU; each side resolves its own "
                "setting on its own machine (frozen models in bfloat16 on a GPU, float32 on the CPU)."})
    method_options: dict[str, bool | int | float | str] = field(
        default_factory=dict, hash=False, compare=False,
        metadata={"help": "every key of the other sections (fdkt.*, crosslm.*, faults.* ...), kept flat and parsed "
                          "by the method's own config dataclass"})

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
    """The inverse of ``from_flat``: dataclass ``obj`` as the keys ``prefix.field-name`` (tuples as comma lists), so
    ``from_flat(type(obj), to_flat(obj, prefix), prefix) == obj``."""
    out: Flat = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[_key(f.name, prefix)] = ",".join(value) if isinstance(value, tuple) else value
    return out
