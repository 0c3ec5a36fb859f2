"""The silo side of baseline ``centralized``: the core's ``evaluate`` (the server's SLM on each silo's test split)."""

from flwr.clientapp.typing import ClientAppCallable

from fedbridge import handlers as core
from fedbridge import protocol as p

HANDLERS: dict[str, ClientAppCallable] = {p.EVALUATE: core.evaluate}
