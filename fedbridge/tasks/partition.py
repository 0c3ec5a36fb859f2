"""Split a task into a server-held global test set and N silos (train/test each), deterministically per seed.

Silo assignment uses flwr-datasets partitioners on an in-memory ``datasets.Dataset``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, Partitioner
from sklearn.model_selection import train_test_split

from fedbridge.config import PartitionConfig, TaskConfig
from fedbridge.errors import ConfigError, DataError
from fedbridge.tasks.task import Examples, Task, load_task

PARTITION_KINDS = ("iid", "dirichlet", "natural")


@dataclass(frozen=True)
class SiloData:
    train: Examples
    test: Examples


@dataclass(frozen=True)
class Federation:
    task: Task
    global_test: Examples
    silos: tuple[SiloData, ...]


def _split(texts: list[str], labels: list[int], test_fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Stratified where every class has two members, random otherwise."""
    counts = Counter(labels)
    stratify = labels if min(counts.values()) >= 2 and len(labels) * test_fraction >= len(counts) else None
    tr_x, te_x, tr_y, te_y = train_test_split(texts, labels, test_size=test_fraction, random_state=seed,
                                              stratify=stratify)
    return Examples.of(tr_x, tr_y), Examples.of(te_x, te_y)


def _natural_groups(values: list[str], num_silos: int) -> list[int]:
    """Put each distinct value wholly in one silo, largest first into the smallest silo (balanced sizes)."""
    sizes, owner = [0] * num_silos, {}
    for value, count in sorted(Counter(values).items(), key=lambda kv: (-kv[1], kv[0])):
        silo = int(np.argmin(sizes))
        owner[value], sizes[silo] = silo, sizes[silo] + count
    return [owner[v] for v in values]


def _partitioner(cfg: PartitionConfig, seed: int) -> Partitioner:
    if cfg.kind == "iid":
        return IidPartitioner(num_partitions=cfg.num_silos)
    if cfg.kind == "dirichlet":
        return DirichletPartitioner(num_partitions=cfg.num_silos, partition_by="label", alpha=cfg.alpha,
                                    min_partition_size=2, self_balancing=True, shuffle=True, seed=seed)
    return NaturalIdPartitioner(partition_by="silo")


def partition(task: Task, cfg: PartitionConfig, global_test_fraction: float, silo_test_fraction: float,
              seed: int) -> Federation:
    if cfg.kind not in PARTITION_KINDS:
        raise ConfigError(f"Unknown partition.kind '{cfg.kind}'. Use one of: {', '.join(PARTITION_KINDS)}.")
    if cfg.num_silos < 1:
        raise ConfigError(f"partition.num-silos must be at least 1, not {cfg.num_silos}.")
    data = task.data.shuffle(seed=seed)
    idx_pool, idx_test = train_test_split(np.arange(len(data)), test_size=global_test_fraction, random_state=seed,
                                          stratify=data["label"] if min(Counter(data["label"]).values()) >= 2 else None)
    global_test = Examples.of(data.select(idx_test)["text"], data.select(idx_test)["label"])
    pool = data.select(sorted(idx_pool))
    if cfg.kind == "natural":
        if cfg.column not in pool.column_names:
            raise DataError(f"partition.column '{cfg.column}' is not a column of task '{task.name}'. "
                            f"Columns are: {', '.join(pool.column_names)}. Set partition.column, or use partition.kind=iid.")
        pool = pool.add_column("silo", _natural_groups(pool[cfg.column], cfg.num_silos))
    partitioner = _partitioner(cfg, seed)
    partitioner.dataset = pool
    silos = []
    for i in range(cfg.num_silos):
        part = partitioner.load_partition(i) if i < partitioner.num_partitions else pool.select([])
        if len(part) < 2:
            raise DataError(f"Silo {i} gets {len(part)} examples (partition.kind={cfg.kind}, {cfg.num_silos} silos, "
                            f"{len(pool)} examples to share). Use fewer silos, another partition.kind, or more data.")
        silos.append(SiloData(*_split(part["text"], part["label"], silo_test_fraction, seed + i)))
    return Federation(task, global_test, tuple(silos))


@functools.lru_cache(maxsize=8)
def load_federation(task_cfg: TaskConfig, partition_cfg: PartitionConfig, seed: int) -> Federation:
    """The whole simulated federation for a config; cached per process so every silo shares one load."""
    task = load_task(task_cfg, seed)
    return partition(task, partition_cfg, task_cfg.global_test_fraction, task_cfg.silo_test_fraction, seed)


@dataclass(frozen=True)
class SiloFile:
    """A deployed silo's own data as its node config alone defines it: the file, its columns and encoding, how many
    rows it uses and how it splits them. Nothing in the server's run config reshapes it."""

    path: str
    text_column: str = "text"
    label_column: str = "label"
    encoding: str = "utf-8"
    max_examples: int = 0  # 0 = every row; else a sample of this many, drawn with split-seed
    test_fraction: float = 0.2
    split_seed: int = 0

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> SiloFile:
        """From node config keys ``data-path``, ``text-column``, ``label-column``, ``encoding``, ``max-examples``,
        ``test-fraction`` and ``split-seed``."""
        try:
            file = cls(str(node["data-path"]), str(node.get("text-column", "text")),
                       str(node.get("label-column", "label")), str(node.get("encoding", "utf-8")),
                       int(node.get("max-examples", 0)), float(node.get("test-fraction", 0.2)),
                       int(node.get("split-seed", 0)))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"Node config: max-examples and split-seed must be whole numbers, test-fraction a "
                              f"number ({err}).") from None
        if file.max_examples < 0 or not 0 < file.test_fraction < 1:
            raise ConfigError("Node config: max-examples must be >= 0 and test-fraction in (0, 1).")
        return file


def silo_from_file(file: SiloFile, labels: tuple[str, ...]) -> tuple[SiloData, str]:
    """A deployed silo's own data file, checked against the federation's label set and split into train/test; and
    the identity of its source (every row, independent of their order, of sampling and of the split), which names
    the silo's lifetime privacy ledger: every subset of the file charges the same budget."""
    task = load_task(TaskConfig(name=file.path, text_column=file.text_column, label_column=file.label_column,
                                labels=labels, encoding=file.encoding), 0)
    # canonical order, split stratified by label *name*: neither the file's row order nor the order of the server's
    # label list changes which rows train and which test
    rows = sorted(zip(task.data["text"], (labels[int(y)] for y in task.data["label"])))
    source = source_identity([t for t, _ in rows], [y for _, y in rows])
    if file.max_examples and len(rows) > file.max_examples:
        keep = np.random.default_rng(file.split_seed).choice(len(rows), file.max_examples, replace=False)
        rows = [rows[i] for i in sorted(keep)]
    counts = Counter(y for _, y in rows)
    stratify = [y for _, y in rows] if min(counts.values()) >= 2 and len(rows) * file.test_fraction >= len(counts) \
        else None
    train, test = train_test_split(rows, test_size=file.test_fraction, random_state=file.split_seed, stratify=stratify)
    index = {name: i for i, name in enumerate(labels)}
    return SiloData(*(Examples.of([t for t, _ in part], [index[y] for _, y in part]) for part in (train, test))), source


def source_identity(texts: Sequence[str], label_names: Sequence[str]) -> str:
    """A hash of a data source's (text, label name) rows as a multiset: the same for any order of the rows and any
    order of the label set."""
    digest = hashlib.sha256()
    for row in sorted(json.dumps([t, str(y)], ensure_ascii=False) for t, y in zip(texts, label_names)):
        digest.update(row.encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]
