"""Baseline ``fedavg``: identical SLMs averaged with Flower's own FedAvg strategy.

Each round trains ``fedavg.local-epochs`` epochs per silo, so ``rounds`` x ``local-epochs`` epochs in all
(the default, 3 x 1, equals the ``local`` baseline's 3 epochs of compute).
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import ConfigError
from fedbridge.models.loading import load_slm
from fedbridge.models.slm import predict_proba
from fedbridge.strategies.base import Method, Session, mean_over_silos
from fedbridge.tasks import classification_metrics


@dataclass(frozen=True)
class FedAvgConfig:
    local_epochs: int = 1


def evaluate_shared_model(session: Session, arrays: ArrayRecord, round_: int) -> None:
    """One model for everyone: score it on the global test set here, and on each silo's test split there."""
    spec = session.cfg.slm.spec_for(0)
    model, tok = load_slm(spec, len(session.task.labels), seed=session.cfg.seed)
    model.load_state_dict(arrays.to_torch_state_dict())
    with session.phase("server-eval"):
        probs = predict_proba(model, tok, session.global_test.texts, max_length=session.cfg.slm.max_length)
        session.record.global_metrics.update(classification_metrics(session.global_test.labels, probs))
    with session.phase("silo-eval"):
        replies = session.broadcast(p.EVALUATE, p.request(arrays=arrays), round_=round_)
    session.record_silo_metrics(replies)
    mean_over_silos(session.record)


def single_slm_spec(session: Session, method: str) -> str:
    if len({session.cfg.slm.spec_for(i) for i in range(session.cfg.partition.num_silos)}) > 1:
        raise ConfigError(f"'{method}' needs one SLM architecture for all silos; slm.model lists several "
                          f"({session.cfg.slm.model}). Use a single spec.")
    return session.cfg.slm.spec_for(0)


class FedAvg(Method):
    name = "fedavg"
    description = "identical SLMs trained with Flower's FedAvg"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.options = from_flat(FedAvgConfig, cfg.method_options, "fedavg")

    def run(self, session: Session) -> None:
        cfg = self.options
        model, _ = load_slm(single_slm_spec(session, self.name), len(session.task.labels), seed=self.cfg.seed)
        n = len(session.silos)
        strategy = _RoundTaggedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n,
                                      min_available_nodes=n, arrayrecord_key=p.ARRAYS, configrecord_key=p.CONFIG)
        with session.phase("federated-training"):
            result = strategy.start(grid=session.grid, initial_arrays=ArrayRecord(model.state_dict()),
                                    num_rounds=self.cfg.rounds, timeout=self.cfg.timeout,
                                    train_config=ConfigRecord({"protocol": p.PROTOCOL_VERSION,
                                                               "epochs": cfg.local_epochs}))
        session.record.server_metrics.update(_train_losses(result.train_metrics_clientapp))
        evaluate_shared_model(session, result.arrays, round_=self.cfg.rounds + 1)


class _RoundTaggedFedAvg(FlowerFedAvg):
    """Flower's FedAvg sends with an empty group id; tag each message with its round so bytes meter by round."""

    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201 - Flower's signature
        messages = list(super().configure_train(server_round, arrays, config, grid))
        for msg in messages:
            msg.metadata.group_id = str(server_round)
        return messages


def _train_losses(per_round: dict[int, MetricRecord]) -> dict[str, float]:
    return {f"round-{r}.train-loss": float(m["train.loss"]) for r, m in per_round.items() if "train.loss" in m}
