"""fedbridge ClientApp: one thin handler per message type (see ``fedbridge.protocol``); the work is in ``Silo``."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from fedbridge import protocol as p
from fedbridge.faults import fault_mod
from fedbridge.silo import Silo

app = ClientApp(mods=[fault_mod])


def _silo(msg: Message, context: Context) -> tuple[Silo, dict]:
    config = p.check_version(msg.content)
    return Silo.from_context(context), dict(config)


@app.query("info")
def info(msg: Message, context: Context) -> Message:
    silo, _ = _silo(msg, context)
    return Message(p.metrics_reply(silo.info()), reply_to=msg)


def _train_fresh_and_evaluate(msg: Message, context: Context, with_examples: bool) -> Message:
    silo, config = _silo(msg, context)
    extra = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels)) if with_examples else None
    model, tok = silo.new_slm()
    stats = silo.train_slm(model, tok, extra=extra, extra_weight=float(config.get("synthetic-weight", 1.0)))
    metrics = silo.evaluate_slm(model, tok, p.read_global_test(msg.content, len(silo.labels)))
    return Message(p.metrics_reply({**metrics, **silo.info(), "train.seconds": stats.seconds,
                                    "train.examples": stats.examples, "train.synthetic": len(extra or ())}),
                   reply_to=msg)


@app.train("local")
def train_local(msg: Message, context: Context) -> Message:
    """Baseline ``local``: train a fresh SLM on private data only, then evaluate it."""
    return _train_fresh_and_evaluate(msg, context, with_examples=False)


@app.train("augmented")
def train_augmented(msg: Message, context: Context) -> Message:
    """FDKT: train a fresh SLM on private + the server's augmented examples, then evaluate it."""
    return _train_fresh_and_evaluate(msg, context, with_examples=True)


@app.query("synthesize")
def synthesize(msg: Message, context: Context) -> Message:
    """FDKT: write DP synthetic demonstrations; only they and their privacy cost leave the silo."""
    silo, _ = _silo(msg, context)
    examples, privacy, metrics = silo.synthesize(context.state)
    return Message(p.metrics_reply(metrics, examples=p.examples_record(examples), privacy=ConfigRecord(privacy)),
                   reply_to=msg)


@app.train()
def train_fedavg(msg: Message, context: Context) -> Message:
    """One FedAvg round: start from the server's weights, train locally, send weights back."""
    silo, config = _silo(msg, context)
    model, tok = silo.slm_from_arrays(msg.content[p.ARRAYS])
    stats = silo.train_slm(model, tok, epochs=int(config.get("epochs", silo.cfg.slm.epochs)))
    reply = p.metrics_reply({"num-examples": len(silo.data.train), "train.seconds": stats.seconds,
                             "train.examples": stats.examples, "train.loss": stats.final_loss},
                            arrays=ArrayRecord(model.state_dict()))
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the server's SLM weights on the silo's test split (and the global test set, if sent)."""
    silo, _ = _silo(msg, context)
    model, tok = silo.slm_from_arrays(msg.content[p.ARRAYS])
    metrics = silo.evaluate_slm(model, tok, p.read_global_test(msg.content, len(silo.labels)))
    return Message(p.metrics_reply({**metrics, "num-examples": len(silo.data.test), **silo.info()}), reply_to=msg)


@app.evaluate("llm")
def evaluate_llm(msg: Message, context: Context) -> Message:
    silo, _ = _silo(msg, context)
    return Message(p.metrics_reply({**silo.evaluate_llm(), **silo.info()}), reply_to=msg)
