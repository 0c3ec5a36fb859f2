"""A silo: its private data, its SLM, its privacy policy and ledger, and the one path every DP release takes
(``Silo.dp_release``). What a silo does for one method is in that method's ``silo.py``; the ClientApp handlers only
translate messages.

Where the data comes from:
  simulation  ``node_config["partition-id"]`` selects one partition of the configured task;
  deployment  ``node_config["data-path"]`` (plus optional ``text-column``/``label-column``) is the silo's own file.
State that must outlive a run (the lifetime privacy ledger of its data, CrossLM's latest SLM) lives in
``node_config["state-dir"]`` (default ``~/.cache/fedbridge/silo-state``), on the silo's own disk.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import torch
from flwr.app import ArrayRecord, Context

from fedbridge.checkpoint import DEFAULT_SILO_STATE_DIR, atomic_write
from fedbridge.config import ExperimentConfig, TaskConfig
from fedbridge.errors import ConfigError
from fedbridge.models.device import resolve_device
from fedbridge.models.llm import load_silo_llm
from fedbridge.models.loading import load_slm
from fedbridge.models.slm import SLM, SLMOptions, TrainStats, predict_proba, train_classifier, validation_split
from fedbridge.privacy import (
    PrivacyEvent,
)
from fedbridge.privacy.accounting import calibrate_noise, compute_epsilon
from fedbridge.privacy.canaries import plant_canaries
from fedbridge.privacy.dp_slm import MECHANISM as DP_SLM
from fedbridge.privacy.dp_slm import dp_plan, dp_train_classifier
from fedbridge.privacy.dp_votes import VoteRelease, dp_vote
from fedbridge.privacy.policy import MetricsBudget, RunLedger, SiloLedger, SiloLimits, SiloPolicy, data_identity
from fedbridge.tasks import (
    Examples,
    SiloData,
    SiloFile,
    classification_metrics,
    load_federation,
    load_task,
    silo_from_file,
)
from fedbridge.tasks.task import BUILTIN_TASKS


class Release(Protocol):
    """What a DP mechanism reports of one release (``SynthesisResult``, ``DPTraining``)."""

    mechanism: str
    epsilon: float
    noise_multiplier: float
    steps: int


R = TypeVar("R", bound=Release)


@dataclass
class DPTraining:
    """One DP-SGD training of a silo's SLM: how it went, and what it cost."""

    stats: TrainStats
    mechanism: str
    epsilon: float
    noise_multiplier: float
    steps: int


@dataclass(frozen=True)
class Silo:
    index: int
    cfg: ExperimentConfig
    labels: tuple[str, ...]
    data: SiloData
    state_dir: Path = DEFAULT_SILO_STATE_DIR  # node config 'state-dir': state that outlives a run
    policy: SiloPolicy = SiloPolicy()  # node config: what this silo lets leave (fedbridge.privacy.policy)
    device_setting: str = "auto"  # node config 'device', else the run's device.silo
    source_id: str = ""  # a deployed silo: its data file's identity (``silo_from_file``); "" = its examples' hash
    limits: SiloLimits = field(default_factory=lambda: SiloLimits.unlimited())  # what it lets the server ask of it

    @functools.cached_property
    def device(self) -> torch.device:
        """Where this silo's models run, resolved on the silo's own machine."""
        return resolve_device(self.device_setting, "this silo's device (node config 'device' or device.silo)")

    @property
    def name(self) -> str:
        return f"silo-{self.index}"

    @classmethod
    def from_context(cls, context: Context) -> Silo:
        return _silo(tuple(sorted(context.run_config.items())), tuple(sorted(context.node_config.items())))

    # ------------------------------------------------------------ SLM

    def new_slm(self, weights: Mapping[str, torch.Tensor] | None = None) -> SLM:
        """This silo's SLM: fresh for training, or with ``weights`` (its ``trainable_state()``). Its token length is
        fitted to the silo's own training texts, so every SLM the silo builds (kept, reloaded, enhanced) reads
        texts the same way."""
        model = load_slm(self.cfg.slm.spec_for(self.index), len(self.labels), self.cfg.seed + self.index, weights,
                         self.cfg.slm, self.device)
        model.fit_max_length(self.data.train.texts)
        return model

    def slm_from_arrays(self, arrays: ArrayRecord) -> SLM:
        return self.new_slm(arrays.to_torch_state_dict())

    @functools.cached_property
    def private_split(self) -> tuple[Examples, Examples]:
        """The private training split as (fit, validation): the validation part only chooses the epoch to keep
        (early stopping), so no synthetic example and no test example ever decides it."""
        train = self.data.train
        fraction = 0.0 if self.cfg.slm.private else self.cfg.slm.validation_fraction  # DP: no choice on private data
        fit, val = validation_split(train.labels, fraction, self.cfg.seed + self.index)
        return (Examples.of([train.texts[i] for i in fit], [train.labels[i] for i in fit]),
                Examples.of([train.texts[i] for i in val], [train.labels[i] for i in val]))

    def train_slm(self, model: SLM, epochs: int | None = None, extra: Examples | None = None,
                  extra_weight: float = 1.0, private: bool = True, soft: np.ndarray | None = None,
                  seed: int = 0, progress: str = "train", experiment: str = "", trainings: int = 1,
                  proximal_mu: float = 0.0) -> TrainStats:
        """Train on the private fit split (``private``) plus optional extra (e.g. synthetic) examples with their
        loss weight, and hard labels or ``soft`` targets for the extra ones. ``epochs=None``: the SLM's own recipe,
        the epoch chosen on the private validation split; a number: exactly that many epochs on all private data
        (FedAvg's local epochs). With ``slm.dp-epsilon`` and private data, DP-SGD (``_train_dp``) of one of the
        ``trainings`` this run makes on this silo. ``proximal_mu``: FedProx's proximal term."""
        fit, val = self.private_split if epochs is None else (self.data.train, Examples.of([], []))
        own = fit if private else Examples.of([], [])
        texts, weights = [*own.texts, *(extra.texts if extra else ())], [1.0] * len(own) + [extra_weight] * len(extra or ())
        targets = list(own.labels) + list(extra.labels if extra else ())
        if soft is not None:
            targets = np.concatenate([np.eye(len(self.labels))[list(own.labels)].reshape(-1, len(self.labels)), soft])
        options = self.cfg.slm.options() if epochs is None else self.cfg.slm.options(epochs=epochs)
        if options.private and len(own):
            if proximal_mu:
                raise ConfigError(f"{self.name}: FedProx's proximal term is not clipped per example, so it cannot "
                                  "train a DP SLM (slm.dp-epsilon). Use another fedavg.strategy, or proximal_mu=0.")
            return self._train_dp(model, texts, targets, weights, len(own), options, experiment, trainings, progress)
        return train_classifier(model, texts, targets, options, weights, seed=self.cfg.seed + self.index + seed,
                                progress=f"{self.name} {progress}",
                                validation=(val.texts, val.labels) if len(val) else None, proximal_mu=proximal_mu)

    def _train_dp(self, model: SLM, texts: list[str], targets, weights: list[float], n_private: int,
                  options: SLMOptions, experiment: str, trainings: int, progress: str) -> TrainStats:
        """DP-SGD of the SLM's head, charged to this silo's ledger under the run's SLM budget (``slm.dp-epsilon``,
        its own cap beside the run's other releases): σ is calibrated so that ``trainings`` trainings like this one
        (FedAvg: one per round) compose to that ε. q comes from a public bound (``count_bound``) plus the public
        extra examples."""
        bound = (self.count_bound(per_label=False) or n_private) + len(texts) - n_private
        sample_rate, steps = dp_plan(bound, options)

        def release(ledger: RunLedger, noise_seed: int | None) -> DPTraining:
            sigma = calibrate_noise(options.dp_epsilon, ledger.delta,
                                    lambda s: [PrivacyEvent(s, sample_rate, steps * trainings, DP_SLM)])
            event = PrivacyEvent(sigma, sample_rate, steps, DP_SLM)
            ledger.charge(event)
            stats = dp_train_classifier(model, texts, targets, options, event, weights, noise_seed,
                                        progress=f"{self.name} DP {progress}")
            return DPTraining(stats, DP_SLM, compute_epsilon([event], ledger.delta), sigma, steps)

        result, privacy = self.dp_release("a DP SLM", options.dp_epsilon, -1, f"{experiment}/slm" if experiment
                                          else "", release)
        result.stats.privacy = privacy
        return result.stats

    def evaluate_slm(self, model: SLM, global_test: Examples | None = None) -> dict[str, float]:
        splits = {"silo-test": self.data.test, **({"global-test": global_test} if global_test is not None else {})}
        out: dict[str, float] = {}
        for split, ex in splits.items():
            probs = predict_proba(model, ex.texts)
            out.update({f"{split}.{k}": v for k, v in classification_metrics(ex.labels, probs).items()})
        return out

    # ------------------------------------------------------------ DP votes on server-written text

    def features(self, texts: Sequence[str]) -> np.ndarray:
        """Features of ``texts`` by this silo's pretrained SLM encoder (frozen, its pooling), each read with at most
        ``VOTE_MAX_TOKENS`` tokens: a fixed length, so one record's features never depend on another record (a
        length fitted to the private texts would let one record move every vote)."""
        options = self.cfg.slm.options(mode="head", max_length=VOTE_MAX_TOKENS)
        model = load_slm(self.cfg.slm.spec_for(self.index), len(self.labels), 0, None, options, self.device)
        return model.frozen_features(list(texts)).float().cpu().numpy()

    def dp_vote(self, candidates: Sequence[str], epsilon: float, releases: int, k: int, requested_seed: int,
                experiment: str = "") -> tuple[np.ndarray, dict]:
        """The silo's DP nearest-neighbour vote histogram (candidates x labels) of the server's candidates, from
        its private training split (``fedbridge.privacy.dp_votes``): one release of the ``releases`` the run plans at
        ``epsilon``, charged to the lifetime ledger. Returns the noisy histogram and its privacy record.

        The same request in the same experiment gets the same answer from the silo's disk, charged once: a resumed
        server that asks again spends nothing, and a server that repeats a query cannot average the noise away."""
        train = self.data.train
        asked = json.dumps([list(candidates), epsilon, releases, k, requested_seed])
        answered = (self.state_dir / experiment / "votes" / self.data_id /  # this data's answer (silos share hosts)
                    f"{hashlib.sha256(asked.encode()).hexdigest()[:32]}.json" if experiment else None)
        if answered is not None and answered.exists():
            kept = json.loads(answered.read_text())
            return np.array(kept["histogram"]).reshape(len(candidates), len(self.labels)), kept["privacy"]

        def release(ledger: RunLedger, noise_seed: int | None) -> VoteRelease:
            return dp_vote(self.features(train.texts), train.labels, self.features(candidates), len(self.labels), k,
                           epsilon, releases, ledger, noise_seed)

        # its own run cap beside the run's other releases (the pipeline's demonstrations); the lifetime composes all
        result, privacy = self.dp_release("DP votes", epsilon, requested_seed, f"{experiment}/votes" if experiment
                                          else "", release)
        if answered is not None:
            atomic_write(answered, json.dumps({"histogram": result.histogram.reshape(-1).tolist(), "privacy": privacy}))
        return result.histogram, privacy

    # ------------------------------------------------------------ LLM

    def evaluate_llm(self) -> dict[str, float]:
        """The public LLM, run inside the silo on the silo's own test split (no data leaves), asked through the
        silo's LLM interface (``load_silo_llm``: fedbridge's unless ``llm.engine=vllm``)."""
        llm = load_silo_llm(self.cfg.llm, self.cfg.llm.model, self.device)
        task = load_task(self.cfg.task, self.cfg.seed)
        t0 = time.perf_counter()
        probs = llm.label_probabilities(self.data.test.texts, self.labels, task.instruction,
                                        batch_size=self.cfg.llm.batch_size, max_tokens=self.cfg.llm.max_length,
                                        progress=f"{self.name} llm", calibrate=self.cfg.llm.calibrate)
        metrics = {f"silo-test.{k}": v for k, v in classification_metrics(self.data.test.labels, probs).items()}
        return {**metrics, "llm.seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------ privacy: what may leave, and what it costs

    @functools.cached_property
    def data_id(self) -> str:
        """The identity of this silo's data: its lifetime privacy ledger's name. A deployed silo's is its file's
        (every row, whatever the order, the sampling or the split); a simulated partition's, a hash of its examples."""
        return self.source_id or data_identity([*self.data.train.texts, *self.data.test.texts],
                             [*self.data.train.labels, *self.data.test.labels])

    def run_ledger(self, run_budget: float, experiment: str = "") -> RunLedger:
        """This run's view of the silo's lifetime ledger (a file in ``state_dir``, per data identity): every charge
        is composed with every earlier release of this data, whichever run, experiment or method made it."""
        return RunLedger(SiloLedger(self.state_dir / "privacy" / f"{self.data_id}.json", self.policy), experiment,
                         run_budget)

    def dp_release(self, what: str, run_budget: float, requested_seed: int, experiment: str,
                   release: Callable[[RunLedger, int | None], R]) -> tuple[R, dict]:
        """Every DP release of this silo goes through here: the silo's policy decides whether a non-private (ε = ∞)
        release or a server-chosen noise seed is allowed, the run's ledger view refuses when nothing is left, and
        ``release(ledger, noise_seed)`` calibrates, charges and runs the mechanism. Returns its result and the
        privacy record that leaves with it (whatever was charged stays charged, also when the mechanism fails)."""
        if math.isinf(run_budget):
            self.policy.require_non_private(self.name, f"{what} without DP (epsilon=inf)")
        seed, private = self.policy.noise_seed_for(self.name, requested_seed)
        ledger = self.run_ledger(run_budget, experiment)
        ledger.check_can_release(self.name)
        # a seeded silo draws fresh noise for every release: the seed, its index and how many charges its data has had
        noise_seed = None if seed is None else release_seed(seed, self.index, ledger.ledger.charges())
        result = release(ledger, noise_seed)
        mechanism = result.mechanism if private else f"{result.mechanism} with a server-chosen noise seed (non-private)"
        return result, ledger.record(mechanism, result.epsilon, result.noise_multiplier, result.steps, private)

    def non_private_release(self, what: str, experiment: str = "") -> dict:
        """A release without DP (SLM weights, scores, votes, raw examples, non-DP teaching): allowed only by the
        silo's policy, and recorded in its lifetime ledger (after it, no finite ε holds for this data)."""
        self.policy.require_non_private(self.name, what)
        ledger = self.run_ledger(math.inf, experiment)
        if not any(e.mechanism == what for e in ledger.events):  # once per run and kind
            ledger.charge(PrivacyEvent(0.0, 1.0, 1, what))
        return ledger.record(f"{what} (non-private)", math.inf, 0.0, 0, private=False)

    def release_slm(self, what: str, experiment: str = "") -> None:
        """SLM weights or scores leave: post-processing of a DP-trained SLM (``slm.dp-epsilon``, charged when it
        trained), else a non-private release that the silo's policy must allow."""
        if not self.cfg.slm.private:
            self.non_private_release(what, experiment)

    def count_bound(self, per_label: bool = True) -> int:
        """The public bound that sets a mechanism's sampling rate: the silo's declared ``count-bound`` (per label;
        x labels for the whole set); without one, 0 (the exact counts) if non-private details may leave, else the
        smallest count that gives q = 1 (nothing about the counts is used)."""
        if self.policy.count_bound:
            return self.policy.count_bound * (1 if per_label else len(self.labels))
        return 0 if self.policy.allow_non_private else 1

    def info(self) -> dict[str, int]:
        """Partition id and example counts; the counts are exact only where non-private details may leave (0 =
        withheld)."""
        shown = self.policy.allow_non_private
        return {"partition-id": self.index, "num-train": len(self.data.train) if shown else 0,
                "num-test": len(self.data.test) if shown else 0}

    def releasable(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The metrics a reply may carry: all of them, or, where non-private details may not leave, none that grows
        with the private data (seconds, example and token counts), is a training loss on it or an epoch chosen on
        it; and scores of a model on the silo's test split or the server's texts only within the node config's
        ``metrics-budget`` (each such reply is a query of the private data or of a non-DP model; past the budget
        they are withheld and the reply says ``metrics-withheld``). Every record labels silo-test scores non-private."""
        if self.policy.allow_non_private and self.policy.metrics_budget is None:
            return dict(metrics)
        kept = dict(metrics) if self.policy.allow_non_private else {
            k: v for k, v in metrics.items() if k in ("partition-id", "num-train", "num-test")
            or not any(word in k for word in COUNT_DERIVED)}
        scores = [k for k in kept if "test." in k]
        if scores and not MetricsBudget(self.state_dir / "metrics-budget" / f"{self.data_id}.json",
                                        self.policy.metrics_budget).take():
            kept = {k: v for k, v in kept.items() if k not in scores} | {"metrics-withheld": 1}
        return kept


def release_seed(seed: int, index: int, charges: int) -> int:
    """The noise seed of one release of a silo with a fixed seed: never the same twice for one data source (the
    same noise in two releases would let the server subtract it)."""
    return int(np.random.SeedSequence([seed, index, charges]).generate_state(1)[0])


def train_metrics(stats: TrainStats) -> dict[str, float]:
    """What a silo reports about one SLM training: seconds, examples seen, epochs run and the epoch kept."""
    return {"train.seconds": stats.seconds, "train.examples": stats.examples, "train.epochs": stats.epochs,
            "train.best-epoch": stats.best_epoch, "train.validation": stats.validation}


VOTE_MAX_TOKENS = 128  # tokens each text is read with for DP votes (public, fixed)
COUNT_DERIVED = ("seconds", "examples", "validation", "tokens", "num-", "epoch", ".n", "loss")  # and a loss


@functools.lru_cache(maxsize=16)
def _silo(run_items: tuple, node_items: tuple) -> Silo:
    """One Silo per (run config, node config) per process: data is loaded and split once."""
    cfg, node = ExperimentConfig.from_run_config(dict(run_items)), dict(node_items)
    if "partition-id" not in node:
        raise ConfigError("This SuperNode has no 'partition-id' in its node config. Start it with "
                          "--node-config \"partition-id=<k> ...\" (and data-path=<file> for its own data).")
    index, source_id, limits = int(node["partition-id"]), "", SiloLimits.unlimited()
    if "data-path" in node:  # a deployed silo: its node config alone defines its data and what it runs
        limits = SiloLimits.from_node_config(node)
        limits.check(dict(run_items))
        labels = deployed_labels(cfg.task, node)
        data, source_id = silo_from_file(SiloFile.from_node_config(node), labels)
        if _node_flag(node, "canaries", "allow"):  # planted only where the silo opted in, at most its cap of copies
            copies = min(cfg.canaries.copies, int(node.get("canary-copies", 1)))
            data = plant_canaries(data, dataclasses.replace(cfg.canaries, copies=copies), cfg.seed, index)
    else:
        labels = load_task(cfg.task, cfg.seed).labels
        federation = load_federation(cfg.task, cfg.partition, cfg.seed)
        if not 0 <= index < len(federation.silos):
            raise ConfigError(f"partition-id {index} is outside 0..{len(federation.silos) - 1} "
                              f"(partition.num-silos={cfg.partition.num_silos}). Match num-supernodes to it.")
        data = plant_canaries(federation.silos[index], cfg.canaries, cfg.seed, index)  # canaries.enabled: leaks
    return Silo(index, cfg, labels, data, Path(str(node.get("state-dir", DEFAULT_SILO_STATE_DIR))).expanduser(),
                SiloPolicy.from_node_config(node), str(node.get("device", cfg.device.silo)), source_id, limits)


def deployed_labels(task: TaskConfig, node: Mapping) -> tuple[str, ...]:
    """A deployed silo's label set, in the server's order (label indices must agree): the server's declared labels
    (``task.labels``, or a built-in task's fixed set), checked against the node config's ``labels`` where it has
    them; never read from the data (a server-chosen column would make private values a public vocabulary)."""
    declared = task.labels or (BUILTIN_TASKS[task.name].labels if task.name in BUILTIN_TASKS else ())
    own = tuple(s.strip() for s in str(node.get("labels", "")).split(",") if s.strip())
    if own and declared and set(own) != set(declared):
        raise ConfigError("The run's label set differs from this silo's node config 'labels'. Run with the "
                          "silo's labels in task.labels.")
    if not declared and not own:
        raise ConfigError("This silo does not know its label set: the run sends no task.labels and its node config "
                          "has no 'labels'. Set task.labels in the run config, or labels=... in the node config.")
    return declared or tuple(sorted(own))


def _node_flag(node: Mapping, key: str, allowed: str) -> bool:
    value = str(node.get(key, "")).strip().lower()
    if value not in ("", allowed, "deny"):
        raise ConfigError(f"Node config {key}={value!r}: use {allowed} or deny.")
    return value == allowed
