"""``fedavg.*``: which of Flower's strategies aggregates the weights, with its options."""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field

import flwr.serverapp.strategy as flower_strategies

from fedbridge.errors import ConfigError

STRATEGIES = ("FedAvg", "FedProx", "FedAvgM", "FedAdam", "FedYogi", "FedAdagrad", "FedMedian", "FedTrimmedAvg",
              "Krum", "MultiKrum", "Bulyan")  # Flower's strategies that aggregate weights
# what fedbridge sets on every strategy itself; the rest of a strategy's constructor is fedavg.strategy-options
_SET_BY_FEDBRIDGE = {"self", "fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
                     "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
                     "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "selection_rule"}


@dataclass(frozen=True)
class FedAvgConfig:
    local_epochs: int = field(default=5, metadata={
        "help": "epochs each silo trains per round (on all its private data: no validation split)"})
    strategy: str = field(default="FedAvg", metadata={
        "help": "which of Flower's strategies aggregates the weights, by class name: " + ", ".join(STRATEGIES)})
    strategy_options: str = field(default="", metadata={
        "help": "its constructor options, comma-separated name=value cast to the types Flower declares (e.g. "
                "\"proximal_mu=0.01\" for FedProx)"})

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"Unknown fedavg.strategy '{self.strategy}'. Use one of Flower's: {', '.join(STRATEGIES)}.")
        self.options()  # a bad option fails before any work

    def options(self) -> dict[str, float | int | bool]:
        """``strategy_options`` parsed, each value cast to the type the Flower constructor declares."""
        params = strategy_parameters(self.strategy)
        out: dict[str, float | int | bool] = {}
        for item in filter(None, (x.strip() for x in self.strategy_options.split(","))):
            name, sep, value = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in params:
                raise ConfigError(f"fedavg.strategy-options '{item}': {self.strategy} takes "
                                  f"{', '.join(f'{k}=<{t.__name__}>' for k, t in params.items()) or 'no options'}.")
            kind = params[name]
            try:
                out[name] = (value.strip().lower() == "true") if kind is bool else kind(value)
            except ValueError:
                raise ConfigError(f"fedavg.strategy-options '{item}': {name} must be a {kind.__name__}.") from None
        return out


def strategy_parameters(name: str) -> dict[str, type]:
    """The options a Flower strategy's constructor takes beyond what fedbridge sets, with their declared types."""
    cls = getattr(flower_strategies, name)
    hints = typing.get_type_hints(cls.__init__)
    return {k: hints.get(k, float) for k in inspect.signature(cls.__init__).parameters
            if k not in _SET_BY_FEDBRIDGE and hints.get(k, float) in (int, float, bool)}
