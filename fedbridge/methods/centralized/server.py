"""Baseline ``centralized``: one SLM trained on all silos' data pooled. A NON-PRIVATE upper bound.

Only meaningful in simulation, where the server can load every partition; it moves raw private data.
"""

from __future__ import annotations

from flwr.app import ArrayRecord

from fedbridge.config import ExperimentConfig
from fedbridge.methods.base import Method, Session
from fedbridge.methods.fedavg.server import evaluate_shared_model, single_slm_spec
from fedbridge.models.loading import load_slm
from fedbridge.models.slm import SLM, TrainStats, train_classifier, validation_split
from fedbridge.tasks import Federation, load_federation


def train_pooled(cfg: ExperimentConfig, federation: Federation, spec: str) -> tuple[SLM, TrainStats]:
    """One SLM on every silo's training split pooled, with the epoch chosen on a validation part of the pool, as
    each silo chooses its own."""
    texts = [t for s in federation.silos for t in s.train.texts]
    labels = [y for s in federation.silos for y in s.train.labels]
    fit, val = validation_split(labels, cfg.slm.validation_fraction, cfg.seed)
    model = load_slm(spec, len(federation.task.labels), seed=cfg.seed, options=cfg.slm,
                     device=cfg.device.for_server())  # the pool is on the server
    stats = train_classifier(model, [texts[i] for i in fit], [labels[i] for i in fit], cfg.slm, seed=cfg.seed,
                             progress="centralized train",
                             validation=([texts[i] for i in val], [labels[i] for i in val]) if val else None)
    return model, stats


class Centralized(Method):
    name = "centralized"
    description = "one SLM on all silos' data pooled (non-private upper bound, simulation only)"
    note = "centralized: non-private upper bound; raw data pooled on the server"

    def non_private(self) -> tuple[str, ...]:
        return ("raw examples",)

    def run(self, session: Session) -> None:
        federation = load_federation(self.cfg.task, self.cfg.partition, self.cfg.seed)
        with session.phase("server-train"):
            model, stats = train_pooled(self.cfg, federation, single_slm_spec(session, self.name))
        session.record.server_metrics.update({"train.seconds": stats.seconds, "train.epochs": stats.epochs,
                                              "train.best-epoch": stats.best_epoch})
        evaluate_shared_model(session, ArrayRecord(model.trainable_state()), round_=1)
