"""fedbridge methods, by name (the server side). A method is a ``Method`` subclass; add one here to make it runnable."""

import dataclasses
import importlib

from fedbridge.errors import ConfigError
from fedbridge.faults import FaultConfig
from fedbridge.methods.base import Method, Session
from fedbridge.methods.centralized.server import Centralized
from fedbridge.methods.crosslm.server import CrossLM
from fedbridge.methods.fdkt.server import FDKT
from fedbridge.methods.fedavg.server import FedAvg
from fedbridge.methods.local.server import Local
from fedbridge.methods.pe.server import PrivateEvolution
from fedbridge.methods.pipeline.server import Pipeline
from fedbridge.methods.social.server import SocialLearning
from fedbridge.methods.zero_shot.server import LLMZeroShot

METHODS: dict[str, type[Method]] = {m.name: m for m in (Local, FedAvg, Centralized, LLMZeroShot, FDKT, CrossLM,
                                                        SocialLearning, Pipeline, PrivateEvolution)}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"Unknown method '{name}'. Available: {', '.join(METHODS)}.")
    return METHODS[name]


def option_class(section: str) -> type | None:
    """The typed options of config section ``section``: ``FaultConfig`` for ``faults``, else the one dataclass that
    method ``section``'s ``config.py`` defines (None for a method without options of its own)."""
    if section == "faults":
        return FaultConfig
    name = f"{METHODS[section].__module__.rpartition('.')[0]}.config"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:
            return None
        raise
    [cls] = [c for c in vars(module).values()
             if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == name]
    return cls


def option_applies(key: str, method: str) -> bool:
    """Whether a config key concerns ``method``: a key in another method's section (``fdkt.*`` for ``local``) says
    nothing about it. ``method`` may carry a variant after a space ('social voting')."""
    section, name = key.split(".")[0], method.split()[0]
    return section not in METHODS or section == name or (name in METHODS and section in METHODS[name].sections)


__all__ = ["METHODS", "Method", "Session", "get_method", "option_applies", "option_class"]
