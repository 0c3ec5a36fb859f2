"""Baseline ``centralized``: one SLM trained on all silos' data pooled. A NON-PRIVATE upper bound.

Only meaningful in simulation, where the server can load every partition; it moves raw private data.
"""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedbridge.models.loading import load_slm
from fedbridge.models.slm import train_classifier
from fedbridge.strategies.base import Method, Session
from fedbridge.strategies.fedavg import evaluate_shared_model, single_slm_spec
from fedbridge.tasks import load_federation


class Centralized(Method):
    name = "centralized"
    description = "one SLM on all silos' data pooled (non-private upper bound, simulation only)"
    note = "centralized: non-private upper bound; raw data pooled on the server"

    def run(self, session: Session) -> None:
        federation = load_federation(self.cfg.task, self.cfg.partition, self.cfg.seed)
        texts = [t for s in federation.silos for t in s.train.texts]
        labels = [y for s in federation.silos for y in s.train.labels]
        model, tok = load_slm(single_slm_spec(session, self.name), len(session.task.labels), seed=self.cfg.seed)
        with session.phase("server-train"):
            train_classifier(model, tok, texts, labels, self.cfg.slm.train_config(), seed=self.cfg.seed,
                             progress="centralized train")
        evaluate_shared_model(session, ArrayRecord(model.state_dict()), round_=1)
