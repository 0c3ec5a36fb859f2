"""The silo side of the pipeline: FDKT's and CrossLM's silo halves, unchanged (their handlers, by reference)."""

from flwr.clientapp.typing import ClientAppCallable

from fedbridge.methods.crosslm import handlers as crosslm
from fedbridge.methods.fdkt import handlers as fdkt
from fedbridge.methods.fdkt.messages import SYNTHESIZE

HANDLERS: dict[str, ClientAppCallable] = {SYNTHESIZE: fdkt.synthesize, **crosslm.HANDLERS}
