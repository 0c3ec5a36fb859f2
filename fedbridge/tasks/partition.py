"""Split a task into a server-held global test set and N silos (train/test each), deterministically per seed.

Silo assignment uses flwr-datasets partitioners on an in-memory ``datasets.Dataset``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from dataclasses import dataclass

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


def silo_from_file(task_cfg: TaskConfig, path: str, labels: tuple[str, ...], seed: int) -> SiloData:
    """A deployed silo's own data file, split into train/test, checked against the federation's label set."""
    task = load_task(dataclasses.replace(task_cfg, name=path, labels=labels), seed)
    return SiloData(*_split(list(task.data["text"]), list(task.data["label"]), task_cfg.silo_test_fraction, seed))
