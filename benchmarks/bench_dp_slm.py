"""What a DP-trained SLM costs: ``local`` macro-F1 of each silo's SLM on the global test set, non-private against
DP-SGD of the head (``slm.dp-epsilon``) at ε = 8, 4, 1 per silo, on drug-reviews and tweets, seeds 0-2.

    python benchmarks/bench_dp_slm.py
    python benchmarks/bench_dp_slm.py --tasks tweets --seeds 0 --poolings mean

Rows per pooling (``slm.pooling``): the default non-private recipe (early stopping on a private validation part,
class-balanced loss, AdamW); the DP recipe with no noise (σ = 0: fixed epochs, no balancing, clipping, SGD; it
separates what the recipe costs from what the noise costs; a measurement only, never a release); and the DP SLM at
each ε, trained by ``Silo.train_slm``, the silos' own code path, charged to a throwaway ledger. Tasks and
partitions as in bench_slm.py (4 silos each). Results go to OUT (JSON, resumable) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_slm import REPO, config

from fedbridge.models.slm import clear_feature_cache, predict_proba
from fedbridge.privacy import PrivacyEvent
from fedbridge.privacy.dp_slm import MECHANISM, dp_plan, dp_train_classifier
from fedbridge.silo import Silo
from fedbridge.tasks import classification_metrics, load_federation

EPSILONS = (math.inf, 8.0, 4.0, 1.0)  # inf: the DP recipe without noise
ROWS = ("non-private", *EPSILONS)


def label(row: str | float) -> str:
    return row if isinstance(row, str) else "DP recipe, σ = 0" if math.isinf(row) else f"DP ε = {row:g}"


def measure(task: str, seed: int, pooling: str, row: str | float, state: Path) -> dict:
    dp = {} if row == "non-private" else {"slm.dp-epsilon": 1.0 if math.isinf(row) else row}
    cfg = config(task, seed, "head", {"slm.pooling": pooling, **dp})
    federation = load_federation(cfg.task, cfg.partition, cfg.seed)
    test, silos = federation.global_test, []
    for index, data in enumerate(federation.silos):
        silo, t0 = Silo(index, cfg, federation.task.labels, data, state), time.process_time()
        model = silo.new_slm()
        if isinstance(row, float) and math.isinf(row):  # σ = 0 on the DP plan: the recipe's own cost
            sample_rate, steps = dp_plan(len(data.train), cfg.slm)
            stats = dp_train_classifier(model, data.train.texts, data.train.labels, cfg.slm,
                                        PrivacyEvent(0.0, sample_rate, steps, MECHANISM))
        else:
            stats = silo.train_slm(model, experiment=f"bench-{task}-{seed}-{pooling}-{row}")
        metrics = classification_metrics(test.labels, predict_proba(model, test.texts))
        silos.append({**metrics, "cpu_seconds": time.process_time() - t0, "train": len(data.train),
                      "epochs": stats.epochs, "epsilon": stats.privacy.get("epsilon", math.inf),
                      "noise_multiplier": stats.privacy.get("noise-multiplier", 0.0)})
    return {"local": silos}


def summarise(results: dict) -> str:
    rows = ["| task | pooling | SLM | seeds | local acc | local macro-F1 | F1 − non-private | σ (mean over silos) | "
            "ε per silo |", "|" + "---|" * 9]
    by: dict[tuple[str, str, str], list[dict]] = {}
    for key, entry in results.items():
        task, pooling, row, _ = key.split("/")
        by.setdefault((task, pooling, row), []).append(entry)

    def f1(entries: list[dict]) -> np.ndarray:
        return 100 * np.array([np.mean([s["macro_f1"] for s in e["local"]]) for e in entries])

    for (task, pooling, row), entries in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                            [str(r) for r in ROWS].index(kv[0][2]))):
        base = by.get((task, pooling, "non-private"))
        scores = f1(entries)
        acc = 100 * np.array([np.mean([s["accuracy"] for s in e["local"]]) for e in entries])
        gap = "—" if base is None or row == "non-private" or len(base) != len(entries) else (
            f"{(scores - f1(base)).mean():+.1f} ± {(scores - f1(base)).std():.1f}")
        sigma = np.mean([s["noise_multiplier"] for e in entries for s in e["local"]])
        eps = max(s["epsilon"] for e in entries for s in e["local"])
        name = label(row if row == "non-private" else float(row))
        rows.append(f"| {task} | {pooling} | {name} | {len(entries)} | {acc.mean():.1f} ± {acc.std():.1f} | "
                    f"{scores.mean():.1f} ± {scores.std():.1f} | {gap} | {sigma:.2f} | "
                    f"{'∞' if math.isinf(eps) else f'{eps:.2f}'} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="drug-reviews,tweets")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--poolings", default="mean-layers,mean")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dp_slm.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    with tempfile.TemporaryDirectory(prefix="bench-dp-slm-") as state:
        for task in args.tasks.split(","):
            for seed in map(int, args.seeds.split(",")):
                clear_feature_cache()  # one task and seed's features at a time: memory stays flat
                for pooling in args.poolings.split(","):
                    for row in ROWS:
                        key = f"{task}/{pooling}/{row}/{seed}"
                        if key in results:
                            continue
                        t0 = time.perf_counter()
                        results[key] = measure(task, seed, pooling, row, Path(state))
                        args.out.parent.mkdir(parents=True, exist_ok=True)
                        args.out.write_text(json.dumps(results, indent=1))
                        args.out.with_suffix(".md").write_text(summarise(results))
                        f1 = np.mean([s["macro_f1"] for s in results[key]["local"]])
                        print(f"{key}: local F1 {100 * f1:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(summarise(results))


if __name__ == "__main__":
    main()
