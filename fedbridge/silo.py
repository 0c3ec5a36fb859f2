"""A silo: its private data, its SLM, and what it does with them. The ClientApp handlers only translate messages.

Where the data comes from:
  simulation  ``node_config["partition-id"]`` selects one partition of the configured task;
  deployment  ``node_config["data-path"]`` (plus optional ``text-column``/``label-column``) is the silo's own file.
State that must outlive a run (the privacy ledger of each experiment, CrossLM's latest SLM) lives in
``node_config["state-dir"]``
(default ``~/.cache/fedbridge/silo-state``), on the silo's own disk.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedbridge.checkpoint import DEFAULT_SILO_STATE_DIR, PersistentLedger, atomic_write, save_tensors
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import ConfigError, PrivacyBudgetExceeded
from fedbridge.models.loading import load_llm, load_slm
from fedbridge.models.llm_classifier import label_probabilities
from fedbridge.models.slm import SLM, TrainStats, predict_proba, train_classifier, validation_split
from fedbridge.privacy import DPFewShotConfig, DPSGDConfig, PrivacyLedger, dp_fewshot_synthesize, dp_sgd_synthesize
from fedbridge.privacy.audit import plant_canaries
from fedbridge.privacy.canaries import CopyDetector
from fedbridge.privacy.dp_fewshot import sigma_for_epsilon
from fedbridge.protocol import ProtocolError
from fedbridge.strategies.fdkt import FDKTConfig
from fedbridge.strategies.social import (
    NON_PRIVATE,
    Lesson,
    SocialConfig,
    public_top_k,
    social_options,
    vote_scores,
    write_examples,
    write_instruction,
)
from fedbridge.tasks import Examples, SiloData, classification_metrics, load_federation, load_task, silo_from_file
from fedbridge.tasks.task import BUILTIN_TASKS


@dataclass(frozen=True)
class Silo:
    index: int
    cfg: ExperimentConfig
    labels: tuple[str, ...]
    data: SiloData
    state_dir: Path = DEFAULT_SILO_STATE_DIR  # node config 'state-dir': state that outlives a run

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
                         self.cfg.slm)
        model.fit_max_length(self.data.train.texts)
        return model

    def slm_from_arrays(self, arrays: ArrayRecord) -> SLM:
        return self.new_slm(arrays.to_torch_state_dict())

    @functools.cached_property
    def private_split(self) -> tuple[Examples, Examples]:
        """The private training split as (fit, validation): the validation part only chooses the epoch to keep
        (early stopping), so no synthetic example and no test example ever decides it."""
        train = self.data.train
        fit, val = validation_split(train.labels, self.cfg.slm.validation_fraction, self.cfg.seed + self.index)
        return (Examples.of([train.texts[i] for i in fit], [train.labels[i] for i in fit]),
                Examples.of([train.texts[i] for i in val], [train.labels[i] for i in val]))

    def train_slm(self, model: SLM, epochs: int | None = None, extra: Examples | None = None,
                  extra_weight: float = 1.0, private: bool = True, soft: np.ndarray | None = None,
                  seed: int = 0, progress: str = "train") -> TrainStats:
        """Train on the private fit split (``private``) plus optional extra (e.g. synthetic) examples with their
        loss weight, and hard labels or ``soft`` targets for the extra ones. ``epochs=None``: the SLM's own recipe,
        the epoch chosen on the private validation split; a number: exactly that many epochs on all private data
        (FedAvg's local epochs)."""
        fit, val = self.private_split if epochs is None else (self.data.train, Examples.of([], []))
        own = fit if private else Examples.of([], [])
        texts, weights = [*own.texts, *(extra.texts if extra else ())], [1.0] * len(own) + [extra_weight] * len(extra or ())
        targets = list(own.labels) + list(extra.labels if extra else ())
        if soft is not None:
            targets = np.concatenate([np.eye(len(self.labels))[list(own.labels)].reshape(-1, len(self.labels)), soft])
        options = self.cfg.slm.options() if epochs is None else self.cfg.slm.options(epochs=epochs)
        return train_classifier(model, texts, targets, options, weights, seed=self.cfg.seed + self.index + seed,
                                progress=f"{self.name} {progress}",
                                validation=(val.texts, val.labels) if len(val) else None)

    def evaluate_slm(self, model: SLM, global_test: Examples | None = None) -> dict[str, float]:
        splits = {"silo-test": self.data.test, **({"global-test": global_test} if global_test is not None else {})}
        out: dict[str, float] = {}
        for split, ex in splits.items():
            probs = predict_proba(model, ex.texts)
            out.update({f"{split}.{k}": v for k, v in classification_metrics(ex.labels, probs).items()})
        return out

    # ------------------------------------------------------------ LLM

    def evaluate_llm(self) -> dict[str, float]:
        """The public LLM, run inside the silo on the silo's own test split (no data leaves)."""
        model, tok = load_llm(self.cfg.llm.model)
        task = load_task(self.cfg.task, self.cfg.seed)
        t0 = time.perf_counter()
        probs = label_probabilities(model, tok, self.data.test.texts, self.labels, task.instruction,
                                    batch_size=self.cfg.llm.batch_size, max_tokens=self.cfg.llm.max_length,
                                    progress=f"{self.name} llm", calibrate=self.cfg.llm.calibrate)
        metrics = {f"silo-test.{k}": v for k, v in classification_metrics(self.data.test.labels, probs).items()}
        return {**metrics, "llm.seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------ FDKT contribution

    def ledger(self, state: RecordDict, budget: float, delta: float, experiment: str = "") -> PrivacyLedger:
        """The silo's privacy ledger. Under the server's experiment id (which a resumed run keeps) it is a file in
        ``state_dir``, rewritten after every charge, so no restart of this process, the Flower run or the server
        forgets spending; without one, it lives in the node's Flower state (one Flower run)."""
        if experiment:
            path = self.state_dir / experiment / f"{self.name}-privacy-ledger.json"
            return PersistentLedger.open(path, budget, delta)
        if LEDGER in state:
            return PrivacyLedger.from_dict(json.loads(state[LEDGER]["state"]))
        return PrivacyLedger(budget, delta)

    def synthesize(self, state: RecordDict, experiment: str = "") -> tuple[Examples, dict, dict[str, float]]:
        """DP synthetic demonstrations of the private training split: (examples, privacy cost, metrics)."""
        cfg = from_flat(FDKTConfig, self.cfg.method_options, "fdkt")
        ledger = self.ledger(state, cfg.epsilon, cfg.delta, experiment)
        noise_seed = None if cfg.noise_seed < 0 else cfg.noise_seed + self.index
        # noise calibration stops up to 0.01 below its target, so a release leaves such a crumb unspent; at the
        # usual delta no mechanism reaches an epsilon that small, so asking for it failed as 'out of reach'
        # (a ConfigError) instead of as this budget refusal
        if ledger.remaining() <= MIN_RELEASE_EPSILON:
            raise PrivacyBudgetExceeded(f"{self.name}: privacy budget spent (epsilon {ledger.spent():.4g} of "
                                        f"{ledger.epsilon_budget:g}, delta {ledger.delta:g}); this silo releases "
                                        "nothing more in this run. Start a new run or raise fdkt.epsilon.")
        texts, labels = list(self.data.train.texts), list(self.data.train.labels)
        try:
            if cfg.mechanism == "dp-sgd":
                model, tok = load_llm(cfg.generator, trainable=True)
                mech = DPSGDConfig(target_epsilon=min(cfg.epsilon, ledger.remaining()), max_grad_norm=cfg.clip,
                                   epochs=cfg.sgd_epochs, batch_size=cfg.sgd_batch_size, lr=cfg.sgd_lr,
                                   num_per_label=cfg.num_per_label, min_words=cfg.min_words, noise_seed=noise_seed,
                                   max_length=cfg.sgd_max_length)
                result = dp_sgd_synthesize(model, tok, texts, labels, self.labels, mech, ledger, self.cfg.seed + self.index)
            else:
                model, tok = load_llm(cfg.generator)
                mech = DPFewShotConfig(num_groups=cfg.groups, shots_per_group=cfg.shots_per_group,
                                       max_tokens=cfg.max_tokens, public_top_k=cfg.public_top_k,
                                       num_per_label=cfg.num_per_label, min_words=cfg.min_words,
                                       noise_seed=noise_seed, sigma=0.0)
                sigma = sigma_for_epsilon(min(cfg.epsilon, ledger.remaining()), ledger.delta, labels,
                                          len(self.labels), mech)
                result = dp_fewshot_synthesize(model, tok, texts, labels, self.labels,
                                               dataclasses.replace(mech, sigma=sigma), ledger)
        finally:  # whatever was charged stays charged, also when generation fails half-way
            state[LEDGER] = ConfigRecord({"state": json.dumps(ledger.to_dict())})
        privacy = {"mechanism": result.mechanism, "epsilon": result.epsilon, "epsilon-total": result.epsilon_total,
                   "delta": result.delta, "budget": ledger.epsilon_budget, "noise-multiplier": result.noise_multiplier,
                   "steps": result.steps, "private": math.isfinite(result.epsilon)}
        metrics = {"synth.examples": len(result.examples),
                   **{f"synth.seconds-{k}": v for k, v in result.seconds.items()},
                   **{f"synth.tokens-{k}": v for k, v in result.tokens.items()}}
        return Examples.of([t for t, _ in result.examples], [y for _, y in result.examples]), privacy, metrics

    # ------------------------------------------------------------ CrossLM: one SLM kept across messages
    # The SLM after round r (0 = trained on private data) lives in the node's Flower state and, under the server's
    # experiment id, on the silo's disk too: a restarted server is a new Flower run with empty node state, and its
    # resumed run asks for the SLM of the round it had reached. The disk also remembers each finished round's
    # metrics, so a request the earlier run already completed is answered again, never trained twice.

    def _crosslm_meta(self, experiment: str) -> tuple[Path, dict]:
        """The silo's CrossLM file for this experiment and its content: the latest round and each round's metrics."""
        path = self.state_dir / experiment / f"{self.name}-crosslm.json"
        return path, json.loads(path.read_text()) if path.exists() else {"round": None, "metrics": {}}

    def _crosslm_weights(self, experiment: str, round_: int) -> Path:
        return self.state_dir / experiment / f"{self.name}-crosslm-slm-round-{round_}.safetensors"

    def crosslm_done(self, experiment: str, round_: int) -> dict[str, float] | None:
        """The metrics of ``round_`` if this silo finished it for this experiment already (a resumed server)."""
        return self._crosslm_meta(experiment)[1]["metrics"].get(str(round_)) if experiment else None

    def kept_slm(self, state: RecordDict, round_: int | None = None, experiment: str = "") -> SLM:
        """The SLM as it was after ``round_`` (None: the latest), from the node state or the silo's disk."""
        if KEPT_SLM in state and (round_ is None or state[KEPT_ROUND]["round"] == round_):
            return self.slm_from_arrays(state[KEPT_SLM])
        if experiment:
            latest = self._crosslm_meta(experiment)[1]["round"]
            weights = self._crosslm_weights(experiment, latest)
            if latest is not None and round_ in (None, latest) and weights.exists():
                return self.new_slm(safetensors.torch.load_file(weights))
        wanted = "a trained SLM" if round_ is None else f"its SLM after round {round_}"
        raise ProtocolError(f"{self.name} does not have {wanted}: the server must send train.private first, or "
                            "resume with the same experiment and the silo's same state-dir.")

    def keep_slm(self, state: RecordDict, model: SLM, round_: int = 0, experiment: str = "",
                 metrics: dict[str, float] | None = None, final: bool = False) -> None:
        """Keep the SLM (what its mode trains) after ``round_`` for later messages; with an experiment id also on
        disk, with the round's metrics. The weights file is written before the JSON that points to it, and the
        previous round's removed after, so a crash at any point leaves a consistent pair. After the ``final`` round
        only the metrics stay."""
        weights = model.trainable_state()
        state[KEPT_SLM] = ArrayRecord(weights)
        state[KEPT_ROUND] = ConfigRecord({"round": round_})
        if not experiment:
            return
        path, stored = self._crosslm_meta(experiment)
        if not final:
            save_tensors(self._crosslm_weights(experiment, round_), weights)
        atomic_write(path, json.dumps({"round": round_, "metrics": {**stored["metrics"], str(round_): metrics or {}}}))
        stale = [stored["round"]] if stored["round"] not in (None, round_) else []
        for old in stale + ([round_] if final else []):
            self._crosslm_weights(experiment, old).unlink(missing_ok=True)

    def train_private(self, state: RecordDict, global_test: Examples | None, experiment: str = "") -> dict[str, float]:
        """Train a fresh SLM on the private split, keep it for later messages, and evaluate it."""
        if (done := self.crosslm_done(experiment, 0)) is not None:
            return done
        model = self.new_slm()
        stats = self.train_slm(model)
        metrics = {**self.evaluate_slm(model, global_test), **self.info(), **train_metrics(stats)}
        self.keep_slm(state, model, 0, experiment, metrics)
        return metrics

    def score(self, state: RecordDict, texts: tuple[str, ...], round_: int | None = None,
              experiment: str = "") -> np.ndarray:
        """Class probabilities of the server's texts, shape (len(texts), num_labels), by the SLM after ``round_``."""
        return predict_proba(self.kept_slm(state, round_, experiment), texts)

    def enhance(self, state: RecordDict, examples: Examples, targets: np.ndarray | None, epochs: int, weight: float,
                with_private: bool, global_test: Examples | None, round_: int = 1, experiment: str = "",
                final: bool = False) -> dict[str, float]:
        """Round ``round_``: fine-tune the SLM of the round before on the server's selected examples (hard labels,
        or soft ``targets`` to distil), optionally with the private split again, keep it, and evaluate it.
        ``epochs=0``: the SLM's own recipe, the epoch chosen on the private validation split."""
        if (done := self.crosslm_done(experiment, round_)) is not None:
            return done
        model = self.kept_slm(state, round_ - 1, experiment)
        seen = 0
        if len(examples) or with_private:
            stats = self.train_slm(model, epochs or None, examples, weight, private=with_private, soft=targets,
                                   seed=1000 * round_, progress="enhance")
            seen = stats.examples
        metrics = {**self.evaluate_slm(model, global_test), **self.info(), "train.examples": seen,
                   "train.synthetic": len(examples)}
        self.keep_slm(state, model, round_, experiment, metrics, final)
        return metrics

    def install_slm(self, state: RecordDict, arrays: ArrayRecord, global_test: Examples | None, round_: int = 1,
                    experiment: str = "", final: bool = False) -> dict[str, float]:
        """Keep SLM weights the server enhanced in round ``round_`` (score-on=server), and evaluate them."""
        if (done := self.crosslm_done(experiment, round_)) is not None:
            return done
        model = self.slm_from_arrays(arrays)
        metrics = {**self.evaluate_slm(model, global_test), **self.info()}
        self.keep_slm(state, model, round_, experiment, metrics, final)
        return metrics

    # ------------------------------------------------------------ Social Learning: the silo as a teacher

    def teach(self, mode: str, state: RecordDict, experiment: str = "") -> Lesson:
        """Synthetic examples or instructions written by the teacher LM from the private training split; copies of
        private text are filtered out unless ``social.verbatim-filter=false`` (``fedbridge.strategies.social``)."""
        cfg = from_flat(SocialConfig, self.cfg.method_options, "social")
        seed = self.cfg.seed * 1000 + self.index
        if cfg.dp == "dp-fewshot":
            return self._teach_dp(cfg, state, experiment)
        detector = (CopyDetector([*self.data.train.texts, *self.data.test.texts], cfg.verbatim_ngram)
                    if cfg.verbatim_filter else None)
        model, tok = load_llm(cfg.teacher)
        if mode == "instructions":
            description = load_task(self.cfg.task, self.cfg.seed).description
            return write_instruction(model, tok, description, self.labels, self.data.train, cfg, seed, detector)
        return write_examples(model, tok, self.labels, self.data.train, cfg, seed, detector)

    def _teach_dp(self, cfg: SocialConfig, state: RecordDict, experiment: str) -> Lesson:
        """Examples by DP few-shot generation (charged to this silo's ledger), then the top-k by perplexity given the
        data-free prompt (post-processing). No verbatim filter: reading private data to filter would not be."""
        ledger = self.ledger(state, cfg.epsilon, cfg.delta, experiment)
        if ledger.remaining() <= MIN_RELEASE_EPSILON:
            raise PrivacyBudgetExceeded(f"{self.name}: privacy budget spent (epsilon {ledger.spent():.4g} of "
                                        f"{ledger.epsilon_budget:g}, delta {ledger.delta:g}); this silo releases "
                                        "nothing more in this run. Start a new run or raise social.epsilon.")
        texts, labels = list(self.data.train.texts), list(self.data.train.labels)
        model, tok = load_llm(cfg.teacher)
        mech = DPFewShotConfig(num_groups=cfg.dp_groups, shots_per_group=cfg.dp_shots_per_group,
                               max_tokens=cfg.max_new_tokens, public_top_k=cfg.dp_public_top_k,
                               num_per_label=math.ceil(cfg.samples / len(self.labels)),
                               noise_seed=None if cfg.noise_seed < 0 else cfg.noise_seed + self.index,
                               max_text_chars=cfg.max_example_chars, sigma=0.0)
        try:
            sigma = sigma_for_epsilon(min(cfg.epsilon, ledger.remaining()), ledger.delta, labels, len(self.labels),
                                      mech)
            result = dp_fewshot_synthesize(model, tok, texts, labels, self.labels,
                                           dataclasses.replace(mech, sigma=sigma), ledger)
        finally:  # whatever was charged stays charged, also when generation fails half-way
            if not experiment:
                state[LEDGER] = ConfigRecord({"state": json.dumps(ledger.to_dict())})
        kept, ppl = public_top_k(model, tok, self.labels, result.examples, cfg.top_k)
        privacy = {"mechanism": result.mechanism, "epsilon": result.epsilon, "epsilon-total": result.epsilon_total,
                   "delta": result.delta, "budget": ledger.epsilon_budget, "noise-multiplier": result.noise_multiplier,
                   "steps": result.steps, "private": math.isfinite(result.epsilon)}
        provenance = {"mode": "examples", "teacher": cfg.teacher, "dp": cfg.dp, "dp-groups": cfg.dp_groups,
                      "dp-shots-per-group": cfg.dp_shots_per_group, "samples": len(result.examples),
                      "top-k": cfg.top_k, "conditioning": "label", "selection": "lowest perplexity given the "
                      "data-free prompt", "verbatim-filter": False, "perplexities": ppl}
        metrics = {"teach.generated": len(result.examples), "teach.kept": len(kept),
                   "teach.seconds": sum(result.seconds.values()),
                   "teach.tokens-generated": result.tokens.get("generated", 0)}
        return Lesson([result.examples[i][0] for i in kept], [result.examples[i][1] for i in kept], provenance,
                      privacy, metrics)

    def vote(self, mode: str, texts: list[str], labels: list[int] | None) -> list[float]:
        """The teacher's length-normalised log-likelihood of each candidate against its held-out examples (a seeded
        sample of its test split, which no teaching prompt ever showed)."""
        cfg = from_flat(SocialConfig, self.cfg.method_options, "social")
        if not len(self.data.test):
            raise ConfigError(f"{self.name} has no held-out (test) examples to vote with; raise "
                              "task.silo-test-fraction or drop the voting aggregators.")
        rng = random.Random(f"vote/{self.cfg.seed}/{self.index}")  # a stream of its own, not the teaching draws
        held = rng.sample(range(len(self.data.test)), min(cfg.vote_examples, len(self.data.test)))
        model, tok = load_llm(cfg.teacher)
        return vote_scores(model, tok, self.labels, Examples.of([self.data.test.texts[i] for i in held],
                                                                [self.data.test.labels[i] for i in held]),
                           mode, texts, labels, cfg.max_example_chars)

    def share_raw(self, n: int) -> tuple[Examples, dict]:
        """Social Learning's NON-PRIVATE upper bound: n raw training examples. Refused unless the run asks for the
        'original' baseline (social.baselines), so no other configuration can make a silo send raw data."""
        cfg = from_flat(SocialConfig, self.cfg.method_options, "social")
        if "original" not in cfg.baseline_names:
            raise ConfigError(f"{self.name} refuses to share raw examples: the run did not ask for the non-private "
                              "'original' baseline (social.baselines).")
        rng = random.Random(f"share-raw/{self.cfg.seed}/{self.index}")
        picked = rng.sample(range(len(self.data.train)), min(n, len(self.data.train)))
        raw = Examples.of([self.data.train.texts[i] for i in picked], [self.data.train.labels[i] for i in picked])
        return raw, {**NON_PRIVATE, "mechanism": "raw (non-private)"}

    def info(self) -> dict[str, int]:
        return {"partition-id": self.index, "num-train": len(self.data.train), "num-test": len(self.data.test)}


def train_metrics(stats: TrainStats) -> dict[str, float]:
    """What a silo reports about one SLM training: seconds, examples seen, epochs run and the epoch kept."""
    return {"train.seconds": stats.seconds, "train.examples": stats.examples, "train.epochs": stats.epochs,
            "train.best-epoch": stats.best_epoch, "train.validation": stats.validation}


LEDGER = "fdkt-privacy-ledger"
KEPT_SLM = "crosslm-slm"  # CrossLM: the silo's SLM, kept in the node state between messages
KEPT_ROUND = "crosslm-slm-round"  # ... and the round it is the result of
MIN_RELEASE_EPSILON = 0.01  # a remainder this small counts as spent: see Silo.synthesize


@functools.lru_cache(maxsize=16)
def _silo(run_items: tuple, node_items: tuple) -> Silo:
    """One Silo per (run config, node config) per process: data is loaded and split once."""
    cfg, node = ExperimentConfig.from_run_config(dict(run_items)), dict(node_items)
    if "partition-id" not in node:
        raise ConfigError("This SuperNode has no 'partition-id' in its node config. Start it with "
                          "--node-config \"partition-id=<k> ...\" (and data-path=<file> for its own data).")
    index = int(node["partition-id"])
    if "data-path" in node and cfg.task.labels and cfg.task.name not in BUILTIN_TASKS:
        labels = cfg.task.labels  # what the server's task file or dataset resolves to; the silo need not have it
    else:
        labels = load_task(cfg.task, cfg.seed).labels
    if "data-path" in node:
        file_cfg = dataclasses.replace(cfg.task, text_column=str(node.get("text-column", cfg.task.text_column)),
                                       label_column=str(node.get("label-column", cfg.task.label_column)))
        data = silo_from_file(file_cfg, str(node["data-path"]), labels, cfg.seed + index)
    else:
        federation = load_federation(cfg.task, cfg.partition, cfg.seed)
        if not 0 <= index < len(federation.silos):
            raise ConfigError(f"partition-id {index} is outside 0..{len(federation.silos) - 1} "
                              f"(partition.num-silos={cfg.partition.num_silos}). Match num-supernodes to it.")
        data = federation.silos[index]
    data = plant_canaries(data, social_options(cfg).canary_setup, cfg.seed, index)  # social.canaries: to measure leaks
    return Silo(index, cfg, labels, data, Path(str(node.get("state-dir", DEFAULT_SILO_STATE_DIR))).expanduser())
