"""The silo's handlers of the core's message types (``fedbridge.protocol``: discovery, and the messages several
methods send), and what every handler shares: reading a request (``silo_request``) and replying (``reply``). Each is
thin: the work is in ``Silo`` (``fedbridge/silo.py``). A method's own handlers are in its folder's ``handlers.py``,
whose ``HANDLERS`` table lists these by reference where the method sends them; ``fedbridge.client_app.register``
puts them on a ClientApp with fedbridge's mods. Nothing here imports server code."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedbridge import protocol as p
from fedbridge.silo import Silo, train_metrics


def reply(silo: Silo, msg: Message, metrics: dict, dp_slm: dict | None = None, **records) -> Message:
    """A reply with the metrics this silo's policy lets leave (``Silo.releasable``), the given records, and the
    privacy record of a DP SLM where one was trained (``dp_slm``)."""
    return Message(p.metrics_reply(silo.releasable(metrics), **records, **slm_privacy(dp_slm)), reply_to=msg)


def slm_privacy(privacy: dict | None) -> dict:
    """The ``slm-privacy`` record of a DP-trained SLM's privacy report, as reply records (none without one)."""
    return {p.SLM_PRIVACY: ConfigRecord(privacy)} if privacy else {}


def silo_request(msg: Message, context: Context) -> tuple[Silo, dict]:
    """The silo of this node and the request's config, after the checks every request passes: the protocol version
    and the deployed silo's caps on what one message may ask of it."""
    config = p.check_version(msg.content)
    silo = Silo.from_context(context)
    silo.limits.check_request(msg.content)  # a deployed silo's caps on what one message may ask of it
    return silo, dict(config)


def info(msg: Message, context: Context) -> Message:
    silo, _ = silo_request(msg, context)
    return reply(silo, msg, silo.info())


def _train_fresh_and_evaluate(msg: Message, context: Context, with_examples: bool) -> Message:
    silo, config = silo_request(msg, context)
    extra = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels)) if with_examples else None
    weight = p.read_number(config, "synthetic-weight", 1.0, low=0.0)
    global_test = p.read_global_test(msg.content, len(silo.labels))  # a malformed request fails before training
    model = silo.new_slm()
    stats = silo.train_slm(model, extra=extra, extra_weight=weight, experiment=p.read_experiment(config))
    metrics = silo.evaluate_slm(model, global_test)
    return reply(silo, msg, {**metrics, **silo.info(), **train_metrics(stats),
                             "train.synthetic": len(extra or ())}, stats.privacy)


def train_local(msg: Message, context: Context) -> Message:
    """Baseline ``local``: train a fresh SLM on private data only, then evaluate it."""
    return _train_fresh_and_evaluate(msg, context, with_examples=False)


def train_augmented(msg: Message, context: Context) -> Message:
    """FDKT, Private Evolution: train a fresh SLM on private + the server's examples, then evaluate it."""
    return _train_fresh_and_evaluate(msg, context, with_examples=True)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the server's SLM weights on the silo's test split (and the global test set, if sent)."""
    silo, _ = silo_request(msg, context)
    global_test = p.read_global_test(msg.content, len(silo.labels))
    model = silo.slm_from_arrays(p.read_arrays(msg.content))
    metrics = silo.evaluate_slm(model, global_test)
    return reply(silo, msg, {**metrics, "num-examples": len(silo.data.test), **silo.info()})


def dp_vote(msg: Message, context: Context) -> Message:
    """Private Evolution and every DP-scored method: the silo's DP nearest-neighbour vote histogram of the server's
    candidates; only the noisy histogram and its privacy cost leave."""
    silo, config = silo_request(msg, context)
    epsilon, releases, k, noise_seed = p.read_vote_request(config)
    candidates = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels))
    t0 = time.perf_counter()
    histogram, privacy = silo.dp_vote(candidates.texts, epsilon, releases, k, noise_seed, p.read_experiment(config))
    return reply(silo, msg, {"vote.candidates": len(candidates), "vote.seconds": time.perf_counter() - t0},
                 histogram=p.histogram_record(histogram), privacy=ConfigRecord(privacy))


# what every silo answers, whatever the methods it serves: discovery
DISCOVERY: dict[str, ClientAppCallable] = {p.INFO: info}
