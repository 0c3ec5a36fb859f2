"""A silo's small sequence classifier: a pretrained encoder, a pooling of its hidden states, and a linear head.

Three training modes (``slm.mode``), one interface:
  ``head``  the encoder stays frozen; each text's pooled features are computed once and cached per process, and
            only the head trains. Seconds per silo, so hundreds of silos fit on a laptop.
  ``lora``  LoRA adapters (peft) on the encoder's attention, plus the head.
  ``full``  every weight trains.
``SLM.trainable_state()`` holds exactly what the mode trains: it is what FedAvg averages, what a CrossLM silo keeps
or uploads, and what ``load_slm(..., weights=)`` puts back, so the bytes moved shrink with the mode.

Training (``train_classifier``) uses AdamW with a separate learning rate for the head, linear warmup and decay,
optional class-balanced loss weights, and early stopping: the best epoch by macro-F1 on a validation part of the
private training split (never a synthetic example) is the one kept.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from fedbridge.errors import ConfigError

SLM_MODES = ("head", "lora", "full")
POOLINGS = ("mean-layers", "mean", "cls")
DEFAULT_EPOCHS = {"head": 100, "lora": 12, "full": 8}  # slm.epochs=0: at most this many; early stopping decides
DP_EPOCHS = 30  # slm.epochs=0 under DP (head mode): exactly this many, no early stopping
DEFAULT_LR = {"head": 0.0, "lora": 5e-4, "full": 5e-5}  # slm.lr=0: the encoder's learning rate (head: none)
FIT_PERCENTILE, FIT_MULTIPLE, FIT_CAP = 95, 16, 256  # slm.max-length=0: the texts' 95th percentile, rounded up


@dataclass(frozen=True)
class SLMOptions:
    """How an SLM is built and trained; the ``slm.*`` keys of the run config (``fedbridge.config.SLMConfig``)."""

    mode: str = field(default="head", metadata={
        "help": "what trains: head (frozen encoder, cached features, a trained linear head) | lora (LoRA adapters + "
                "head) | full (every weight); what the mode trains is all FedAvg averages and moves"})
    pooling: str = field(default="mean-layers", metadata={
        "help": "mean-layers (mean over tokens of every layer, concatenated) | mean (the last layer's) | cls (the "
                "first token's)"})
    epochs: int = field(default=0, metadata={
        "help": "most epochs; 0 = the mode's default (head 100, lora 12, full 8); early stopping decides"})
    patience: int = field(default=20, metadata={
        "help": "epochs without a better validation macro-F1 before training stops"})
    validation_fraction: float = field(default=0.15, metadata={
        "help": "of the private training split, held out (stratified) to choose the epoch, in [0, 0.9); 0 = none "
                "(every epoch runs, the last is kept)"})
    batch_size: int = field(default=16, metadata={"help": "training batch size (AdamW)"})
    lr: float = field(default=0.0, metadata={
        "help": "learning rate of the encoder (its LoRA adapters, or all of it); 0 = the mode's default (lora 5e-4, "
                "full 5e-5)"})
    head_lr: float = field(default=3e-3, metadata={"help": "learning rate of the linear head, > 0"})
    warmup: float = field(default=1.0, metadata={
        "help": "lora, full: epochs of rising learning rate (it shields the pretrained encoder from the new head's "
                "first gradients), then linear decay to 0 at the last epoch; head mode, with nothing to shield: decay "
                "only"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay, >= 0"})
    max_length: int = field(default=0, metadata={
        "help": "tokens per text; 0 = fit the data (95th-percentile token count, multiple of 16, <= 256)"})
    class_balanced: bool = field(default=True, metadata={
        "help": "weight the loss so every label present counts the same (n / (labels x the label's count))"})
    lora_rank: int = field(default=8, metadata={"help": "lora mode: adapter rank, >= 1"})
    lora_alpha: float = field(default=16.0, metadata={"help": "lora mode: adapter scale"})
    dp_epsilon: float = field(default=math.inf, metadata={
        "help": "train the head with DP-SGD at this epsilon per silo and run (fedbridge.privacy.dp_slm; head mode "
                "only): fixed epochs, no class balancing, no validation part; inf = not DP"})
    dp_clip: float = field(default=1.0, metadata={"help": "DP-SGD: per-example gradient norm bound"})
    dp_lr: float = field(default=3.0, metadata={
        "help": "DP-SGD: SGD learning rate, momentum 0.9 (Adam's per-coordinate scaling amplifies the noise)"})
    dp_batch_size: int = field(default=64, metadata={
        "help": "DP-SGD: expected Poisson batch (larger batches: less noise per example)"})

    def __post_init__(self) -> None:
        for key, value, allowed in (("mode", self.mode, SLM_MODES), ("pooling", self.pooling, POOLINGS)):
            if value not in allowed:
                raise ConfigError(f"Unknown slm.{key} '{value}'. Use one of: {', '.join(allowed)}.")
        if self.epochs < 0 or self.patience < 1 or self.batch_size < 1 or self.max_length < 0 or self.lora_rank < 1:
            raise ConfigError("slm.epochs and slm.max-length must be >= 0 (0 = automatic); slm.patience, "
                              "slm.batch-size and slm.lora-rank >= 1.")
        if not 0.0 <= self.validation_fraction < 0.9 or self.warmup < 0:
            raise ConfigError("slm.validation-fraction must be in [0, 0.9) and slm.warmup (epochs) >= 0.")
        if not self.dp_epsilon > 0 or not self.dp_clip > 0 or not self.dp_lr > 0 or self.dp_batch_size < 1:
            raise ConfigError("slm.dp-epsilon must be > 0 (inf = no DP), slm.dp-clip and slm.dp-lr > 0, "
                              "slm.dp-batch-size >= 1.")
        if self.private and self.mode != "head":
            raise ConfigError(f"slm.dp-epsilon trains the SLM's head with DP-SGD on frozen features; slm.mode="
                              f"{self.mode} would train the encoder too, which fedbridge does not clip per example. "
                              "Use slm.mode=head, or slm.dp-epsilon=inf.")
        if self.lr < 0 or self.head_lr <= 0 or self.weight_decay < 0:
            raise ConfigError("slm.lr must be >= 0 (0 = the mode's default), slm.head-lr > 0, slm.weight-decay >= 0.")

    @property
    def private(self) -> bool:
        """Whether the SLM trains with DP-SGD (``slm.dp-epsilon`` finite)."""
        return math.isfinite(self.dp_epsilon)

    @property
    def max_epochs(self) -> int:
        return self.epochs or (DP_EPOCHS if self.private else DEFAULT_EPOCHS[self.mode])

    @property
    def encoder_lr(self) -> float:
        return self.lr or DEFAULT_LR[self.mode]


@dataclass
class TrainStats:
    examples: int  # examples seen, over all epochs
    steps: int
    seconds: float
    final_loss: float
    epochs: int = 0  # epochs run
    best_epoch: int = 0  # the epoch kept (early stopping); = epochs without validation
    validation: int = 0  # examples held out to choose it
    privacy: dict = field(default_factory=dict)  # a DP training's privacy record, as it leaves the silo; {}: not DP

    @property
    def examples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------ the model

# (encoder key, pooling) -> (text, tokens read) -> features. Keyed by the tokens a text was read with, not by the
# SLM's max length: every silo fits its own, and a text shorter than both reads the same, so silos in one process
# share one embedding of the global test set instead of one per max length.
_FEATURES: dict[tuple[str, str], dict[tuple[str, int], np.ndarray]] = {}
_TOKEN_COUNTS: dict[str, dict[str, int]] = {}  # encoder key -> text -> its token count


def clear_feature_cache() -> None:
    """Forget every cached frozen feature (a benchmark that must time each silo as if it were its own process)."""
    _FEATURES.clear()
    _TOKEN_COUNTS.clear()


class SLM(torch.nn.Module):
    """Encoder + pooling + linear head. ``key`` names the pretrained encoder (its spec): frozen features are cached
    under it, so every head-mode SLM of one spec in a process shares one encoder and one feature cache."""

    def __init__(self, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_labels: int,
                 options: SLMOptions, key: str) -> None:
        super().__init__()
        self.options, self.key, self.tokenizer = options, key, tokenizer
        if getattr(encoder, "pooler", None) is not None:  # BERT's [CLS] pooler is not our pooling: never used
            encoder.pooler = None
        hidden = encoder.config.hidden_size
        layers = encoder.config.num_hidden_layers if options.pooling == "mean-layers" else 1
        if options.mode == "head":
            encoder.requires_grad_(False)
            self._frozen = [encoder.eval()]  # in a list: not a submodule, so not in state_dict() nor trained
        else:
            if options.mode == "lora":
                encoder = _with_lora(encoder, options)
            self.encoder = encoder
        self.head = torch.nn.Linear(hidden * layers, num_labels)
        self.max_length = options.max_length  # 0 until fitted to the training texts (fit_max_length)

    @property
    def num_labels(self) -> int:
        return self.head.out_features

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def body(self) -> PreTrainedModel:
        return self._frozen[0] if self.options.mode == "head" else self.encoder

    # -------------------------------------------------------------- what the mode trains

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights this mode trains, by name: the head, the LoRA adapters + head, or everything."""
        return {k: v.detach() for k, v in self.named_parameters() if v.requires_grad}

    def load_trainable_state(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Put back a ``trainable_state()`` (or raise RuntimeError naming the mismatch, as ``load_state_dict``)."""
        mine = dict(self.named_parameters())
        expected = {k for k, v in mine.items() if v.requires_grad}
        if set(weights) != expected:
            missing, unexpected = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__} ({self.options.mode} "
                               f"mode): missing {missing}, unexpected {unexpected}.")
        with torch.no_grad():
            for name, value in weights.items():
                if mine[name].shape != value.shape:
                    raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: '{name}' has shape "
                                       f"{tuple(value.shape)}, this SLM {tuple(mine[name].shape)}.")
                mine[name].copy_(value)

    # -------------------------------------------------------------- features and logits

    def fit_max_length(self, texts: Sequence[str]) -> int:
        """Tokens per text: ``slm.max-length``, or (0) the 95th-percentile token count of ``texts``, rounded up to a
        multiple of 16 and at most 256 (a DP SLM: 256, which depends on no private text). Fixed at the first call,
        so training and evaluation agree."""
        if not self.max_length and self.options.private:
            self.max_length = int(min(FIT_CAP, getattr(self.body.config, "max_position_embeddings", FIT_CAP)))
        if not self.max_length:
            counts = [len(ids) for ids in self.tokenizer(list(texts[:2000]), truncation=False)["input_ids"]] or [16]
            fitted = FIT_MULTIPLE * math.ceil(np.percentile(counts, FIT_PERCENTILE) / FIT_MULTIPLE)
            limit = getattr(self.body.config, "max_position_embeddings", FIT_CAP)
            self.max_length = int(min(max(fitted, FIT_MULTIPLE), FIT_CAP, limit))
        return self.max_length

    def _pool(self, texts: Sequence[str]) -> torch.Tensor:
        enc = self.tokenizer(list(texts), truncation=True, max_length=self.fit_max_length(texts), padding=True,
                             return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        pooling = self.options.pooling
        out = self.body(**enc, output_hidden_states=pooling == "mean-layers")
        if pooling == "cls":
            return out.last_hidden_state[:, 0]
        mask = enc["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
        hidden = out.hidden_states[1:] if pooling == "mean-layers" else (out.last_hidden_state,)
        return torch.cat([F.normalize((h * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1) for h in hidden], -1)

    @torch.no_grad()
    def frozen_features(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Head mode: the frozen encoder's pooled features, each text computed once per process for each number of
        tokens it is read with (its own length, or this SLM's max length when longer)."""
        limit = self.fit_max_length(texts)
        counts = _TOKEN_COUNTS.setdefault(self.key, {})
        if new := list(dict.fromkeys(t for t in texts if t not in counts)):
            counts.update(zip(new, map(len, self.tokenizer(new, truncation=False)["input_ids"])))
        keys = [(t, min(counts[t], limit)) for t in texts]
        cache = _FEATURES.setdefault((self.key, self.options.pooling), {})
        todo = list(dict.fromkeys(k for k in keys if k not in cache))
        for i in range(0, len(todo), batch_size):  # _pool reads at most `limit` tokens: each key's own count
            chunk = todo[i:i + batch_size]
            cache.update(zip(chunk, self._pool([t for t, _ in chunk]).float().cpu().numpy()))
        if not texts:
            return torch.zeros((0, self.head.in_features), device=self.device)
        return torch.from_numpy(np.stack([cache[k] for k in keys])).to(self.device)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        features = self.frozen_features(texts) if self.options.mode == "head" else self._pool(texts)
        return self.head(features.to(self.head.weight.dtype))


def _with_lora(encoder: PreTrainedModel, options: SLMOptions) -> PreTrainedModel:
    from peft import LoraConfig, get_peft_model

    try:  # peft knows the attention projections of common encoders (BERT: query, value)
        config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=0.0)
        return get_peft_model(encoder, config)
    except ValueError:  # an architecture peft has no default for: every linear layer
        config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=0.0,
                            target_modules="all-linear")
        return get_peft_model(encoder, config)


# ------------------------------------------------------------------ training

def class_balanced_weights(targets: np.ndarray, num_labels: int) -> np.ndarray:
    """Per-example weights n / (K * n_k), K the labels present, so every label carries the same total weight and the
    weights average 1: a silo with a few hundred examples of a 65 %-majority label otherwise learns to answer the
    majority label. Soft targets count fractionally."""
    targets = np.asarray(targets)
    counts = targets.sum(axis=0) if targets.ndim == 2 else np.bincount(targets, minlength=num_labels)
    per_class = len(targets) / (max(int((counts > 0).sum()), 1) * np.maximum(counts, 1e-8))
    return targets @ per_class if targets.ndim == 2 else per_class[targets]


def validation_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, validation) indices: a stratified ``fraction`` held out where every label has two examples, random
    otherwise; no validation when it would hold fewer than two examples."""
    n = len(labels)
    if fraction <= 0 or round(n * fraction) < 2 or n - round(n * fraction) < 1:
        return list(range(n)), []
    counts = np.bincount(np.asarray(labels, dtype=int))
    stratify = labels if counts[counts > 0].min() >= 2 and round(n * fraction) >= (counts > 0).sum() else None
    fit, val = train_test_split(np.arange(n), test_size=round(n * fraction), random_state=seed, stratify=stratify)
    return sorted(fit.tolist()), sorted(val.tolist())


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor, soft: bool) -> torch.Tensor:
    """Each example's cross-entropy: against its label id, or (``soft``) against a row of soft labels."""
    return -(targets * F.log_softmax(logits, -1)).sum(-1) if soft else F.cross_entropy(logits, targets,
                                                                                        reduction="none")


def train_classifier(model: SLM, texts: Sequence[str], targets: Sequence[int] | np.ndarray,
                     cfg: SLMOptions = SLMOptions(), sample_weights: Sequence[float] | None = None, seed: int = 0,
                     progress: str | None = None, validation: tuple[Sequence[str], Sequence[int]] | None = None,
                     proximal_mu: float = 0.0) -> TrainStats:
    """Train in place and return how it went.

    ``targets`` are label ids, or an (n, num_labels) array of soft labels for distillation. ``sample_weights`` scale
    each example's loss (e.g. synthetic data); ``cfg.class_balanced`` multiplies them by ``class_balanced_weights``.
    With ``validation`` (texts, labels), every epoch is scored by macro-F1 on it (ties: the lower loss), training
    stops after ``cfg.patience`` epochs without a better one, and the best epoch's weights are kept.
    ``proximal_mu`` > 0 adds FedProx's term μ/2 · ||w − w_start||² over the trained weights (Li et al. 2020).
    """
    if len(texts) == 0:
        raise ValueError("No training examples: the silo's training split is empty.")
    t0 = time.perf_counter()
    texts = list(texts)
    model.fit_max_length(texts)
    soft = np.asarray(targets).ndim == 2
    targets_t = torch.tensor(np.asarray(targets), dtype=torch.float32 if soft else torch.long)
    weights = np.ones(len(texts)) if sample_weights is None else np.asarray(sample_weights, dtype=np.float64)
    if cfg.class_balanced:
        weights = weights * class_balanced_weights(targets, model.num_labels)
    weights_t = torch.tensor(weights, dtype=torch.float32)
    head_mode = cfg.mode == "head"
    inputs = model.frozen_features(texts) if head_mode else None  # head mode: computed once, reused every epoch
    groups = [{"params": list(model.head.parameters()), "lr": cfg.head_lr}]
    if not head_mode:
        groups.append({"params": [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")],
                       "lr": cfg.encoder_lr})
    optim = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    n_batches, epochs = -(-len(texts) // cfg.batch_size), cfg.max_epochs
    warmup = 0 if head_mode else min(int(cfg.warmup * n_batches), epochs * n_batches - 1)
    schedule = get_linear_schedule_with_warmup(optim, warmup, epochs * n_batches)
    generator = torch.Generator().manual_seed(seed)
    val_inputs = None
    if validation is not None and len(validation[0]):
        val_inputs = model.frozen_features(list(validation[0])) if head_mode else list(validation[0])
    start = {n: v.detach().clone() for n, v in model.named_parameters() if v.requires_grad} if proximal_mu else {}
    best, best_state, since_best = (-math.inf, -math.inf), None, 0
    stats = TrainStats(examples=0, steps=0, seconds=0.0, final_loss=float("nan"),
                       validation=0 if validation is None else len(validation[0]))
    bar = tqdm(total=epochs * n_batches, desc=progress, disable=progress is None, unit="step")
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(texts), generator=generator).split(cfg.batch_size):
            logits = model.head(inputs[idx]) if head_mode else model([texts[i] for i in idx])
            y = targets_t[idx].to(model.device)
            per_example = per_example_loss(logits, y, soft)
            w = weights_t[idx].to(model.device)
            loss = (per_example * w).sum() / w.sum().clamp_min(1e-8)
            if start:
                loss = loss + proximal_mu / 2 * sum(((v - start[n]) ** 2).sum() for n, v in model.named_parameters()
                                                    if n in start)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            schedule.step()
            stats.steps, stats.examples, stats.final_loss = stats.steps + 1, stats.examples + len(idx), loss.item()
            bar.update(1)
        stats.epochs = epoch
        if val_inputs is None:
            continue
        score = _validation_score(model, val_inputs, np.asarray(validation[1]), head_mode)
        if score > best:
            best, best_state, since_best, stats.best_epoch = score, copy.deepcopy(model.trainable_state()), 0, epoch
            bar.set_postfix(val_f1=f"{score[0]:.3f}", epoch=epoch)
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    bar.close()
    if best_state is not None:
        model.load_trainable_state(best_state)
    else:
        stats.best_epoch = stats.epochs
    model.eval()
    stats.seconds = time.perf_counter() - t0
    return stats


@torch.no_grad()
def _validation_score(model: SLM, inputs, labels: np.ndarray, head_mode: bool) -> tuple[float, float]:
    """(macro-F1, −loss) on the validation part: compared as a tuple, so the loss breaks F1 ties."""
    model.eval()
    logits = model.head(inputs) if head_mode else torch.cat([model(inputs[i:i + 64]) for i in range(0, len(inputs), 64)])
    y = torch.as_tensor(labels, device=logits.device)
    f1 = f1_score(labels, logits.argmax(-1).cpu().numpy(), average="macro", zero_division=0)
    return float(f1), -float(F.cross_entropy(logits.float(), y))


@torch.no_grad()
def predict_proba(model: SLM, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Class probabilities, shape (len(texts), num_labels)."""
    model.eval()
    if not len(texts):
        return np.zeros((0, model.num_labels), dtype=np.float32)
    out = [torch.softmax(model(texts[i:i + batch_size]).float(), -1) for i in range(0, len(texts), batch_size)]
    return torch.cat(out).cpu().numpy()
