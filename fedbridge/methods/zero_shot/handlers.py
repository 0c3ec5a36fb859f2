"""The silo side of baseline ``llm-zero-shot``: ``evaluate.llm``."""

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedbridge.handlers import reply, silo_request
from fedbridge.methods.zero_shot.messages import EVALUATE_LLM


def evaluate_llm(msg: Message, context: Context) -> Message:
    """The public LLM on the silo's test split."""
    silo, _ = silo_request(msg, context)
    return reply(silo, msg, {**silo.evaluate_llm(), **silo.info()})


HANDLERS: dict[str, ClientAppCallable] = {EVALUATE_LLM: evaluate_llm}
