"""Baseline ``fedavg``: identical SLMs averaged by one of Flower's own strategies (``fedavg.strategy``: FedAvg by
default, or FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, their
options in ``fedavg.strategy-options``), never re-implemented: fedbridge only hardens the round around it.

Each round trains ``fedavg.local-epochs`` epochs per silo, so ``rounds`` x ``local-epochs`` epochs in all (the
default, 10 x 5, is about what early stopping lets ``local`` train in head mode). Only what the SLM's mode trains
is averaged and moved: the head (head mode), the LoRA adapters and head (lora), or every weight (full). Replies are
validated before the strategy aggregates them (a bad one is a failure of its silo, not of the round), and the global
weights are checkpointed after every round, so a resumed run continues with the next round (a server optimizer's
moments, FedAdam's for example, start afresh then).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import flwr.serverapp.strategy as flower_strategies
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import ConfigError
from fedbridge.methods.base import AggregatorAxis, Method, RejectedReply, Session, mean_over_silos
from fedbridge.methods.fedavg.config import STRATEGIES, FedAvgConfig
from fedbridge.methods.fedavg.messages import TRAIN_FEDAVG
from fedbridge.models.loading import load_slm
from fedbridge.models.slm import predict_proba
from fedbridge.tasks import classification_metrics


def evaluate_shared_model(session: Session, arrays: ArrayRecord, round_: int) -> None:
    """One model for everyone: score it on the global test set here, and on each silo's test split there."""
    model = load_slm(session.cfg.slm.spec_for(0), len(session.task.labels), seed=session.cfg.seed,
                     weights=arrays.to_torch_state_dict(), options=session.cfg.slm, device=session.device)
    with session.phase("server-eval"):
        probs = predict_proba(model, session.global_test.texts)
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
    description = "identical SLMs averaged by a Flower strategy (fedavg.strategy: FedAvg, FedProx, FedAdam, Krum, ...)"
    dp_slm = True
    aggregator = AggregatorAxis("fedavg.strategy", STRATEGIES)

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.options = from_flat(FedAvgConfig, cfg.method_options, "fedavg")
        if cfg.slm.private and self.options.options().get("proximal_mu", 0.0):
            raise ConfigError("FedProx's proximal term is not clipped per example, so it cannot train a DP SLM "
                              "(slm.dp-epsilon). Use another fedavg.strategy, or proximal_mu=0.")

    def non_private(self) -> tuple[str, ...]:
        return () if self.cfg.slm.private else ("SLM weights",)  # a DP SLM's weights: post-processing

    def run(self, session: Session) -> None:
        cfg, ckpt = self.options, session.checkpoint
        model = load_slm(single_slm_spec(session, self.name), len(session.task.labels), seed=self.cfg.seed,
                         options=self.cfg.slm, device=session.device)
        done = max((int(step.removeprefix("round-")) for step in ckpt.steps("round-")), default=0)
        arrays = ArrayRecord(ckpt.load_arrays(f"global-round-{done}") if done else model.trainable_state())
        if done < self.cfg.rounds:
            n = len(session.silos)
            strategy = checked(cfg.strategy)(session, done, fraction_train=1.0, fraction_evaluate=0.0,
                                             min_train_nodes=n, min_available_nodes=n, arrayrecord_key=p.ARRAYS,
                                             configrecord_key=p.CONFIG, **cfg.options())
            with session.phase("federated-training"):
                arrays = strategy.start(grid=session.grid, initial_arrays=arrays, num_rounds=self.cfg.rounds - done,
                                        timeout=self.cfg.timeout,
                                        train_config=ConfigRecord({"protocol": p.PROTOCOL_VERSION,
                                                                   "epochs": cfg.local_epochs,
                                                                   p.EXPERIMENT: session.checkpoint.experiment})).arrays
        evaluate_shared_model(session, arrays, round_=self.cfg.rounds + 1)


TRAIN_METRICS = ("num-examples",)  # what a FedAvg train reply must carry; a silo that lets details leave adds
TRAIN_LOSS = "train.loss"  # ... its last training loss, averaged over the silos that sent one


def checked(name: str) -> type[Strategy]:
    """Flower's strategy ``name`` with fedbridge's checks around its rounds (``_Checked``)."""
    return type(f"Checked{name}", (_Checked, getattr(flower_strategies, name)), {})


class _Checked:
    """A mixin that hardens any of Flower's weight strategies for fedbridge (``checked``):
    - only the run's silos train (Flower would sample every connected node, also one that failed discovery);
    - rounds continue after ``rounds_done`` (a resumed run) and tag each message's group id, so bytes meter by round;
    - each reply is validated (the global model's keys, shapes and dtypes, finite weights, TRAIN_METRICS with at
      least one example); an invalid, erroring or missing reply is recorded as a failure of that silo, and the
      round averages the others (Flower's own check would abort the round, and NaN weights would poison it);
    - the strategy aggregates only the valid replies, each trimmed to its weights and example count;
    - after each round: the train loss and the silos averaged go to the record, the global weights to the checkpoint.
    """

    def __init__(self, session: Session, rounds_done: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.session, self.rounds_done = session, rounds_done
        self._global: ArrayRecord | None = None
        self._waiting: set[int] = set()
        self._sent: list[Message] = []

    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201 - Flower's signature
        round_ = server_round + self.rounds_done
        # Flower's sampling waits, without end, for min_available_nodes to be online: a silo whose host died would
        # hold the run forever. Wait for the silos at most `timeout`, then train those online; the others fail.
        online = self._online_silos(grid)
        if not online:
            raise RuntimeError(f"No silo online for FedAvg round {round_} within {self.session.cfg.timeout:.0f} s.")
        self.min_available_nodes = self.min_train_nodes = len(online)
        # Flower samples every connected node; a node that failed discovery is not one of this run's silos
        messages = [m for m in super().configure_train(round_, arrays, config, grid)
                    if m.metadata.dst_node_id in self.session.silos]
        self._global, self._waiting, self._sent = arrays, {m.metadata.dst_node_id for m in messages}, messages
        for msg in messages:
            msg.metadata.group_id = str(round_)
            self.session.event(msg.metadata.dst_node_id, "sent", TRAIN_FEDAVG, round_)
        for node in sorted(self.session.silos.keys() - self._waiting):
            self.session.fail(node, TRAIN_FEDAVG, round_, "offline when the round started")
        return messages

    def _online_silos(self, grid) -> set[int]:  # noqa: ANN001 - Flower's Grid
        deadline = time.monotonic() + self.session.cfg.timeout
        while (online := set(grid.get_node_ids()) & self.session.silos.keys()) != self.session.silos.keys():
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        return online

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        session, round_ = self.session, server_round + self.rounds_done
        valid: dict[int, tuple[Message, ArrayRecord, dict]] = {}
        requests = {m.metadata.message_id: m for m in self._sent}  # the grid set the ids

        def parse(content: RecordDict) -> tuple[ArrayRecord, dict]:
            arrays = p.read_arrays(content, p.ARRAYS, like=self._global)
            metrics = p.read_metrics(content, required=TRAIN_METRICS)
            p.read_number(metrics, "num-examples", low=1, integer=True)
            return arrays, metrics

        for reply in replies:
            # by the message it answers: the SuperLink's own error replies (node unavailable) come from node 1
            request = requests.get(reply.metadata.reply_to_message_id)
            node = request.metadata.dst_node_id if request else reply.metadata.src_node_id
            self._waiting.discard(node)
            try:
                arrays, metrics = session.accept(node, reply, TRAIN_FEDAVG, round_, parse)
            except RejectedReply as rejected:
                session.fail(node, TRAIN_FEDAVG, round_, str(rejected))
                continue
            valid[node] = (reply, arrays, metrics)
        for node in self._waiting:
            session.fail(node, TRAIN_FEDAVG, round_, f"no reply within {session.cfg.timeout:.0f} s")
        if not valid:
            raise session.no_silo_completed(f"FedAvg round {round_}")
        # only what aggregation reads: an extra record or metric from one silo would make Flower abort the round; a
        # record of its own (some strategies, FedMedian for one, empty the records they aggregate)
        trimmed = [Message(RecordDict({p.ARRAYS: ArrayRecord(dict(arrays.items())), p.METRICS: MetricRecord(
            {k: metrics[k] for k in TRAIN_METRICS})}), reply_to=requests[reply.metadata.reply_to_message_id])
            for reply, arrays, metrics in valid.values()]
        arrays, _ = super().aggregate_train(server_round, trimmed)
        if arrays is None:
            raise session.no_silo_completed(f"FedAvg round {round_} ({type(self).__name__} aggregated nothing)")
        # a server optimizer (FedAdam, FedYogi, FedAdagrad) computes in float64: the model's dtypes go back out
        arrays = ArrayRecord({k: v if v.dtype == self._global[k].dtype else
                              Array(v.numpy().astype(self._global[k].dtype)) for k, v in arrays.items()})
        losses = [(m["num-examples"], m[TRAIN_LOSS]) for _, _, m in valid.values() if TRAIN_LOSS in m]
        session.record.server_metrics[f"round-{round_}.silos"] = len(valid)
        if losses:
            weights, values = np.array(losses, dtype=float).T
            session.record.server_metrics[f"round-{round_}.train-loss"] = float(weights @ values / weights.sum())
        session.checkpoint.save_arrays(f"global-round-{round_}", arrays)
        session.checkpoint.complete(f"round-{round_}", silos=sorted(session.silo_name(n) for n in valid))
        session.checkpoint.delete(f"global-round-{round_ - 1}")
        return arrays, MetricRecord()
