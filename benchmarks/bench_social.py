"""Social Learning measurement: accuracy per mode and aggregator against 0-shot and the original-examples bound,
canary rank / rank-0 frequency / exposure over seeds, and tokens and seconds per phase, on SMS spam (the paper's
task) and drug reviews, with 8 teachers.

    python benchmarks/bench_social.py [--quick] [--tasks sms,drug-reviews] [--seeds 0,1,2] [--ns 8,16]
                                      [--engine simulation] [--out results/social] [--set KEY=VALUE ...]

Per task, two ``fedbridge compare`` runs: examples mode swept over n (``social.num-examples``), and instructions
mode at the largest n (with the teachers' raw instructions as a baseline); then ``fedbridge audit`` of every run
record (copies, edit distance, canary ranks); then a table of seconds and tokens per phase. Finished runs are kept,
so an interrupted measurement resumes. SMS spam is optional data: the task is skipped when its file is absent.

``--quick`` runs tiny random models with 2 teachers, one seed and small sizes, in process: it checks that the
pipeline and this script work (about a minute); its figures mean nothing.
Writes OUT/<task>/<mode>/{table.md, accuracy.png, runs/, runs/audit/}, OUT/phases.md and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedbridge.results import RunRecord
from fedbridge.simulations.compare import load_records

SMS_SPAM = Path(__file__).resolve().parents[2] / "shared" / "data" / "sms_spam" / "SMSSpamCollection.tsv"
FEDBRIDGE = str(Path(sys.executable).with_name("fedbridge"))
TASKS = {
    "sms": (str(SMS_SPAM), {"task.text-column": "SMS", "task.label-column": "Label", "task.description": "SMS message",
                            "task.instruction": "Is this SMS message spam or ham?"}),
    "drug-reviews": ("drug-reviews", {}),
}
COMMON = {"partition.kind": "iid", "partition.num-silos": 8, "canaries.enabled": True}
QUICK = {"slm.model": "tiny-bert", "llm.model": "tiny-llama", "social.teacher": "tiny-llama", "task.max-examples": 160,
         "partition.num-silos": 2, "social.shots": 2, "social.samples": 4, "social.top-k": 2,
         "social.max-new-tokens": 12, "social.max-example-chars": 60, "social.vote-examples": 2,
         "social.instruction-shots": 2, "social.instruction-tokens": 16, "social.max-test": 12,
         "social.max-prompt-tokens": 1000, "canaries.candidates": 99, "timeout": 300}


def sets(options: dict) -> list[str]:
    return [arg for key, value in options.items() for arg in ("--set", f"{key}={value}")]


def fedbridge(*args: str) -> None:
    print("$ fedbridge " + " ".join(args), flush=True)
    subprocess.run([FEDBRIDGE, *args], check=True)


def measure(task: str, seeds: str, ns: list[int], engine: str, out: Path, quick: bool, extra: dict[str, str]) -> None:
    """The two compare runs of one task and the audit of their records."""
    name, options = TASKS[task]
    base = {**COMMON, **options, **(QUICK if quick else {}), **extra}
    examples, instructions = out / task / "examples", out / task / "instructions"
    fedbridge("compare", "--methods", "social", "--task", name, "--seeds", seeds, "--engine", engine,
              "--out", str(examples), "--sweep", f"social.num-examples={','.join(map(str, ns))}",
              *sets({**base, "social.mode": "examples", "social.baselines": "zero-shot,original"}))
    fedbridge("compare", "--methods", "social", "--task", name, "--seeds", seeds, "--engine", engine,
              "--out", str(instructions),
              *sets({**base, "social.mode": "instructions", "social.num-examples": max(ns),
                     "social.baselines": "zero-shot,raw,original"}))
    for directory in (examples / "runs", instructions / "runs"):
        fedbridge("audit", str(directory), *(["--no-rank"] if quick else []))


def phases(run_dirs: dict[str, list[Path]]) -> tuple[str, dict]:
    """Mean seconds per phase and tokens per run, by task, mode and n."""
    rows: dict[tuple, list[RunRecord]] = defaultdict(list)
    for task, dirs in run_dirs.items():
        for directory in dirs:
            for record in load_records(directory):
                key = (task, record.config["social.mode"], record.config["social.num-examples"])
                rows[key].append(record)
    names = sorted({k for records in rows.values() for r in records for k in r.seconds})
    tokens = ("silo-generated", "prompt")
    header = ["task", "mode", "n", "runs", *names, "wall s", *(f"tokens {t}" for t in tokens)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary = {}
    for (task, mode, n), records in sorted(rows.items()):
        seconds = {k: float(np.mean([r.seconds.get(k, 0.0) for r in records])) for k in names}
        counts = {t: float(np.mean([r.tokens.get(t, 0) for r in records])) for t in tokens}
        wall = float(np.mean([r.wall_seconds for r in records]))
        lines.append("| " + " | ".join([task, mode, str(n), str(len(records)), *(f"{seconds[k]:.1f}" for k in names),
                                        f"{wall:.1f}", *(f"{counts[t]:.0f}" for t in tokens)]) + " |")
        summary[f"{task}/{mode}/n={n}"] = {"runs": len(records), "seconds": seconds, "wall_seconds": wall,
                                           "tokens": counts,
                                           "variants": {k: v for r in records[:1] for k, v in r.server_metrics.items()
                                                        if k.startswith("variant.")}}
    note = ("Seconds are wall time per phase, mean over seeds; tokens: silo-generated = tokens all teachers sampled, "
            "prompt = tokens of every student prompt scored (all variants).")
    return "\n".join([*lines, "", note]) + "\n", summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 teachers, 1 seed: a pipeline check")
    parser.add_argument("--tasks", default="sms,drug-reviews")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ns", default="8,16", help="n: examples in the student's prompt (comma list)")
    parser.add_argument("--engine", default="simulation", choices=("simulation", "inprocess"))
    parser.add_argument("--out", type=Path, default=Path("results/social"))
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a run-config override for every run (repeatable), e.g. resume=true or llm.calibrate=true")
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.sets)
    seeds, engine = ("0", "inprocess") if args.quick else (args.seeds, args.engine)
    ns = [4] if args.quick else [int(n) for n in args.ns.split(",")]
    for task in args.tasks.split(","):
        if task == "sms" and not SMS_SPAM.exists():
            print(f"skipping sms: {SMS_SPAM} is absent (optional data)")
            continue
        measure(task, seeds, ns, engine, args.out, args.quick, extra)
    # every task measured under OUT so far, so that a run of one task does not drop the others from the table
    run_dirs = {task: [d for d in (args.out / task / mode / "runs" for mode in ("examples", "instructions"))
                       if d.is_dir()] for task in TASKS}
    table, summary = phases({task: dirs for task, dirs in run_dirs.items() if dirs})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "phases.md").write_text(table)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True))
    print(table)
    print(f"tables: {args.out}/<task>/<mode>/table.md  audits: .../runs/audit/audit.md  phases: {args.out}/phases.md")


if __name__ == "__main__":
    main()
