"""The SLM recipe, measured: every training mode for ``local`` and ``centralized`` on fedbridge's own splits, next to
the frozen-encoder probe the recipe must beat (mean-pooled MiniLM-L6, class-balanced logistic regression, C = 10).

    python benchmarks/bench_slm.py                       # drug-reviews, tweets, SMS spam x seeds 0-2 x head/lora/full
    python benchmarks/bench_slm.py --modes head --tasks tweets --seeds 0

Settings per task (those of the FDKT/CrossLM grids): drug-reviews, 4 natural silos by condition; tweets, 1,000 tweets,
4 Dirichlet(0.5) silos; SMS spam (../shared/data, skipped if absent), 1,000 messages, 4 iid silos. ``local`` trains
each silo's SLM with ``Silo.train_slm`` (the silo's own code path; the feature cache is emptied before each silo, as
each silo is its own process in a simulation) and scores it on the server's global test set; ``centralized`` is
``train_pooled``, the baseline's own function. CPU seconds are process time (both cores count), per silo for local.
Results go to OUT (JSON, one entry per task/mode/seed, resumable) and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedbridge.config import ExperimentConfig
from fedbridge.methods.centralized.server import train_pooled
from fedbridge.models.slm import clear_feature_cache, predict_proba
from fedbridge.silo import Silo
from fedbridge.simulations.cli import parse_sets
from fedbridge.tasks import classification_metrics, load_federation

REPO = Path(__file__).resolve().parents[1]
SMS = REPO.parent / "shared" / "data" / "sms_spam" / "SMSSpamCollection.tsv"
TASKS = {
    "drug-reviews": {},
    "tweets": {"task.name": "tweets", "task.max-examples": 1000, "partition.kind": "dirichlet"},
    "sms": {"task.name": str(SMS), "task.text-column": "SMS", "task.label-column": "Label",
            "task.max-examples": 1000, "partition.kind": "iid"},
}
# the bars (macro-F1 %, mean of seeds): local and centralized must beat the probe by this much
BARS = {"drug-reviews": (40.0, 47.0), "tweets": (50.0, 70.0)}


def config(task: str, seed: int, mode: str, overrides: dict | None = None) -> ExperimentConfig:
    flat = {**ExperimentConfig().to_run_config(), **TASKS[task], "seed": seed, "slm.mode": mode, **(overrides or {})}
    return ExperimentConfig.from_run_config(flat)


def _clock() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    cpu, wall = _clock()
    return cpu - t0[0], wall - t0[1]


def measure(cfg: ExperimentConfig) -> dict:
    federation = load_federation(cfg.task, cfg.partition, cfg.seed)
    test = federation.global_test
    local = []
    for index, data in enumerate(federation.silos):
        clear_feature_cache()
        silo, t0 = Silo(index, cfg, federation.task.labels, data), _clock()
        model = silo.new_slm()
        stats = silo.train_slm(model)
        metrics = classification_metrics(test.labels, predict_proba(model, test.texts))
        cpu, wall = _since(t0)
        local.append({**metrics, "cpu_seconds": cpu, "wall_seconds": wall, "epochs": stats.epochs,
                      "best_epoch": stats.best_epoch, "max_length": model.max_length, "train": len(data.train),
                      "trainable_bytes": sum(v.numel() * v.element_size() for v in model.trainable_state().values())})
    clear_feature_cache()
    t0 = _clock()
    model, stats = train_pooled(cfg, federation, cfg.slm.spec_for(0))
    metrics = classification_metrics(test.labels, predict_proba(model, test.texts))
    cpu, wall = _since(t0)
    return {"local": local, "centralized": {**metrics, "cpu_seconds": cpu, "wall_seconds": wall,
                                            "epochs": stats.epochs, "best_epoch": stats.best_epoch}}


def probe(cfg: ExperimentConfig) -> dict:
    """The issue's reference: mean-pooled, L2-normalised last-layer MiniLM-L6 features (128 tokens) and a
    class-balanced logistic regression (C = 10) per silo and on the pool."""
    from sklearn.linear_model import LogisticRegression

    from fedbridge.models.embedding import embed

    federation = load_federation(cfg.task, cfg.partition, cfg.seed)
    test = federation.global_test
    x_test = embed(list(test.texts))

    def fit(texts, labels) -> dict:
        labels = np.asarray(labels)
        if len(set(labels)) < 2:  # one label only: the probe can only answer it
            probs = np.eye(len(federation.task.labels))[np.full(len(test), labels[0])]
        else:
            clf = LogisticRegression(C=10, class_weight="balanced", max_iter=3000).fit(embed(list(texts)), labels)
            probs = np.zeros((len(test), len(federation.task.labels)))
            probs[:, clf.classes_] = clf.predict_proba(x_test)
        return classification_metrics(test.labels, probs)

    local = [fit(s.train.texts, s.train.labels) for s in federation.silos]
    pooled = fit([t for s in federation.silos for t in s.train.texts],
                 [y for s in federation.silos for y in s.train.labels])
    return {"local": local, "centralized": pooled}


def summarise(results: dict) -> str:
    """The README table: mean ± std over seeds of local (mean over silos) and centralized, F1 first."""
    rows = ["| task | mode | seeds | local acc | local F1 | centralized acc | centralized F1 | CPU s per silo "
            "(local) | CPU s centralized | trainable MB per silo |", "|" + "---|" * 10]
    by = {}
    for key, entry in results.items():
        task, mode, seed = key.split("/")
        by.setdefault((task, mode), []).append(entry)

    def ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
        v = scale * np.asarray(values)
        return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"

    order = ["probe", "head", "lora", "full"]
    for (task, mode), entries in sorted(by.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1]))):
        loc = [np.mean([s["macro_f1"] for s in e["local"]]) for e in entries]
        loc_acc = [np.mean([s["accuracy"] for s in e["local"]]) for e in entries]
        cen = [e["centralized"]["macro_f1"] for e in entries]
        cen_acc = [e["centralized"]["accuracy"] for e in entries]
        timed = mode != "probe"
        cpu_local = ms([np.mean([s["cpu_seconds"] for s in e["local"]]) for e in entries], 1, 0) if timed else "—"
        cpu_cen = ms([e["centralized"]["cpu_seconds"] for e in entries], 1, 0) if timed else "—"
        mb = f"{entries[0]['local'][0]['trainable_bytes'] / 1e6:.3f}" if timed else "—"
        rows.append(f"| {task} | {mode} | {len(entries)} | {ms(loc_acc)} | {ms(loc)} | {ms(cen_acc)} | {ms(cen)} | "
                    f"{cpu_local} | {cpu_cen} | {mb} |")
    per_seed = ["", "Macro-F1 per seed (local / centralized):", ""]
    for (task, mode), entries in sorted(by.items()):
        cells = [f"{100 * np.mean([s['macro_f1'] for s in e['local']]):.1f} / {100 * e['centralized']['macro_f1']:.1f}"
                 for e in entries]
        per_seed.append(f"- {task}, {mode}: " + ", ".join(cells))
    return "\n".join(rows + per_seed) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", default="drug-reviews,tweets,sms")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default="probe,head,lora,full")
    ap.add_argument("--set", action="append", default=[], help="run-config override key=value (repeatable)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "slm.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    overrides = parse_sets(args.set)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    for mode in args.modes.split(","):
        for task in args.tasks.split(","):
            if task == "sms" and not SMS.exists():
                print(f"skip sms: {SMS} is absent")
                continue
            for seed in map(int, args.seeds.split(",")):
                key = f"{task}/{mode}/{seed}"
                if key in results:
                    continue
                t0 = time.perf_counter()
                cfg = config(task, seed, "head" if mode == "probe" else mode, overrides)
                results[key] = probe(cfg) if mode == "probe" else measure(cfg)
                results[key]["wall_seconds"] = time.perf_counter() - t0
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=1))
                args.out.with_suffix(".md").write_text(summarise(results))
                loc = np.mean([s["macro_f1"] for s in results[key]["local"]])
                print(f"{key}: local F1 {100 * loc:.1f}, centralized F1 "
                      f"{100 * results[key]['centralized']['macro_f1']:.1f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
    print(summarise(results))


if __name__ == "__main__":
    main()
