"""Why a knowledge-transfer method gains what it gains: the synthetic examples its server sent to the silos, judged.

    python benchmarks/synthetic_quality.py benchmarks/results/transfer/drug-reviews [more dirs] --out FILE.md

For every FDKT or CrossLM record under DIR/runs, the examples the server sent (``"silo": "server"`` lines of the
run's contributions file: FDKT's augmented sets, CrossLM's per-silo selections) are scored for
  - label accuracy: how often the ``centralized`` SLM of the same task and seed (``train_pooled``, the baseline's own
    function, trained on every silo's private data pooled) predicts the label the example was written for, beside
    that judge's accuracy on the real global-test texts (its own error rate);
  - diversity: distinct-2 (unique word bigrams / all bigrams) and the mean pairwise cosine similarity of their
    MiniLM embeddings (1 = all the same);
  - size: examples each silo received;
and set beside the run's macro-F1 gain over ``local`` of the same seed (the same directory). Rows are the
comparison's rows (``fedbridge compare``'s grouping), means over seeds.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np

from fedbridge.config import ExperimentConfig
from fedbridge.methods.centralized.server import train_pooled
from fedbridge.models.embedding import embed
from fedbridge.models.slm import predict_proba
from fedbridge.privacy.audit import read_contributions
from fedbridge.results import RunRecord
from fedbridge.simulations.compare import group, load_records
from fedbridge.tasks import load_federation


@functools.lru_cache(maxsize=8)
def judge(config_items: tuple):
    """The centralized SLM for a run's task, partition, seed and SLM recipe (first spec of a mixed list), and its
    accuracy on the real global-test texts: the judge's own error rate, what a label accuracy is read against."""
    cfg = ExperimentConfig.from_run_config(dict(config_items))
    federation = load_federation(cfg.task, cfg.partition, cfg.seed)
    model = train_pooled(cfg, federation, cfg.slm.spec_for(0))[0]
    test = federation.global_test
    return model, float((predict_proba(model, test.texts).argmax(1) == np.array(test.labels)).mean())


def sent_sets(record: RunRecord, runs: Path) -> list[tuple[list[str], list[int]]]:
    """What the server sent: one (texts, labels) per CrossLM selection (silo, round), FDKT set (its DP-voted
    'synthetic' sets where it has them, else the 'augmented' ones with the LLM's labels) or Private Evolution set."""
    lines = [line for line in read_contributions(record, runs / f"{record.run_name}.json")
             if line.get("silo") == "server" and line.get("texts")]
    kinds = {line.get("kind") for line in lines}
    sent = {"selected", "synthetic"} if "synthetic" in kinds else {"selected", "augmented"}
    return [(line["texts"], line["labels"]) for line in lines if line.get("kind") in sent]


def distinct_2(texts: list[str]) -> float:
    grams = [tuple(words[i:i + 2]) for t in texts for words in [t.lower().split()] for i in range(len(words) - 1)]
    return len(set(grams)) / max(len(grams), 1)


def mean_cosine(texts: list[str]) -> float:
    if len(texts) < 2:
        return float("nan")
    vectors = embed(texts)
    sims = vectors @ vectors.T
    return float((sims.sum() - len(texts)) / (len(texts) * (len(texts) - 1)))


def quality(record: RunRecord, runs: Path) -> dict[str, float] | None:
    sets = sent_sets(record, runs)
    if not sets:
        return None
    model, real_accuracy = judge(tuple(sorted((k, v) for k, v in record.config.items())))
    texts = [t for ts, _ in sets for t in ts]
    labels = np.array([y for _, ys in sets for y in ys])
    predicted = predict_proba(model, texts).argmax(1)
    return {"label_accuracy": float((predicted == labels).mean()), "real_accuracy": real_accuracy,
            "distinct_2": distinct_2(texts),
            "mean_cosine": mean_cosine(texts), "per_silo": float(np.mean([len(ts) for ts, _ in sets])),
            "examples": float(len(texts))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    lines = ["| task | configuration | seeds | examples per silo | label accuracy (centralized SLM) | the judge on "
             "real test texts | distinct-2 | mean cosine | macro-F1 gain over local |", "|" + "---|" * 9]
    for directory in args.dirs:
        records = load_records(directory / "runs")
        local = {r.seed: r.global_metrics.get("macro_f1") for r in records if r.method == "local"}
        for row in group(records):
            scored = [(r, q) for r in row.records if (q := quality(r, directory / "runs")) is not None]
            if not scored:
                continue
            gains = [100 * (r.global_metrics["macro_f1"] - local[r.seed]) for r, _ in scored if r.seed in local]

            def mean(key: str, scale: float = 1.0, digits: int = 2) -> str:
                values = [scale * q[key] for _, q in scored if not np.isnan(q[key])]
                return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if values else "—"

            gain = f"{np.mean(gains):+.1f} ± {np.std(gains):.1f}" if gains else "—"
            lines.append(f"| {directory.name} | {row.label} | {len(scored)} | {mean('per_silo', digits=1)} | "
                         f"{mean('label_accuracy', 100, 1)} % | {mean('real_accuracy', 100, 1)} % | {mean('distinct_2')} | {mean('mean_cosine')} | {gain} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
