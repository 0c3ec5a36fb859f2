"""Differential privacy for silo data: one privacy ledger per silo, the DP synthesis mechanisms that charge it
(DP-SGD generator fine-tuning for FDKT, training-free DP few-shot generation), and memorisation audits."""

from fedbridge.privacy.accounting import (
    PrivacyEvent,
    PrivacyLedger,
    calibrate_noise,
    compute_epsilon,
    noise_for_epsilon,
)
from fedbridge.privacy.canaries import (
    Canary,
    CopyDetector,
    canary_rank,
    candidate_secrets,
    exposure,
    levenshtein,
    make_canary,
    min_normalized_levenshtein,
    normalized_levenshtein,
    plant,
    verbatim_copy_rate,
)
from fedbridge.privacy.dp_fewshot import (
    DPFewShotConfig,
    aggregate_noise_std,
    dp_fewshot_synthesize,
    fewshot_events,
    noisy_argmax,
    noisy_average,
    sigma_for_epsilon,
)
from fedbridge.privacy.dp_sgd import DPSGDConfig, TrainReport, dp_sgd_synthesize, dp_sgd_train, sample_synthetic
from fedbridge.privacy.synthesis import SynthesisResult, privacy_generator

__all__ = [
    "Canary", "CopyDetector", "DPFewShotConfig", "DPSGDConfig", "PrivacyEvent", "PrivacyLedger", "SynthesisResult",
    "TrainReport", "aggregate_noise_std", "calibrate_noise", "candidate_secrets", "canary_rank", "compute_epsilon",
    "dp_fewshot_synthesize", "dp_sgd_synthesize", "dp_sgd_train", "exposure", "fewshot_events", "levenshtein",
    "make_canary", "min_normalized_levenshtein", "noise_for_epsilon", "noisy_argmax", "noisy_average",
    "normalized_levenshtein", "plant", "privacy_generator", "sample_synthetic", "sigma_for_epsilon",
    "verbatim_copy_rate",
]
