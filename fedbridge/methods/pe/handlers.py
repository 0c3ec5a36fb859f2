"""The silo side of Private Evolution: the core's ``query.dp_vote`` (every iteration's candidates) and
``train.augmented`` (the clearest candidates, at the end)."""

from flwr.clientapp.typing import ClientAppCallable

from fedbridge import handlers as core
from fedbridge import protocol as p

HANDLERS: dict[str, ClientAppCallable] = {p.TRAIN_AUGMENTED: core.train_augmented, p.DP_VOTE: core.dp_vote}
