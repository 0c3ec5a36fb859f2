"""The LLM side of a CrossLM server: the prompts it writes from, one batch of labelled examples, and ``ServerLLM``,
the model with its reward trainer (LoRA under the KL leash), its evaluation and its checkpoint (adapter, optimizer,
step log and sampling RNG, once per LLM version).

What the LLM is asked (writing, label scoring, perplexity) goes through the LLM interface
(``models/llm.py:TrainedLLM`` over the trained model); the trainer gets the weights from the exact path
(``exact(trainable=True)``): training is not an ask."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.checkpoint import Checkpoint
from fedbridge.config import ExperimentConfig
from fedbridge.errors import ConfigError
from fedbridge.methods.crosslm.config import CrossLMConfig
from fedbridge.methods.crosslm.state import Batch, Generated
from fedbridge.methods.seeding import STYLES, generation_prompt
from fedbridge.methods.text import deduplicate, parse_generation
from fedbridge.models.generation import GenerationStats, Prompt, SamplingConfig
from fedbridge.models.llm import LLM, VLLM, TrainedLLM, load_server_llm
from fedbridge.models.reward import RewardTrainer, ScoredExample, general_text, perplexity
from fedbridge.tasks import Examples, Task, classification_metrics


def crosslm_prompts(task: Task, per_label: int, rng: random.Random) -> tuple[list[Prompt], list[int]]:
    """CrossLM's prompts for one batch: ``per_label`` per label, each with a style hint drawn by ``rng``."""
    prompts, labels = [], []
    for y, label in enumerate(task.labels):
        for _ in range(per_label):
            prompts.append(generation_prompt(task, label, rng.choice(STYLES)))
            labels.append(y)
    return prompts, labels


def write_labelled(llm: LLM, prompts: list[Prompt], labels: list[int], cfg: CrossLMConfig, history: list[str],
                   seed: int, batch_size: int, stats: GenerationStats, counts: Counter) -> list[Generated]:
    """One batch from ``prompts`` (each asking for its label), written by ``llm``: sampled, parsed, kept if long
    enough and not a near-copy of anything written before (``history``)."""
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              batch_size=batch_size)
    outs, st = llm.generate(prompts, sampling, seed=seed, progress="crosslm generate")
    stats += st
    texts = [parse_generation(o) for o in outs]
    long_enough = [i for i, t in enumerate(texts) if len(t.split()) >= cfg.min_words]
    kept = [long_enough[j] for j in deduplicate([texts[i] for i in long_enough], history, cfg.near_duplicate)]
    counts["generated"] += len(texts)
    counts["kept-after-filter"] += len(kept)
    return [Generated(prompts[i], texts[i], labels[i]) for i in kept]


class ServerLLM:
    """The server's LLM (LoRA adapters on the loaded model) and what it does in a CrossLM run.

    ``llm.engine`` decides who writes: on the fedbridge backend the trained peft model itself (exactly as before the
    interface); on vLLM an engine started with LoRA, under the adapter saved after each update. Label scoring and
    perplexity always run on the trained model (``TrainedLLM``)."""

    def __init__(self, cfg: ExperimentConfig, opts: CrossLMConfig, task: Task, steps_path: Path,
                 device: torch.device) -> None:
        self.cfg, self.opts, self.task, self.steps_path = cfg, opts, task, steps_path
        update = opts.update_config()
        base = load_server_llm(cfg.llm, device, max_lora_rank=update.rank)
        model, tok = base.exact(trainable=True)  # the exact path: training needs the weights
        self.trainer = RewardTrainer(model, tok, update, task.labels, task.instruction, seed=cfg.seed)
        # the interface over the trained model: what the LLM is asked (writing, scoring, perplexity) goes through it
        self.interface = TrainedLLM(self.trainer.model, self.trainer.tok, base if isinstance(base, VLLM) else None)
        self.saved_version: int | None = None  # the LLM version whose adapter the checkpoint holds

    @property
    def model(self) -> PreTrainedModel:
        return self.trainer.model

    @property
    def tok(self) -> PreTrainedTokenizerBase:
        return self.trainer.tok

    def write(self, prompts: list[Prompt], labels: list[int], history: list[str], seed: int, stats: GenerationStats,
              counts: Counter) -> list[Generated]:
        return write_labelled(self.interface, prompts, labels, self.opts, history, seed, self.cfg.llm.batch_size,
                              stats, counts)

    def update(self, batch: Batch, rewards: np.ndarray, silo: str, steps: int, version: int) -> bool:
        """LoRA steps on the batch's combined rewards; True if the LLM changed. Each step is appended to the
        run's step log (``<run-name>.crosslm-steps.jsonl``)."""
        examples = [ScoredExample(g.prompt, g.text, g.label, float(r)) for g, r in zip(batch.examples, rewards)]
        entries = self.trainer.update(examples, steps, progress=f"crosslm llm update ({silo})", silo=silo,
                                      batch=batch.index, version=version, staleness=version - batch.version,
                                      scorers=len(batch.scores))
        if entries:
            self.interface.changed()
            self.steps_path.parent.mkdir(parents=True, exist_ok=True)
            with self.steps_path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(e) + "\n" for e in entries)
        return bool(entries)

    def evaluation_data(self, global_test: Examples) -> tuple[Examples, list[str]]:
        """The global-test subset for label scoring and the general-text passages for perplexity, fixed per run."""
        passages = general_text(self.opts.general_text)
        return (_subsample(global_test, self.opts.llm_eval_examples, self.cfg.seed),
                passages[:self.opts.ppl_passages] if self.opts.ppl_passages > 0 else passages)

    def evaluate(self, eval_set: Examples, passages: list[str]) -> dict[str, float]:
        probs = self.interface.label_probabilities(
            eval_set.texts, self.task.labels, self.task.instruction, batch_size=self.cfg.llm.batch_size,
            max_tokens=self.cfg.llm.max_length, progress="crosslm llm eval", calibrate=self.cfg.llm.calibrate)
        return {**classification_metrics(eval_set.labels, probs),
                "perplexity": perplexity(self.interface, passages, self.opts.ppl_max_tokens, self.cfg.llm.batch_size)}

    # -------------------------------------------------------------- checkpoint

    def save(self, ckpt: Checkpoint, version: int) -> dict:
        """Save the adapter and optimizer of LLM ``version`` (once per version); returns the step log and RNG state
        for the step's JSON. Call ``saved`` once that JSON is written."""
        if self.saved_version != version:
            ckpt.save_adapter(f"llm-v{version}", self.model)
            ckpt.save_optimizer(f"llm-v{version}", self.trainer.optim)
        rng = self.trainer.rng.getstate()
        return {"log": self.trainer.log, "rng": [rng[0], list(rng[1])]}

    def saved(self, ckpt: Checkpoint, version: int) -> None:
        """The checkpoint now points at ``version``: drop the previous version's adapter."""
        if self.saved_version not in (None, version):
            ckpt.delete(f"llm-v{self.saved_version}")
        self.saved_version = version

    def restore(self, ckpt: Checkpoint, saved: dict) -> None:
        """The LLM as the earlier attempt's checkpoint left it, and its step log as far as the checkpoint covers."""
        name = f"llm-v{saved['version']}"
        if not (ckpt.load_adapter(name, self.model) and ckpt.load_optimizer(name, self.trainer.optim)):
            raise ConfigError(f"The CrossLM checkpoint in {ckpt.directory} lacks the LLM adapter '{name}'. Delete "
                              "the directory to start over.")
        self.interface.changed()
        self.saved_version = saved["version"]
        self.trainer.log = list(saved["log"])
        self.trainer.rng.setstate((saved["rng"][0], tuple(saved["rng"][1]), None))
        with self.steps_path.open("w", encoding="utf-8") as f:  # the steps the checkpoint covers, not any after it
            f.writelines(json.dumps(entry) + "\n" for entry in self.trainer.log)


def _subsample(examples: Examples, k: int, seed: int) -> Examples:
    """A fixed random subset of ``k`` examples (all when k is 0 or too large), the same before and after."""
    if k <= 0 or k >= len(examples):
        return examples
    idx = sorted(random.Random(seed).sample(range(len(examples)), k))
    return Examples.of([examples.texts[i] for i in idx], [examples.labels[i] for i in idx])
