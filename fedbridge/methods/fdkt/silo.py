"""FDKT's silo side: DP synthetic demonstrations of the private training split, through the silo's one DP
release path (``Silo.dp_release``).

Both mechanisms take the generator from the LLM interface's exact path (``exact()``), whatever ``llm.engine`` says:
DP few-shot needs the full next-token distribution of every prompt at every step (its DP analysis assumes them; an
engine returns the top ``max_logprobs``) from its packed, KV-cached forward, and DP-SGD trains the generator."""

from __future__ import annotations

import dataclasses

from fedbridge.config import from_flat
from fedbridge.methods.fdkt.config import FDKTConfig
from fedbridge.models.llm import load_llm_interface
from fedbridge.privacy import DPFewShotConfig, DPSGDConfig, SynthesisResult, dp_fewshot_synthesize, dp_sgd_synthesize
from fedbridge.privacy.dp_fewshot import sigma_for_epsilon
from fedbridge.privacy.policy import RunLedger
from fedbridge.silo import Silo
from fedbridge.tasks import Examples


def synthesize(silo: Silo, experiment: str = "") -> tuple[Examples, dict, dict[str, float]]:
    """DP synthetic demonstrations of the private training split: (examples, privacy cost, metrics)."""
    cfg = from_flat(FDKTConfig, silo.cfg.method_options, "fdkt")
    texts, labels = list(silo.data.train.texts), list(silo.data.train.labels)

    def release(ledger: RunLedger, noise_seed: int | None) -> SynthesisResult:
        budget = min(cfg.epsilon, ledger.remaining())
        generator = load_llm_interface(cfg.generator, silo.device)  # fedbridge's backend: only its exact path is used
        if cfg.mechanism == "dp-sgd":
            model, tok = generator.exact(trainable=True)
            mech = DPSGDConfig(target_epsilon=budget, max_grad_norm=cfg.clip, epochs=cfg.sgd_epochs,
                               batch_size=cfg.sgd_batch_size, lr=cfg.sgd_lr, num_per_label=cfg.num_per_label,
                               min_words=cfg.min_words, noise_seed=noise_seed, max_length=cfg.sgd_max_length,
                               size_bound=silo.count_bound(per_label=False))
            return dp_sgd_synthesize(model, tok, texts, labels, silo.labels, mech, ledger,
                                     silo.cfg.seed + silo.index)
        model, tok = generator.exact()
        mech = DPFewShotConfig(num_groups=cfg.groups, shots_per_group=cfg.shots_per_group,
                               max_tokens=cfg.max_tokens, public_top_k=cfg.public_top_k,
                               num_per_label=cfg.num_per_label, min_words=cfg.min_words, noise_seed=noise_seed,
                               max_text_chars=cfg.max_text_chars, sigma=0.0, count_bound=silo.count_bound())
        sigma = sigma_for_epsilon(budget, ledger.delta, labels, len(silo.labels), mech)
        return dp_fewshot_synthesize(model, tok, texts, labels, silo.labels,
                                     dataclasses.replace(mech, sigma=sigma), ledger)

    result, privacy = silo.dp_release("FDKT demonstrations", cfg.epsilon, cfg.noise_seed, experiment, release)
    metrics = {"synth.examples": len(result.examples),
               **{f"synth.seconds-{k}": v for k, v in result.seconds.items()},
               **{f"synth.tokens-{k}": v for k, v in result.tokens.items()}}
    return Examples.of([t for t, _ in result.examples], [y for _, y in result.examples]), privacy, metrics
