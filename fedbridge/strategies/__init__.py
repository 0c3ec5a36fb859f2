"""fedbridge's methods as Flower strategies, for a ServerApp of your own (docs/strategies.md)::

    experiment = ExperimentConfig.from_run_config(context.run_config)  # what the silos read
    result = PrivateEvolution(config=PEConfig(epsilon=4.0), experiment=experiment).start(grid=grid)

One class per method of ``fedbridge.methods.registry.METHODS``, named as its ``Method`` class (``Local``, ``FDKT``,
``CrossLM``, ``PrivateEvolution``...), made here from the registry, so a new method is a strategy without a second
edit; ``fedavg`` is ``WeightSharing``, which takes any of Flower's weight strategies.
"""

from fedbridge.methods.registry import METHODS, get_method
from fedbridge.strategies.base import MethodStrategy, flower_result, run_experiment, strategy_class
from fedbridge.strategies.weight_sharing import WeightSharing

STRATEGIES: dict[str, type[MethodStrategy]] = {
    name: {WeightSharing.method: WeightSharing}.get(name) or strategy_class(name) for name in METHODS}
globals().update({cls.__name__: cls for cls in STRATEGIES.values()})


def strategy_for(method: str) -> type[MethodStrategy]:
    """The strategy class of method ``method`` (a name ``fedbridge list`` shows)."""
    return STRATEGIES[get_method(method).name]


__all__ = ["STRATEGIES", "MethodStrategy", "flower_result", "run_experiment", "strategy_for",
           *(cls.__name__ for cls in STRATEGIES.values())]
