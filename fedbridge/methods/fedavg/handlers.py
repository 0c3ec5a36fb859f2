"""The silo side of baseline ``fedavg``: its ``train`` rounds, and the core's ``evaluate``."""

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedbridge import handlers as core
from fedbridge import protocol as p
from fedbridge.methods.fedavg.messages import TRAIN_FEDAVG


def train_fedavg(msg: Message, context: Context) -> Message:
    """One FedAvg round: start from the server's weights, train locally, send weights back."""
    silo, config = core.silo_request(msg, context)
    epochs = p.read_number(config, "epochs", 1, low=0, high=1000, integer=True)
    proximal_mu = float(p.read_number(config, "proximal-mu", 0.0, low=0.0))  # FedProx's strategy sends it
    arrays = p.read_arrays(msg.content)
    experiment = p.read_experiment(config)
    silo.release_slm("SLM weights", experiment)
    model = silo.slm_from_arrays(arrays)
    stats = silo.train_slm(model, epochs=int(epochs), experiment=experiment, trainings=silo.cfg.rounds,
                           proximal_mu=proximal_mu)
    # FedAvg weights each silo by num-examples: the exact count only where non-private details may leave
    weight = len(silo.data.train) if silo.policy.allow_non_private else 1
    return Message(p.metrics_reply({"num-examples": weight, **silo.releasable(
        {"train.seconds": stats.seconds, "train.examples": stats.examples, "train.loss": stats.final_loss})},
        arrays=ArrayRecord(model.trainable_state()), **core.slm_privacy(stats.privacy)), reply_to=msg)


HANDLERS: dict[str, ClientAppCallable] = {TRAIN_FEDAVG: train_fedavg, p.EVALUATE: core.evaluate}
