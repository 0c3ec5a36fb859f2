"""A silo: its private data, its SLM, and what it does with them. The ClientApp handlers only translate messages.

Where the data comes from:
  simulation  ``node_config["partition-id"]`` selects one partition of the configured task;
  deployment  ``node_config["data-path"]`` (plus optional ``text-column``/``label-column``) is the silo's own file.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from flwr.app import ArrayRecord, Context
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.config import ExperimentConfig, SLMConfig
from fedbridge.errors import ConfigError
from fedbridge.models.loading import load_llm, load_slm
from fedbridge.models.llm_classifier import label_probabilities
from fedbridge.models.slm import SLMTrainConfig, TrainStats, predict_proba, train_classifier
from fedbridge.tasks import Examples, SiloData, classification_metrics, load_federation, load_task, silo_from_file


def slm_train_config(slm: SLMConfig, epochs: int | None = None) -> SLMTrainConfig:
    return SLMTrainConfig(epochs=slm.epochs if epochs is None else epochs, batch_size=slm.batch_size, lr=slm.lr,
                          max_length=slm.max_length)


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
        return train_classifier(model, tok, texts, labels, slm_train_config(self.cfg.slm, epochs), weights,
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

    def info(self) -> dict[str, int]:
        return {"partition-id": self.index, "num-train": len(self.data.train), "num-test": len(self.data.test)}


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
        file_cfg = cfg.task.__class__(**{**cfg.task.__dict__,
                                         "text_column": str(node.get("text-column", cfg.task.text_column)),
                                         "label_column": str(node.get("label-column", cfg.task.label_column))})
        data = silo_from_file(file_cfg, str(node["data-path"]), task.labels, cfg.seed + index)
    else:
        federation = load_federation(cfg.task, cfg.partition, cfg.seed)
        if not 0 <= index < len(federation.silos):
            raise ConfigError(f"partition-id {index} is outside 0..{len(federation.silos) - 1} "
                              f"(partition.num-silos={cfg.partition.num_silos}). Match num-supernodes to it.")
        data = federation.silos[index]
    return Silo(index, cfg, task.labels, data)
