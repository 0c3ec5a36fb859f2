"""The equal-privacy table: every row of a ``fedbridge compare`` directory with its macro-F1 and accuracy gain over
``local`` of the same seed (paired), ε per silo, synthetic examples per silo, tokens generated and wall seconds.

    python benchmarks/dp_transfer_table.py benchmarks/results/dp-transfer/tweets [more dirs] --out FILE.md

Gains are per seed (the run's minus local's), then mean ± std over the seeds the row has; the seeds' own gains follow
in parentheses. Synthetic examples per silo: what each silo trained on besides its private data (``train.synthetic``;
CrossLM: its selections over all rounds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fedbridge.simulations.compare import group, load_records

KEYS = ("pe.epsilon", "pe.iterations", "pe.num-per-label", "slm.dp-epsilon", "crosslm.epsilon", "fdkt.epsilon",
        "fdkt.vote-epsilon", "fdkt.labels")  # a record of
# the in-process engine holds only the keys a run set, so a run at a default and one that swept it differ here


def synthetic_per_silo(record) -> float:  # noqa: ANN001 - a RunRecord
    counts = [m.get("train.synthetic", 0) for m in record.silo_metrics.values()]
    selected = record.server_metrics.get("crosslm.selected")
    if selected is not None and record.silo_metrics:
        return float(selected) / len(record.silo_metrics)
    return float(np.mean(counts)) if counts else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keys", default=",".join(KEYS), help="config keys that make rows (a run without one: default)")
    args = ap.parse_args()
    lines = []
    for directory in args.dirs:
        records = load_records(directory / "runs")
        local = {r.seed: r.global_metrics for r in records if r.method == "local"}
        lines += [f"**{directory.name}**", "",
                  "| configuration | seeds | macro-F1 | gain over local (F1) | accuracy | gain (acc) | ε per silo | "
                  "synthetic per silo | tokens generated | wall s |", "|" + "---|" * 10]
        for row in group(records, [k for k in args.keys.split(",") if k]):
            f1, acc = row.stat("global_metrics.macro_f1"), row.stat("global_metrics.accuracy")
            paired = [r for r in row.records if r.seed in local and row.method != "local"]
            gains = [100 * (r.global_metrics["macro_f1"] - local[r.seed]["macro_f1"]) for r in paired]
            acc_gains = [100 * (r.global_metrics["accuracy"] - local[r.seed]["accuracy"]) for r in paired]
            each = f" ({', '.join(f'{g:+.1f}' for g in gains)})" if len(gains) > 1 else ""
            gain = f"{np.mean(gains):+.1f} ± {np.std(gains):.1f}{each}" if gains else "—"
            acc_gain = f"{np.mean(acc_gains):+.1f} ± {np.std(acc_gains):.1f}" if acc_gains else "—"
            synthetic = np.mean([synthetic_per_silo(r) for r in row.records])
            label = " ".join([row.method, *(f"{k}={v}" for k, v in row.sweep if v and (k, v) != ("slm.dp-epsilon", "inf"))])
            lines.append(f"| {label} | {len(row.records)} | {100 * f1[0]:.1f} ± {100 * f1[1]:.1f} | {gain} | "
                         f"{100 * acc[0]:.1f} ± {100 * acc[1]:.1f} | {acc_gain} | {row.epsilon} | {synthetic:.0f} | "
                         f"{row.tokens:.0f} | {row.wall:.0f} |")
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
