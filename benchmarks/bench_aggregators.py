"""Weight-sharing aggregators side by side: ``fedavg`` with each of Flower's strategies (``fedavg.strategy``) on tweets
with Dirichlet silos (α = 0.1 and 0.5), seeds 0-2, clean and with one adversarial silo (silo 0's weights x -10,
``faults.adversarial-silos``), next to ``local``.

    python benchmarks/bench_aggregators.py
    python benchmarks/bench_aggregators.py --alphas 0.5 --seeds 0 --strategies FedAvg,FedMedian

Settings: 1,000 tweets, 4 silos, head mode, 10 rounds x 5 local epochs (the fedavg defaults), run in-process (the
same ServerApp and ClientApp code as the simulation engine; the frozen features are cached across runs). Macro-F1
on the server's global test set. Results go to OUT (JSON, one entry per run, resumable), a Markdown table and a plot.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedbridge.config import ExperimentConfig
from fedbridge.simulations.runner import run_inprocess

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "aggregators"
TASK = {"task.name": "tweets", "task.max-examples": 1000, "partition.kind": "dirichlet", "partition.num-silos": 4}
STRATEGIES = {  # Flower's strategies with the options used here (Flower's defaults where none is given)
    "FedAvg": "", "FedProx": "proximal_mu=0.01", "FedAvgM": "server_momentum=0.9", "FedAdam": "eta=0.01",
    "FedYogi": "eta=0.01", "FedAdagrad": "eta=0.01", "FedMedian": "", "FedTrimmedAvg": "beta=0.25",
    "Krum": "num_malicious_nodes=1", "MultiKrum": "num_malicious_nodes=1,num_nodes_to_select=2",
}
ADVERSARY = {"faults.adversarial-silos": "0", "faults.adversarial-scale": -10.0}


def run(alpha: float, seed: int, method: str, strategy: str = "", adversarial: bool = False) -> dict:
    flat = {**ExperimentConfig().to_run_config(), **TASK, "partition.alpha": alpha, "seed": seed, "method": method,
            "results-dir": str(OUT / "runs"), **(ADVERSARY if adversarial else {})}
    if method == "fedavg":
        flat |= {"fedavg.strategy": strategy, "fedavg.strategy-options": STRATEGIES[strategy]}
    flat["run-name"] = f"{method}-{strategy or 'none'}-a{alpha}-s{seed}{'-adv' if adversarial else ''}"
    t0 = time.perf_counter()
    record = run_inprocess(ExperimentConfig.from_run_config(flat))
    return {"status": record.status, "macro_f1": record.global_metrics.get("macro_f1", float("nan")),
            "accuracy": record.global_metrics.get("accuracy", float("nan")), "seconds": time.perf_counter() - t0}


def summarise(results: dict) -> str:
    alphas = sorted({float(k.split("/")[0]) for k in results})
    rows = ["| aggregator | " + " | ".join(f"α = {a:g} clean | α = {a:g}, silo 0 × −10" for a in alphas) + " |",
            "|---|" + "---|" * (2 * len(alphas))]
    names = ["local"] + [s for s in STRATEGIES if any(f"/{s}/" in k for k in results)]
    for name in names:
        cells = []
        for alpha in alphas:
            for adv in ("clean", "adversarial"):
                f1 = [100 * v["macro_f1"] for k, v in results.items()
                      if k.startswith(f"{alpha:g}/{name}/{adv}/") and v["status"] == "ok"]
                cells.append(f"{np.mean(f1):.1f} ± {np.std(f1):.1f} ({len(f1)})" if f1 else "—")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n\nMacro-F1 % on the global test set, mean ± std over seeds (runs).\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = sorted({float(k.split("/")[0]) for k in results})
    names = ["local", *STRATEGIES]
    fig, axes = plt.subplots(1, len(alphas), figsize=(6 * len(alphas), 4), squeeze=False)
    for ax, alpha in zip(axes[0], alphas):
        for offset, adv in ((-0.2, "clean"), (0.2, "adversarial")):
            means = [np.mean([100 * v["macro_f1"] for k, v in results.items()
                              if k.startswith(f"{alpha:g}/{n}/{adv}/")] or [np.nan]) for n in names]
            ax.bar(np.arange(len(names)) + offset, means, 0.4, label=adv)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_title(f"tweets, Dirichlet α = {alpha:g}")
        ax.set_ylabel("global macro-F1 %")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--alphas", default="0.1,0.5")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    path = OUT / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    OUT.mkdir(parents=True, exist_ok=True)
    for alpha in map(float, args.alphas.split(",")):
        for seed in map(int, args.seeds.split(",")):
            jobs = [("local", "", False)] + [("fedavg", s, adv) for adv in (False, True)
                                             for s in args.strategies.split(",")]
            for method, strategy, adv in jobs:
                key = f"{alpha:g}/{strategy or method}/{'adversarial' if adv else 'clean'}/{seed}"
                if key in results or (method == "local" and adv):
                    continue
                results[key] = run(alpha, seed, method, strategy, adv)
                path.write_text(json.dumps(results, indent=1))
                print(f"{key}: macro-F1 {100 * results[key]['macro_f1']:.1f} ({results[key]['seconds']:.0f} s)",
                      flush=True)
    (OUT / "table.md").write_text(summarise(results))
    plot(results, OUT / "aggregators.png")
    print(summarise(results))


if __name__ == "__main__":
    main()
