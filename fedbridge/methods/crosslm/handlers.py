"""The silo side of CrossLM: ``train.private``, ``query.score``, ``query.upload`` and ``train.enhance``, each thin;
the kept SLM and what is done with it are in ``crosslm/silo.py``."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedbridge import protocol as p
from fedbridge.handlers import reply, silo_request
from fedbridge.methods.crosslm import silo as crosslm
from fedbridge.methods.crosslm.messages import ENHANCE, SCORE, TRAIN_PRIVATE, UPLOAD
from fedbridge.privacy.dp_votes import vote_shares


def _crosslm_round(config: dict) -> tuple[int, str, bool]:
    """A CrossLM request's round, experiment id and whether it is the silo's final round."""
    return (int(p.read_number(config, "round", 0, low=0, integer=True)), p.read_experiment(config),
            config.get("final", False) is True)


def train_private(msg: Message, context: Context) -> Message:
    """CrossLM: train a fresh SLM on private data and keep it for scoring and enhancement."""
    silo, config = silo_request(msg, context)
    global_test = p.read_global_test(msg.content, len(silo.labels))
    metrics, privacy = crosslm.train_private(silo, context.state, global_test, experiment=p.read_experiment(config))
    return reply(silo, msg, metrics, privacy)


def score(msg: Message, context: Context) -> Message:
    """CrossLM: S(y|x) of the server's batch ``round``: with a vote request in the config (``crosslm.scores=dp-votes``)
    the shares of the silo's DP nearest-neighbour votes, with their privacy cost; else the class probabilities of
    the SLM of the round before (released without DP unless that SLM is DP). Only these leave."""
    silo, config = silo_request(msg, context)
    round_, experiment, _ = _crosslm_round(config)
    examples = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels))
    t0, records = time.perf_counter(), {}
    if "epsilon" in config:
        epsilon, releases, k, noise_seed = p.read_vote_request(config)
        histogram, privacy = silo.dp_vote(examples.texts, epsilon, releases, k, noise_seed, experiment)
        probs, records = vote_shares(histogram), {"privacy": ConfigRecord(privacy)}
    else:
        crosslm.release_kept(silo, context.state, "SLM scores", experiment)
        probs = crosslm.score(silo, context.state, examples.texts, max(round_ - 1, 0), experiment)
    agreement = float((probs.argmax(axis=1) == np.array(examples.labels)).mean()) if len(examples) else 0.0
    metrics = {"score.examples": len(examples), "score.seconds": time.perf_counter() - t0, "score.agreement": agreement}
    return reply(silo, msg, metrics, scores=p.probabilities_record(probs), **records)


def upload(msg: Message, context: Context) -> Message:
    """CrossLM with score-on=server (opt-in, weaker privacy): the weights and spec of the SLM after ``round``."""
    silo, config = silo_request(msg, context)
    round_, experiment, _ = _crosslm_round(config)
    crosslm.release_kept(silo, context.state, "SLM weights", experiment)
    model = crosslm.kept_slm(silo, context.state, round_, experiment)
    return reply(silo, msg, silo.info(), arrays=ArrayRecord(model.trainable_state()),
                 slm=ConfigRecord({"spec": silo.cfg.slm.spec_for(silo.index)}))


def enhance(msg: Message, context: Context) -> Message:
    """CrossLM round ``round``: fine-tune the SLM on the server's selected examples, or keep the weights the server
    enhanced."""
    silo, config = silo_request(msg, context)
    round_, experiment, final = _crosslm_round(config)
    global_test = p.read_global_test(msg.content, len(silo.labels))
    if p.ARRAYS in msg.content:
        arrays = p.read_arrays(msg.content, like=context.state.get(crosslm.KEPT_SLM))
        return reply(silo, msg, crosslm.install_slm(silo, context.state, arrays, global_test, round_, experiment, final))
    examples = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels))
    targets = (p.read_probabilities(msg.content, p.TARGETS, len(examples), len(silo.labels))
               if p.TARGETS in msg.content else None)
    metrics = crosslm.enhance(silo, context.state, examples, targets,
                              epochs=int(p.read_number(config, "epochs", 0, low=0, high=1000, integer=True)),
                              weight=float(p.read_number(config, "synthetic-weight", 1.0, low=0.0)),
                              with_private=config.get("with-private", False) is True, global_test=global_test,
                              round_=max(round_, 1), experiment=experiment, final=final)
    return reply(silo, msg, metrics)


HANDLERS: dict[str, ClientAppCallable] = {TRAIN_PRIVATE: train_private, SCORE: score, UPLOAD: upload,
                                          ENHANCE: enhance}
