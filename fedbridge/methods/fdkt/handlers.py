"""The silo side of FDKT: ``query.synthesize`` (the silo's DP demonstrations, ``fdkt/silo.py``), and the core's
``query.dp_vote`` (labels of the augmented examples) and ``train.augmented``."""

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedbridge import handlers as core
from fedbridge import protocol as p
from fedbridge.methods.fdkt import silo as fdkt
from fedbridge.methods.fdkt.messages import SYNTHESIZE


def synthesize(msg: Message, context: Context) -> Message:
    """FDKT: write DP synthetic demonstrations; only they and their privacy cost leave the silo."""
    silo, config = core.silo_request(msg, context)
    examples, privacy, metrics = fdkt.synthesize(silo, experiment=p.read_experiment(config))
    return core.reply(silo, msg, metrics, examples=p.examples_record(examples), privacy=ConfigRecord(privacy))


HANDLERS: dict[str, ClientAppCallable] = {SYNTHESIZE: synthesize, p.TRAIN_AUGMENTED: core.train_augmented,
                                          p.DP_VOTE: core.dp_vote}
