"""Baseline ``local``: every silo trains its SLM on its own data; nothing but metrics leaves a silo."""

from __future__ import annotations

from fedbridge import protocol as p
from fedbridge.methods.base import Method, Session, mean_over_silos


class Local(Method):
    name = "local"
    description = "each silo trains only on its own data (no knowledge transfer)"
    dp_slm = True

    def run(self, session: Session) -> None:
        with session.phase("silo-train-eval"):
            replies = session.broadcast(p.TRAIN_LOCAL, p.request(global_test=session.global_test), round_=1)
        session.record_silo_metrics(replies)
        mean_over_silos(session.record)
