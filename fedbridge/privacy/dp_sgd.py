"""FDKT's client mechanism: DP-SGD fine-tuning of a small generator LM (LoRA + Opacus), then sampling from it.

Each private text becomes ``prefix_template.format(label=...) + text``; the generator learns
p(text | label prefix) with DP-SGD, and synthetic texts are sampled from it with the prefix as prompt.
Only the samples leave the silo; they are post-processing of the DP model, so the training charge covers them.

Fixes over the FATE-LLM reference: training runs on the Poisson-sampled loader that Opacus returns (the
accountant's assumption), the loss is a per-example mean with padding masked (so each per-sample gradient
depends on its own example only), the ledger is charged exactly the (σ, q, steps) that run, and any causal LM
that peft can wrap works. Only LoRA matrices train: they are ``nn.Linear``, which Opacus's default
``hooks`` per-sample-gradient mode supports; the frozen base model (embeddings included, which Opacus cannot
handle in HF models) needs no per-sample gradients.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.errors import ConfigError, DataError
from fedbridge.models.generation import GenerationStats, SamplingConfig, generate
from fedbridge.models.loading import MODEL_BUILD_LOCK
from fedbridge.privacy.accounting import PrivacyEvent, PrivacyLedger, compute_epsilon, noise_for_epsilon
from fedbridge.privacy.synthesis import SynthesisResult, privacy_generator

FDKT_SAMPLING = SamplingConfig(max_new_tokens=96, temperature=1.0, top_p=0.9, top_k=50)


@dataclass(frozen=True)
class DPSGDConfig:
    """FDKT generator training and sampling; privacy defaults as in the FATE-LLM reference (ε=3, clip 1.0)."""

    target_epsilon: float = 3.0  # ε of this training run at the ledger's δ; inf = non-private (no clip, no noise)
    max_grad_norm: float = 1.0
    epochs: int = 3
    batch_size: int = 8  # expected Poisson batch: sample rate q = 1 / ceil(N / batch_size)
    lr: float = 1e-3
    max_length: int = 128  # tokens per training text, prefix included
    prefix_template: str = "Label: {label}\n"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: tuple[str, ...] = ()  # () = peft's default for the architecture
    grad_sample_mode: str = "hooks"  # Opacus per-sample gradients; "functorch" if a custom layer lacks a sampler
    noise_seed: int | None = None  # None = secret OS entropy for sampling and noise (see privacy_generator)
    size_bound: int = 0  # a public lower bound on the training examples: q = 1 / ceil(bound / batch), steps = epochs / q;
    # 0 = from the exact count, which q and the number of steps then reveal
    num_per_label: int = 50
    min_words: int = 10  # shorter samples are dropped
    sampling: SamplingConfig = FDKT_SAMPLING

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0:
            raise ConfigError(f"dp-sgd target_epsilon must be > 0 (inf = non-private), got {self.target_epsilon}")
        if not self.max_grad_norm > 0 or self.epochs < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ConfigError("dp-sgd needs max_grad_norm > 0, epochs >= 1, batch_size >= 1, max_length >= 2")
        if "{label}" not in self.prefix_template:
            raise ConfigError(f"prefix_template {self.prefix_template!r} must contain '{{label}}'")

    @property
    def private(self) -> bool:
        return math.isfinite(self.target_epsilon)


@dataclass
class TrainReport:
    """What one generator training run did: the charged event and what actually ran, step by step.

    Only ``event`` may leave the silo: batch sizes, losses and token counts depend on the private data.
    """

    event: PrivacyEvent
    batch_sizes: list[int] = field(default_factory=list)  # examples per step (Poisson: varies; 0 = noise only)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


def per_example_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each row, padding masked.

    HF's built-in loss averages over all tokens of the batch, which makes one example's gradient depend on
    the other examples' lengths and breaks the per-example sensitivity that DP-SGD's clipping bounds.
    """
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none")
    mask = attention_mask[:, 1:].to(nll.dtype)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def _encode(tok: PreTrainedTokenizerBase, texts: Sequence[str], label_ids: Sequence[int],
            label_names: Sequence[str], cfg: DPSGDConfig) -> list[tuple[torch.Tensor]]:
    """Prefix + text, with the tokenizer's own special tokens (as ``generate`` will prompt) and EOS if it fits."""
    if len(texts) != len(label_ids) or not texts:
        raise DataError(f"dp-sgd needs one label per text and at least one text, got {len(texts)} texts "
                        f"and {len(label_ids)} labels")
    if bad := sorted({y for y in label_ids if not 0 <= y < len(label_names)}):
        raise DataError(f"label ids {bad} are outside 0..{len(label_names) - 1}")
    rows = []
    for text, y in zip(texts, label_ids):
        ids = tok(cfg.prefix_template.format(label=label_names[y]) + text)["input_ids"]
        ids = ids[:cfg.max_length] if len(ids) >= cfg.max_length else ids + [tok.eos_token_id]
        rows.append((torch.tensor(ids),))  # 1-tuples: Opacus derives empty-batch shapes from dataset[0]
    return rows


def _pad(pad_id: int, batch: list[tuple[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for (x,) in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x,) in enumerate(batch):
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
    return ids, mask


def _with_lora(model: PreTrainedModel, cfg: DPSGDConfig) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=list(cfg.lora_target_modules) or None)
    with MODEL_BUILD_LOCK:  # LoRA's init must not run under another thread's from_pretrained patches
        return get_peft_model(model, lora)


def noise_only_step(optimizer: DPOptimizer) -> None:
    """Step on an empty Poisson batch: HF models cannot run a batch of 0, but the step must still add noise
    and be counted, as the accountant assumes. Zero per-sample gradients make the update pure noise."""
    for p in optimizer.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()


def _plan(loader: DataLoader, cfg: DPSGDConfig) -> tuple[float, int]:
    """The (q, steps) that will run. DP: Opacus's rule in ``make_private``, q = 1 / len(loader) and
    ``len(UniformWithReplacementSampler)`` Poisson batches an epoch, with ``len(loader)`` from the public size bound
    when there is one; non-private: the plain loader."""
    if not cfg.private:
        return min(1.0, cfg.batch_size / len(loader.dataset)), cfg.epochs * len(loader)
    sample_rate = 1 / (math.ceil(cfg.size_bound / cfg.batch_size) if cfg.size_bound else len(loader))
    return sample_rate, cfg.epochs * len(UniformWithReplacementSampler(num_samples=len(loader.dataset),
                                                                       sample_rate=sample_rate))


def _run_epochs(module: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, cfg: DPSGDConfig,
                report: TrainReport) -> None:
    device = next(module.parameters()).device
    desc = "DP-SGD generator" if cfg.private else "SGD generator"
    with tqdm(total=report.event.steps, desc=desc, unit="step") as bar:
        for _ in range(cfg.epochs):
            for batch in loader:
                # an empty Poisson batch comes as Opacus builds it from dataset[0]'s shapes: a one-element list
                input_ids, mask = batch if len(batch) == 2 else (batch[0], torch.zeros_like(batch[0]))
                optimizer.zero_grad(set_to_none=True)
                if len(input_ids) == 0:
                    noise_only_step(optimizer)
                    loss = math.nan
                else:
                    input_ids, mask = input_ids.to(device), mask.to(device)
                    batch_loss = per_example_loss(module(input_ids=input_ids, attention_mask=mask).logits,
                                                  input_ids, mask).mean()  # the "mean" reduction Opacus is told
                    batch_loss.backward()
                    optimizer.step()
                    loss = batch_loss.item()
                report.batch_sizes.append(len(input_ids))
                report.losses.append(loss)
                report.tokens += int(mask.sum())
                bar.set_postfix(loss=f"{loss:.3f}", batch=len(input_ids))
                bar.update()


def dp_sgd_train(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str],
                 label_ids: Sequence[int], label_names: Sequence[str], cfg: DPSGDConfig, ledger: PrivacyLedger,
                 seed: int = 0) -> tuple[PreTrainedModel, TrainReport]:
    """Train a LoRA copy of ``model`` on the private texts with DP-SGD; return it (adapters merged) and a report.

    The caller's model is never modified: a generator trained on private data must not leak into a shared
    instance. The ledger is charged the full (σ, q, steps) before the first step; if that is over budget,
    ``PrivacyBudgetExceeded`` is raised and nothing is trained. After training, Opacus's own accountant must
    show exactly the charged (σ, q, steps). Non-private training (ε = inf) is charged as a σ = 0 event,
    which only a ledger with an infinite budget accepts.
    """
    rng = privacy_generator(cfg.noise_seed) if cfg.private else torch.Generator().manual_seed(seed)
    loader = DataLoader(_encode(tok, texts, label_ids, label_names, cfg), batch_size=cfg.batch_size,
                        shuffle=not cfg.private, collate_fn=partial(_pad, tok.pad_token_id), generator=rng)
    sample_rate, steps = _plan(loader, cfg)
    sigma = noise_for_epsilon(cfg.target_epsilon, ledger.delta, sample_rate, steps)
    report = TrainReport(PrivacyEvent(sigma, sample_rate, steps, "dp-sgd" if cfg.private else "sgd (non-private)"))
    ledger.charge(report.event)

    torch.manual_seed(seed)  # LoRA initialisation (data-independent)
    net = _with_lora(copy.deepcopy(model), cfg).train()  # train mode before make_private
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    t0 = time.perf_counter()
    if not cfg.private:
        _run_epochs(net, optimizer, loader, cfg, report)
    else:
        # the noise RNG lives on the model's device and is independent of the sampling RNG
        noise_rng = privacy_generator(None if cfg.noise_seed is None else cfg.noise_seed + 1,
                                      next(net.parameters()).device)
        engine = PrivacyEngine(accountant="rdp")
        if cfg.size_bound:  # Poisson batches at the public rate, whatever the private count
            loader = DPDataLoader(loader.dataset, sample_rate=sample_rate, collate_fn=loader.collate_fn,
                                  generator=rng)
        module, optimizer, loader = engine.make_private(  # train on the Poisson loader it returns
            module=net, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=cfg.max_grad_norm, poisson_sampling=not cfg.size_bound, loss_reduction="mean",
            grad_sample_mode=cfg.grad_sample_mode, noise_generator=noise_rng)
        if (loader.sample_rate, cfg.epochs * len(loader)) != (sample_rate, steps):
            raise RuntimeError(f"Opacus plans q={loader.sample_rate}, {cfg.epochs * len(loader)} steps; "
                               f"the ledger was charged q={sample_rate}, {steps} steps")
        _run_epochs(module, optimizer, loader, cfg, report)
        module.cleanup()  # drop the per-sample-gradient hooks and attributes
        if engine.accountant.history != [(sigma, sample_rate, steps)]:
            raise RuntimeError(f"Opacus accounted {engine.accountant.history}; "
                               f"the ledger was charged {[(sigma, sample_rate, steps)]}")
    report.seconds = time.perf_counter() - t0
    return net.merge_and_unload().eval(), report


def sample_synthetic(model: PreTrainedModel, tok: PreTrainedTokenizerBase, label_names: Sequence[str],
                     n_per_label: int, sampling: SamplingConfig = FDKT_SAMPLING,
                     prefix_template: str = DPSGDConfig.prefix_template, min_words: int = 10,
                     seed: int | None = None) -> tuple[list[tuple[str, int]], GenerationStats]:
    """Sample ``n_per_label`` texts for every label from the generator, prompted with the control prefix.

    Every label of the public label set is prompted, also ones a silo may lack: choosing labels from the
    private data would release which labels it holds outside the DP guarantee.
    """
    labels = [y for y in range(len(label_names)) for _ in range(n_per_label)]
    prompts = [prefix_template.format(label=label_names[y]) for y in labels]
    texts, stats = generate(model, tok, prompts, sampling, seed=seed, progress="sampling DP generator")
    return [(t, y) for t, y in zip(texts, labels) if len(t.split()) >= min_words], stats


def dp_sgd_synthesize(model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str],
                      label_ids: Sequence[int], label_names: Sequence[str], cfg: DPSGDConfig,
                      ledger: PrivacyLedger, seed: int = 0) -> SynthesisResult:
    """FDKT client step: DP-train a generator on the silo's texts and return labelled synthetic texts."""
    generator, report = dp_sgd_train(model, tok, texts, label_ids, label_names, cfg, ledger, seed)
    examples, stats = sample_synthetic(generator, tok, label_names, cfg.num_per_label, cfg.sampling,
                                       cfg.prefix_template, cfg.min_words, seed)
    event = report.event
    losses = [x for x in report.losses if not math.isnan(x)]
    return SynthesisResult(
        examples=examples, mechanism=event.mechanism, epsilon=compute_epsilon([event], ledger.delta),
        epsilon_total=ledger.spent(), delta=ledger.delta, steps=event.steps, noise_multiplier=event.noise_multiplier,
        events=(event,), seconds={"train": report.seconds, "sample": stats.seconds},
        tokens={"prompt": stats.prompt_tokens, "generated": stats.generated_tokens},
        local={"train-tokens": report.tokens, "last-loss": losses[-1] if losses else math.nan})
