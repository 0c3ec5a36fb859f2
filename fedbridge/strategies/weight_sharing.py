"""``WeightSharing``: the ``fedavg`` baseline as a strategy, taking any of Flower's own weight strategies as it is.

The ``fedavg`` method already runs Flower's strategies (``fedavg.strategy``, hardened by ``checked``), named in the
run config so that a record reruns. Here the user hands over the instance instead (``strategy=FedProx(proximal_mu=0.01)``)
and it becomes those two keys: its class, and its options that differ from the class's defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import flwr.serverapp.strategy as flower_strategies
from flwr.serverapp.strategy import Strategy

from fedbridge.config import ExperimentConfig, TaskConfig, from_flat
from fedbridge.errors import ConfigError
from fedbridge.methods.fedavg.config import STRATEGIES, FedAvgConfig, strategy_parameters
from fedbridge.strategies.base import MethodStrategy


class WeightSharing(MethodStrategy, method="fedavg"):
    """fedbridge's ``fedavg`` method as a Flower strategy: identical SLMs whose weights ``strategy`` aggregates, one of
    Flower's own (``FedAvg()`` by default; ``FedProx(proximal_mu=0.01)``, ``FedAdam(eta=0.01)``, ``Krum(...)``...).
    fedbridge checks every reply before it aggregates; its other options: ``config=FedAvgConfig(local_epochs=...)``.
    Named so as not to be taken for Flower's ``FedAvg``, which it runs."""

    def __init__(self, task: str | TaskConfig | None = None, config: FedAvgConfig | None = None, *,
                 strategy: Strategy | None = None, experiment: ExperimentConfig | None = None,
                 **kwargs: Any) -> None:
        if strategy is not None:
            if config is None:  # the experiment's fedavg.* options, with this strategy
                config = from_flat(FedAvgConfig, experiment.method_options, "fedavg") if isinstance(
                    experiment, ExperimentConfig) else FedAvgConfig()
            config = with_flower_strategy(config, strategy)
        super().__init__(task, config, experiment=experiment, **kwargs)


def with_flower_strategy(config: FedAvgConfig, strategy: Strategy) -> FedAvgConfig:
    """``config`` running Flower strategy instance ``strategy``: its class as ``fedavg.strategy``, its options that
    differ from the class's defaults as ``fedavg.strategy-options``."""
    cls = type(strategy)
    if cls.__name__ not in STRATEGIES or getattr(flower_strategies, cls.__name__) is not cls:
        raise ConfigError(f"WeightSharing(strategy=...) takes one of Flower's weight strategies as Flower defines it "
                          f"({', '.join(STRATEGIES)}), not {cls.__module__}.{cls.__qualname__}: the run record names "
                          "it, so that the run can be rerun from its config.")
    if (config.strategy, config.strategy_options) != (FedAvgConfig().strategy, FedAvgConfig().strategy_options):
        raise ConfigError("WeightSharing got a strategy twice, as strategy=... and in config=FedAvgConfig(strategy=..., "
                          "strategy_options=...). Give it once.")
    options = strategy_parameters(cls.__name__)
    changed = {name: getattr(strategy, name, param.default)
               for name, param in inspect.signature(cls.__init__).parameters.items()
               if name != "self" and _set_by_user(getattr(strategy, name, param.default), param.default)}
    if fixed := [name for name in changed if name not in options]:
        raise ConfigError(f"WeightSharing sets {cls.__name__}'s {fixed[0]} itself (every silo trains in every round, "
                          "and fedbridge's own message keys and metrics): leave it at Flower's default.")
    return dataclasses.replace(config, strategy=cls.__name__,
                               strategy_options=",".join(f"{name}={value}" for name, value in changed.items()))


def _set_by_user(value: Any, default: Any) -> bool:
    """Whether a strategy's attribute is not its constructor's default; a function Flower put there (its metric
    aggregation where the default was None) counts as the default."""
    if callable(value):
        return not getattr(value, "__module__", "").startswith("flwr.")
    return value != default
