"""The silo side of Social Learning: ``query.teach``, ``query.vote`` and ``query.share_raw``, each thin; the
teacher's work is in ``social/silo.py``."""

from __future__ import annotations

import time

from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedbridge import protocol as p
from fedbridge.handlers import reply, silo_request
from fedbridge.methods.social import silo as social
from fedbridge.methods.social.messages import SHARE_RAW, TEACH, VOTE
from fedbridge.methods.social.teaching import lesson_records


def teach(msg: Message, context: Context) -> Message:
    """Social Learning: the silo as a teacher writes synthetic examples or instructions from its private data; only
    they, how they were made and their privacy cost leave the silo."""
    silo, config = silo_request(msg, context)
    lesson = social.teach(silo, p.read_mode(config), experiment=p.read_experiment(config))
    return reply(silo, msg, lesson.metrics, **lesson_records(lesson))


def vote(msg: Message, context: Context) -> Message:
    """Social Learning: score the server's candidates against this teacher's held-out examples; only scores leave."""
    silo, config = silo_request(msg, context)
    mode = p.read_mode(config)
    if mode == "examples":
        candidates = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels))
        texts, labels = list(candidates.texts), list(candidates.labels)
    else:
        texts, labels = p.read_texts(msg.content, p.INSTRUCTIONS), None
    t0 = time.perf_counter()
    scores = social.vote(silo, mode, texts, labels, p.read_experiment(config))
    return reply(silo, msg, {"vote.candidates": len(texts), "vote.seconds": time.perf_counter() - t0},
                 votes=ConfigRecord({"scores": scores}))


def share_raw(msg: Message, context: Context) -> Message:
    """Social Learning's NON-PRIVATE upper bound only: n raw training examples (refused unless the run asks for it)."""
    silo, config = silo_request(msg, context)
    raw, privacy = social.share_raw(silo, int(p.read_number(config, "n", low=1, high=p.MAX_EXAMPLES, integer=True)),
                                    p.read_experiment(config))
    return reply(silo, msg, {"share.examples": len(raw)}, examples=p.examples_record(raw),
                 privacy=ConfigRecord(privacy))


HANDLERS: dict[str, ClientAppCallable] = {TEACH: teach, VOTE: vote, SHARE_RAW: share_raw}
