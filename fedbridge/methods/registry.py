"""fedbridge methods, by name (the server side): the ``Method`` that each package of ``fedbridge.methods.PACKAGES``
defines in its ``server.py``. A method is added by its folder and one line there; nothing here changes."""

import dataclasses

from fedbridge import methods
from fedbridge.errors import ConfigError
from fedbridge.faults import FaultConfig
from fedbridge.methods.base import Method, Session


def discover() -> dict[str, type[Method]]:
    """name -> ``Method`` class, from each registered package's ``server.py`` (the class there whose ``name`` is the
    registry's name for the package), in the registry's order."""
    out: dict[str, type[Method]] = {}
    for name, package in methods.PACKAGES.items():
        module = methods.method_module(name, "server")
        found = [c for c in vars(module or object).values() if isinstance(c, type) and issubclass(c, Method)
                 and c.__module__ == getattr(module, "__name__", None) and c.__dict__.get("name") == name]
        if len(found) != 1:
            raise TypeError(f"method '{name}': {package}.server must define one Method subclass with "
                            f"name = '{name}' (found {len(found)})")
        out[name] = found[0]
    return out


METHODS: dict[str, type[Method]] = discover()


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"Unknown method '{name}'. Available: {', '.join(METHODS)}.")
    return METHODS[name]


def option_class(section: str) -> type | None:
    """The typed options of config section ``section``: ``FaultConfig`` for ``faults``, else the one dataclass that
    method ``section``'s ``config.py`` defines (None for a method without options of its own)."""
    if section == "faults":
        return FaultConfig
    module = methods.method_module(section, "config")
    if module is None:
        return None
    [cls] = [c for c in vars(module).values()
             if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == module.__name__]
    return cls


def option_applies(key: str, method: str) -> bool:
    """Whether a config key concerns ``method``: a key in another method's section (``fdkt.*`` for ``local``) says
    nothing about it. ``method`` may carry a variant after a space ('social voting')."""
    section, name = key.split(".")[0], method.split()[0]
    return section not in METHODS or section == name or (name in METHODS and section in METHODS[name].sections)


__all__ = ["METHODS", "Method", "Session", "discover", "get_method", "option_applies", "option_class"]
