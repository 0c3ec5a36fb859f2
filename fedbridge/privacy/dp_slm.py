"""A DP-trained SLM: DP-SGD (Opacus) on the SLM's head over the frozen encoder's features, so its weights, its
scores and its predictions are post-processing of a DP model and may leave a silo that allows only DP releases.

What keeps the guarantee, beside per-example clipping and Gaussian noise:
  - Poisson batches at a public rate q = 1 / ceil(bound / batch), ``bound`` a public lower bound on the training
    set (the silo's ``count-bound``; the exact count only where the silo lets such details leave), and the noisy
    sum averaged over the public expected batch (Opacus would divide by the private count times q);
  - no choice made on private data: fixed epochs (no early stopping on a private validation part), no
    class-balanced loss weights (they come from private label counts), a token length from config, not fitted to
    the private texts (``SLM.fit_max_length``);
  - the ledger is charged (σ, q, steps) before the first step, and Opacus's accountant must show the same after.
Plain SGD with momentum and no weight decay, not AdamW: Adam divides each coordinate by its running gradient scale, which under DP is
the noise's, so every coordinate random-walks at the learning rate (measured: majority-label heads at ε = 50).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from fedbridge.errors import ConfigError
from fedbridge.models.slm import SLM, SLMOptions, TrainStats, per_example_loss
from fedbridge.privacy.accounting import PrivacyEvent
from fedbridge.privacy.dp_sgd import noise_only_step
from fedbridge.privacy.synthesis import privacy_generator

MECHANISM = "dp-sgd SLM head"
MOMENTUM = 0.9


def dp_plan(bound: int, cfg: SLMOptions) -> tuple[float, int]:
    """(q, steps) of one DP training on a set of at least ``bound`` examples: Opacus's rule, q = 1 / batches per
    epoch, with the batches counted from the public bound."""
    if bound < 1:
        raise ConfigError("A DP SLM needs a public lower bound of at least 1 training example.")
    per_epoch = max(1, math.ceil(bound / cfg.dp_batch_size))
    return 1 / per_epoch, cfg.max_epochs * per_epoch


def dp_train_classifier(model: SLM, texts: Sequence[str], targets: Sequence[int] | np.ndarray, cfg: SLMOptions,
                        event: PrivacyEvent, sample_weights: Sequence[float] | None = None,
                        noise_seed: int | None = None, progress: str | None = None) -> TrainStats:
    """Train ``model``'s head in place with DP-SGD at the charged ``event`` (σ, q, steps): hard or soft
    ``targets``, per-example loss weights from public quantities only (``sample_weights``, e.g. synthetic data)."""
    if cfg.mode != "head":
        raise ConfigError(f"A DP SLM trains its head only (slm.mode=head), not slm.mode={cfg.mode}.")
    t0 = time.perf_counter()
    soft = np.asarray(targets).ndim == 2
    targets_t = torch.tensor(np.asarray(targets), dtype=torch.float32 if soft else torch.long)
    weights_t = torch.tensor(np.ones(len(texts)) if sample_weights is None else np.asarray(sample_weights),
                             dtype=torch.float32)
    features = model.frozen_features(list(texts))
    optimizer = torch.optim.SGD(model.head.parameters(), lr=cfg.dp_lr, momentum=MOMENTUM)  # no weight decay: at
    # this learning rate, SGD's coupled decay of 0.01 shrinks the head 3 % a step (measured: majority-label heads)
    loader = DPDataLoader(TensorDataset(torch.arange(len(texts))), sample_rate=event.sample_rate,
                          generator=privacy_generator(noise_seed))
    engine = PrivacyEngine(accountant="rdp")
    model.head.train()
    head, optimizer, loader = engine.make_private(
        module=model.head, optimizer=optimizer, data_loader=loader, noise_multiplier=event.noise_multiplier,
        max_grad_norm=cfg.dp_clip, poisson_sampling=False, loss_reduction="mean",
        noise_generator=privacy_generator(None if noise_seed is None else noise_seed + 1, model.device))
    if (loader.sample_rate, cfg.max_epochs * len(loader)) != (event.sample_rate, event.steps):
        raise RuntimeError(f"Opacus plans q={loader.sample_rate}, {cfg.max_epochs * len(loader)} steps; the ledger "
                           f"was charged q={event.sample_rate}, {event.steps} steps")
    optimizer.expected_batch_size = cfg.dp_batch_size  # a public constant (Opacus: the private count x q)
    schedule = get_linear_schedule_with_warmup(optimizer.original_optimizer, 0, event.steps)
    stats = TrainStats(examples=0, steps=0, seconds=0.0, final_loss=float("nan"))
    with tqdm(total=event.steps, desc=progress, disable=progress is None, unit="step") as bar:
        for epoch in range(1, cfg.max_epochs + 1):
            for (idx,) in loader:
                optimizer.zero_grad(set_to_none=True)
                if len(idx) == 0:  # an empty Poisson batch: still a counted, noisy step
                    noise_only_step(optimizer)
                else:
                    logits = head(features[idx])
                    y = targets_t[idx].to(model.device)
                    w = weights_t[idx].to(model.device)
                    loss = (per_example_loss(logits, y, soft) * w).mean()  # the "mean" Opacus is told
                    loss.backward()
                    optimizer.step()
                    stats.final_loss = loss.item()
                schedule.step()
                stats.steps, stats.examples = stats.steps + 1, stats.examples + len(idx)
                bar.update()
            stats.epochs = stats.best_epoch = epoch
    head.cleanup()  # drop the per-sample-gradient hooks from the SLM's head
    if engine.accountant.history != [(event.noise_multiplier, event.sample_rate, event.steps)]:
        raise RuntimeError(f"Opacus accounted {engine.accountant.history}; the ledger was charged "
                           f"{[(event.noise_multiplier, event.sample_rate, event.steps)]}")
    model.eval()
    stats.seconds = time.perf_counter() - t0
    return stats
