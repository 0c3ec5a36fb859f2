"""fedbridge ClientApp: the silo's handlers, one thin handler per message type (see ``fedbridge.protocol``), with
fedbridge's mods. The core's handlers are in ``fedbridge.handlers``, each method's in its folder's ``handlers.py``
(found from ``fedbridge.methods.PACKAGES``); the work is in ``Silo`` and in each method's ``silo.py``. ``register``
puts them on any ClientApp (fedbridge's ``app``, or a user's own, docs/strategies.md). Nothing here imports server
code: the only modules found at run time are the registered packages' ``handlers`` (and what they import)."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedbridge import handlers as core
from fedbridge.errors import ConfigError, SiloFailure, SiloRefusal
from fedbridge.faults import fault_mod
from fedbridge.methods import PACKAGES, method_module
from fedbridge.privacy.policy import SiloPolicy
from fedbridge.protocol import ProtocolError

log = logging.getLogger("fedbridge.silo")
REFUSAL_ERROR_CODE = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: what the server saw when a refusal raised


def wire_safe_errors(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A deployed (strict) silo's errors cross the wire as a category and a fix, never its data: Flower returns an
    exception's text to the server, and a data error would quote the silo's rows, labels or paths. Refusals
    (``SiloRefusal``: policy or budget) are the silo's deliberate answer, not a crash: one warning line in its log
    and an error reply naming the reason (no traceback, no failed ClientApp process). Protocol errors (about the
    server's own message) and config errors pass as they are; anything else is replaced, and its detail goes to the
    silo's own log."""
    try:
        return call_next(msg, context)
    except SiloRefusal as refusal:
        log.warning("Refused %s: %s", msg.metadata.message_type, refusal)
        return Message(Error(REFUSAL_ERROR_CODE, f"{type(refusal).__name__}: {refusal}"), reply_to=msg)
    except (ProtocolError, ConfigError):
        raise
    except Exception as err:
        if not _strict(context.node_config):
            raise
        log.warning("%s failed: %s: %s", msg.metadata.message_type, type(err).__name__, err, exc_info=True)
        raise SiloFailure(f"{type(err).__name__} on this silo while handling {msg.metadata.message_type}; the detail "
                          "is in the silo's own log. Check the run config against the silo's node config.") from None


def _strict(node_config: dict) -> bool:
    try:
        return SiloPolicy.from_node_config(node_config).name == "strict"
    except ConfigError:
        return True


def handler_table() -> dict[str, tuple[ClientAppCallable, tuple[str, ...]]]:
    """message type -> (its handler, the methods that send it; () = every method): discovery, then each registered
    method's ``handlers.HANDLERS`` in the registry's order (a method without a ``handlers.py`` has no silo side).
    Two methods may list one message type only with the same handler (the core's, or another method's)."""
    table: dict[str, tuple[ClientAppCallable, tuple[str, ...]]] = {t: (h, ()) for t, h in core.DISCOVERY.items()}
    for name in PACKAGES:
        module = method_module(name, "handlers")
        for message_type, handler in getattr(module, "HANDLERS", {}).items():
            if message_type in core.DISCOVERY:
                raise TypeError(f"method '{name}' lists '{message_type}', which every silo answers (discovery): "
                                "leave it out")
            known, users = table.get(message_type, (handler, ()))
            if known is not handler:
                raise TypeError(f"method '{name}' answers '{message_type}' with {handler.__qualname__}, which is "
                                f"answered by {known.__qualname__} already: list that handler instead")
            table[message_type] = (handler, (*users, name))
    return table


# message type -> (its handler, the methods that send it; () = every method). A method's silo side is these handlers.
HANDLERS = handler_table()


def served(table: dict[str, tuple[ClientAppCallable, tuple[str, ...]]]) -> tuple[str, ...]:
    """The methods a handler table serves, in the registry's order."""
    return tuple(m for m in PACKAGES if any(m in users for _, users in table.values()))


SERVED = served(HANDLERS)  # the methods served here


def register(app: ClientApp, methods: Iterable[str] | None = None) -> ClientApp:
    """Put fedbridge's silo handlers on ``app``: those of ``methods`` (names as ``fedbridge list`` shows them) and
    discovery, or all of them (None). Each handler keeps fedbridge's mods: a strict silo's errors cross the wire as a
    category and a fix (``wire_safe_errors``), and the run config's fault injection (``fault_mod``). Returns ``app``."""
    table = handler_table()  # the registry as it is now
    names = served(table)
    wanted = set(names if methods is None else [methods] if isinstance(methods, str) else methods)
    if unknown := sorted(wanted - set(names)):
        raise ConfigError(f"register: unknown method '{unknown[0]}'. fedbridge's silo side serves: "
                          f"{', '.join(names)}.")
    for message_type, (handler, users) in table.items():
        if not users or wanted & set(users):
            category, _, action = message_type.partition(".")  # "train" alone: Flower's default action
            decorator = getattr(app, category)
            mods = [wire_safe_errors, fault_mod]
            (decorator(action, mods=mods) if action else decorator(mods=mods))(handler)
    return app


app = register(ClientApp())
