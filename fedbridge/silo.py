"""A silo: its private data, its SLM, and what it does with them. The ClientApp handlers only translate messages.

Where the data comes from:
  simulation  ``node_config["partition-id"]`` selects one partition of the configured task;
  deployment  ``node_config["data-path"]`` (plus optional ``text-column``/``label-column``) is the silo's own file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import ConfigError, PrivacyBudgetExceeded
from fedbridge.models.loading import load_llm, load_slm
from fedbridge.models.llm_classifier import label_probabilities
from fedbridge.models.slm import TrainStats, predict_proba, train_classifier
from fedbridge.privacy import DPFewShotConfig, DPSGDConfig, PrivacyLedger, dp_fewshot_synthesize, dp_sgd_synthesize
from fedbridge.privacy.dp_fewshot import sigma_for_epsilon
from fedbridge.strategies.fdkt import FDKTConfig
from fedbridge.tasks import Examples, SiloData, classification_metrics, load_federation, load_task, silo_from_file


@dataclass(frozen=True)
class Silo:
    index: int
    cfg: ExperimentConfig
    labels: tuple[str, ...]
    data: SiloData

    @property
    def name(self) -> str:
        return f"silo-{self.index}"

    @classmethod
    def from_context(cls, context: Context) -> Silo:
        return _silo(tuple(sorted(context.run_config.items())), tuple(sorted(context.node_config.items())))

    # ------------------------------------------------------------ SLM

    def new_slm(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return load_slm(self.cfg.slm.spec_for(self.index), len(self.labels), seed=self.cfg.seed + self.index)

    def slm_from_arrays(self, arrays: ArrayRecord) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        model, tok = self.new_slm()
        model.load_state_dict(arrays.to_torch_state_dict())
        return model, tok

    def train_slm(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, epochs: int | None = None,
                  extra: Examples | None = None, extra_weight: float = 1.0) -> TrainStats:
        """Train on the private training split, plus optional extra (e.g. synthetic) examples with their weight."""
        texts, labels = list(self.data.train.texts), list(self.data.train.labels)
        weights = [1.0] * len(texts)
        if extra is not None:
            texts += extra.texts
            labels += extra.labels
            weights += [extra_weight] * len(extra)
        return train_classifier(model, tok, texts, labels, self.cfg.slm.train_config(epochs), weights,
                                seed=self.cfg.seed + self.index, progress=f"{self.name} train")

    def evaluate_slm(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                     global_test: Examples | None = None) -> dict[str, float]:
        splits = {"silo-test": self.data.test, **({"global-test": global_test} if global_test is not None else {})}
        out: dict[str, float] = {}
        for split, ex in splits.items():
            probs = predict_proba(model, tok, ex.texts, max_length=self.cfg.slm.max_length)
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
                                    progress=f"{self.name} llm")
        metrics = {f"silo-test.{k}": v for k, v in classification_metrics(self.data.test.labels, probs).items()}
        return {**metrics, "llm.seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------ FDKT contribution

    def ledger(self, state: RecordDict, budget: float, delta: float) -> PrivacyLedger:
        """The silo's privacy ledger, kept in the node's Flower state so spending persists across messages."""
        if LEDGER in state:
            return PrivacyLedger.from_dict(json.loads(state[LEDGER]["state"]))
        return PrivacyLedger(budget, delta)

    def synthesize(self, state: RecordDict) -> tuple[Examples, dict, dict[str, float]]:
        """DP synthetic demonstrations of the private training split: (examples, privacy cost, metrics)."""
        cfg = from_flat(FDKTConfig, self.cfg.method_options, "fdkt")
        ledger = self.ledger(state, cfg.epsilon, cfg.delta)
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
                                   max_length=self.cfg.slm.max_length)
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

    def info(self) -> dict[str, int]:
        return {"partition-id": self.index, "num-train": len(self.data.train), "num-test": len(self.data.test)}


LEDGER = "fdkt-privacy-ledger"
MIN_RELEASE_EPSILON = 0.01  # a remainder this small counts as spent: see Silo.synthesize


@functools.lru_cache(maxsize=16)
def _silo(run_items: tuple, node_items: tuple) -> Silo:
    """One Silo per (run config, node config) per process: data is loaded and split once."""
    cfg, node = ExperimentConfig.from_run_config(dict(run_items)), dict(node_items)
    if "partition-id" not in node:
        raise ConfigError("This SuperNode has no 'partition-id' in its node config. Start it with "
                          "--node-config \"partition-id=<k> ...\" (and data-path=<file> for its own data).")
    index = int(node["partition-id"])
    task = load_task(cfg.task, cfg.seed)
    if "data-path" in node:
        file_cfg = dataclasses.replace(cfg.task, text_column=str(node.get("text-column", cfg.task.text_column)),
                                       label_column=str(node.get("label-column", cfg.task.label_column)))
        data = silo_from_file(file_cfg, str(node["data-path"]), task.labels, cfg.seed + index)
    else:
        federation = load_federation(cfg.task, cfg.partition, cfg.seed)
        if not 0 <= index < len(federation.silos):
            raise ConfigError(f"partition-id {index} is outside 0..{len(federation.silos) - 1} "
                              f"(partition.num-silos={cfg.partition.num_silos}). Match num-supernodes to it.")
        data = federation.silos[index]
    return Silo(index, cfg, task.labels, data)
