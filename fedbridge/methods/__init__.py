"""fedbridge's methods, one folder each: ``config.py`` (its options, read by both sides), ``server.py`` (its
``Method``: what the ServerApp does), ``messages.py`` (the message types it adds to the protocol, with their
catalogue entries), ``handlers.py`` (its silo side's Flower handlers and ``HANDLERS``, the message types it answers),
``silo.py`` (what a silo does for it, called by its handlers). A method without options, messages or a silo side of
its own leaves that file out.

``PACKAGES`` below is the one registry line per method: both sides find everything else in the method's package
(the server: ``fedbridge.methods.registry``; the silo: ``fedbridge.client_app``; the catalogue:
``fedbridge.protocol.catalogue``). This module imports nothing, so the silo side may read it; the silo side never
imports a ``server.py``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# method name (``fedbridge list``, ``method=``) -> its package; the order is the listing's and the config reference's
PACKAGES: dict[str, str] = {
    "local": "fedbridge.methods.local",
    "fedavg": "fedbridge.methods.fedavg",
    "centralized": "fedbridge.methods.centralized",
    "llm-zero-shot": "fedbridge.methods.zero_shot",
    "fdkt": "fedbridge.methods.fdkt",
    "crosslm": "fedbridge.methods.crosslm",
    "social": "fedbridge.methods.social",
    "pipeline": "fedbridge.methods.pipeline",
    "pe": "fedbridge.methods.pe",
}


def method_module(method: str, part: str) -> ModuleType | None:
    """Module ``part`` (``server``, ``config``, ``messages``, ``handlers``, ``silo``) of method ``method``'s package,
    or None where the package has none (an import error inside it is raised, not taken for a missing file)."""
    name = f"{PACKAGES[method]}.{part}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name in (name, PACKAGES[method]):
            return None
        raise
