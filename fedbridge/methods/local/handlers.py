"""The silo side of baseline ``local``: the core's ``train.local``."""

from flwr.clientapp.typing import ClientAppCallable

from fedbridge import handlers as core
from fedbridge import protocol as p

HANDLERS: dict[str, ClientAppCallable] = {p.TRAIN_LOCAL: core.train_local}
