"""FDKT benchmark: DP synthesis throughput of both silo mechanisms, DP-SGD's step cost over plain SGD, peak memory.

    python benchmarks/bench_fdkt.py [--quick] [--texts 64] [--out PATH]

Default: the embedded LLM (SmolLM2-135M) as the silo's generator, on the first ``--texts`` training texts
of the drug-review task. ``--quick`` swaps in the tiny random test LM and small settings, only to check
that the script works (its figures mean nothing). Writes benchmarks/results/fdkt.json (fdkt-quick.json
with --quick): figures from one run, on this machine, side by side.

Memory: per phase, the peak resident set size (RSS) of this process, sampled every 10 ms by a thread
(psutil), minus the RSS when the phase started; plus ``ru_maxrss`` (the process's lifetime peak RSS,
from ``resource.getrusage``) after each phase. RSS covers torch's native allocations, which tracemalloc
does not see.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from fedbridge.config import TaskConfig
from fedbridge.models.generation import SamplingConfig
from fedbridge.models.loading import load_llm
from fedbridge.privacy import (
    DPFewShotConfig,
    DPSGDConfig,
    PrivacyLedger,
    dp_fewshot_synthesize,
    dp_sgd_synthesize,
    dp_sgd_train,
    sigma_for_epsilon,
)
from fedbridge.results import package_versions
from fedbridge.tasks import load_task

RESULTS = Path(__file__).parent / "results"
DELTA = 1e-5
EPSILON = 4.0
MB = 1024 * 1024


class PeakRSS:
    """Peak RSS of this process while the block runs, sampled by a background thread."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval, self.process = interval, psutil.Process()
        self.start = self.peak = 0

    def _sample(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            stop.wait(self.interval)

    @contextmanager
    def measure(self):
        self.start = self.peak = self.process.memory_info().rss
        stop = threading.Event()
        thread = threading.Thread(target=self._sample, args=(stop,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, self.process.memory_info().rss)

    def as_dict(self) -> dict:
        return {"peak_rss_mb": round(self.peak / MB, 1), "peak_rss_increase_mb": round((self.peak - self.start) / MB, 1),
                "ru_maxrss_mb_after": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def bench_dp_fewshot(model, tok, texts, labels, names, quick: bool) -> dict:
    cfg = DPFewShotConfig(num_groups=4, shots_per_group=1, max_tokens=8 if quick else 48, public_top_k=100,
                          num_per_label=2, min_words=1, noise_seed=0, sigma=0.0)
    sigma = sigma_for_epsilon(EPSILON, DELTA, labels, len(names), cfg)
    cfg = dataclasses.replace(cfg, sigma=sigma)
    ledger = PrivacyLedger(EPSILON, DELTA)
    with PeakRSS().measure() as mem:
        t0 = time.perf_counter()
        result = dp_fewshot_synthesize(model, tok, texts, labels, names, cfg, ledger)
        seconds = time.perf_counter() - t0
    return {"config": {"groups": cfg.num_groups, "shots_per_group": cfg.shots_per_group, "max_tokens": cfg.max_tokens,
                       "public_top_k": cfg.public_top_k, "num_per_label": cfg.num_per_label,
                       "sigma": round(sigma, 4)},
            "epsilon": round(result.epsilon, 4), "examples": len(result.examples),
            "demonstrations_attempted": cfg.num_per_label * len(names), "seconds": round(seconds, 2),
            "examples_per_second": round(len(result.examples) / seconds, 4),
            "noisy_token_queries": result.tokens["generated"],
            "token_queries_per_second": round(result.tokens["generated"] / seconds, 2),
            "private_prompt_tokens_read": result.local["private-prompt-tokens"], **mem.as_dict()}


def _sgd_config(quick: bool, target_epsilon: float) -> DPSGDConfig:
    return DPSGDConfig(target_epsilon=target_epsilon, epochs=1, batch_size=8, lr=5e-4, max_length=64 if quick else 128,
                       num_per_label=2, min_words=1, noise_seed=0,
                       sampling=SamplingConfig(max_new_tokens=16 if quick else 64, temperature=1.0, top_p=0.9,
                                               top_k=50))


def bench_dp_sgd_synthesize(model, tok, texts, labels, names, quick: bool) -> dict:
    cfg = _sgd_config(quick, EPSILON)
    ledger = PrivacyLedger(EPSILON, DELTA)
    with PeakRSS().measure() as mem:
        t0 = time.perf_counter()
        result = dp_sgd_synthesize(model, tok, texts, labels, names, cfg, ledger, seed=0)
        seconds = time.perf_counter() - t0
    return {"note": "seconds: the whole call (noise calibration, generator copy, LoRA and Opacus setup, training, "
                    "sampling); seconds_train/seconds_sample: those loops alone",
            "config": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
                       "num_per_label": cfg.num_per_label, "max_new_tokens": cfg.sampling.max_new_tokens},
            "epsilon": round(result.epsilon, 4), "noise_multiplier": round(result.noise_multiplier, 4),
            "steps": result.steps, "examples": len(result.examples), "seconds": round(seconds, 2),
            "seconds_train": round(result.seconds["train"], 2), "seconds_sample": round(result.seconds["sample"], 2),
            "examples_per_second": round(len(result.examples) / seconds, 4), **mem.as_dict()}


def bench_dp_sgd_step(model, tok, texts, labels, names, quick: bool) -> dict:
    """The same data, epochs and expected batch size, trained with DP-SGD (ε=4: per-sample gradients, clipping,
    noise, Poisson batches) and without (ε=inf: plain AdamW on shuffled batches); time per step run."""
    out = {}
    for name, epsilon in (("dp", EPSILON), ("non_private", math.inf)):
        cfg = _sgd_config(quick, epsilon)
        with PeakRSS().measure() as mem:
            _, report = dp_sgd_train(model, tok, texts, labels, names, cfg, PrivacyLedger(epsilon, DELTA), seed=0)
        steps = len(report.batch_sizes)
        out[name] = {"target_epsilon": epsilon, "noise_multiplier": round(report.event.noise_multiplier, 4),
                     "steps": steps, "examples": sum(report.batch_sizes), "train_tokens": report.tokens,
                     "seconds": round(report.seconds, 3), "seconds_per_step": round(report.seconds / steps, 4),
                     "examples_per_second": round(sum(report.batch_sizes) / report.seconds, 2), **mem.as_dict()}
    out["note"] = ("seconds: the training loop alone (no noise calibration, LoRA or Opacus setup); steps: optimizer "
                   "steps run (DP: Poisson batches, so examples vary around steps x batch_size)")
    dp, plain = out["dp"], out["non_private"]
    out["dp_over_non_private_seconds_per_step"] = round(dp["seconds_per_step"] / plain["seconds_per_step"], 2)
    out["dp_over_non_private_seconds_per_example"] = round(
        (dp["seconds"] / max(dp["examples"], 1)) / (plain["seconds"] / plain["examples"]), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random LM and small settings: a smoke check")
    parser.add_argument("--texts", type=int, default=None, help="private training texts (default 64; 16 with --quick)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    n = args.texts or (16 if args.quick else 64)
    out = args.out or RESULTS / ("fdkt-quick.json" if args.quick else "fdkt.json")
    spec = "tiny-llama" if args.quick else "embedded"

    task = load_task(TaskConfig())
    texts, labels, names = list(task.examples.texts[:n]), list(task.examples.labels[:n]), list(task.labels)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "quick": args.quick,
               "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "platform": platform.platform(), "device": "cpu"},
               "versions": package_versions(), "generator": spec, "private_texts": n,
               "label_counts": {names[y]: labels.count(y) for y in range(len(names))}, "delta": DELTA,
               "memory_method": "per phase: peak process RSS sampled every 10 ms (psutil) and its increase over "
                                "the phase's start; ru_maxrss_mb_after: getrusage(RUSAGE_SELF).ru_maxrss, the "
                                "process's lifetime peak, after the phase"}
    with PeakRSS().measure() as mem:
        model, tok = load_llm(spec)
    results["load_generator"] = mem.as_dict()
    for key, bench in (("dp_fewshot_synthesize", bench_dp_fewshot), ("dp_sgd_synthesize", bench_dp_sgd_synthesize),
                       ("dp_sgd_step_vs_sgd", bench_dp_sgd_step)):
        results[key] = bench(model, tok, texts, labels, names, args.quick)
        print(key, json.dumps(results[key], indent=1), flush=True)
    fewshot, sgd = results["dp_fewshot_synthesize"], results["dp_sgd_synthesize"]
    results["side_by_side"] = {
        "examples_per_second": {"dp-fewshot": fewshot["examples_per_second"], "dp-sgd": sgd["examples_per_second"]},
        "dp_sgd_over_dp_fewshot_examples_per_second": round(sgd["examples_per_second"]
                                                             / max(fewshot["examples_per_second"], 1e-9), 2),
        "peak_rss_increase_mb": {"dp-fewshot": fewshot["peak_rss_increase_mb"],
                                 "dp-sgd": sgd["peak_rss_increase_mb"],
                                 "dp-sgd train step": results["dp_sgd_step_vs_sgd"]["dp"]["peak_rss_increase_mb"],
                                 "sgd train step": results["dp_sgd_step_vs_sgd"]["non_private"]["peak_rss_increase_mb"]},
        "dp_over_non_private_seconds_per_step": results["dp_sgd_step_vs_sgd"]["dp_over_non_private_seconds_per_step"],
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    print("side_by_side", json.dumps(results["side_by_side"], indent=1))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
