"""Fault injection: run a method while a chosen fraction of its silos crash at random points, then audit the run
record: rounds completed, results delivered per silo, and anything lost (which should be nothing).

    python benchmarks/bench_faults.py [--tiny] [--engine inprocess|simulation] [--methods local,fedavg,fdkt]
        [--fractions 0,0.25,0.5] [--seeds 0,1] [--silos 4] [--probability 0.5] [--point random] [--out DIR]

Crashes come from the ``faults.*`` client mod (``fedbridge/faults.py``), so the server under test is the product's
own: ``--fractions`` of the silos, drawn with the seed, fail each message with ``--probability`` (drawn per silo,
message type and round), before their handler runs or after it ran (``--point random``: either, per message), the
way a killed and restarted silo process loses a request or a reply. ``--tiny`` uses the random tiny test models
(seconds per run; the fault handling is the same at any model size).

The audit reads only the run record:
  rounds     rounds that produced a result: FedAvg's rounds averaged over at least one silo; for one-round methods,
             1 if the run finished ok
  delivered  per silo: replies received of requests sent, and ✓ if its final result (silo-test metrics) is there
  lost       requests whose outcome the record does not show (sent, neither received nor failed), silos that did not
             crash but have no final result, and failures that were not injected: each should be 0
Writes ``<out>/faults.json`` and ``<out>/faults.md`` (the Markdown table for the README); run records go to
``<out>/faults-runs``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.faults import CRASH_POINTS, FaultConfig
from fedbridge.results import RunRecord, package_versions
from fedbridge.simulations.runner import ENGINES, run

RESULTS = Path(__file__).parent / "results"
TINY = {"slm.model": "tiny-bert", "llm.model": "tiny-llama", "task.max-examples": 240, "slm.epochs": 1,
        "slm.max-length": 64, "llm.max-length": 64, "partition.kind": "iid",
        "fdkt.generator": "tiny-llama", "fdkt.num-per-label": 2, "fdkt.max-tokens": 6, "fdkt.augment-per-label": 2,
        "fdkt.min-words": 1, "fdkt.max-new-tokens": 12, "fdkt.llm-filter": False}
REDUCED_FDKT = {"fdkt.num-per-label": 2, "fdkt.max-tokens": 24, "fdkt.groups": 2, "fdkt.augment-per-label": 6}


def config_for(method: str, fraction: float, seed: int, args: argparse.Namespace) -> ExperimentConfig:
    flat = {**ExperimentConfig().to_run_config(), **(TINY if args.tiny else REDUCED_FDKT),
            "method": method, "seed": seed, "rounds": args.rounds, "timeout": args.timeout,
            "partition.num-silos": args.silos, "results-dir": str(Path(args.out) / "faults-runs"),
            "run-name": f"faults-{method}-f{fraction:g}-s{seed}",
            "faults.crash-fraction": fraction, "faults.crash-probability": args.probability,
            "faults.crash-point": args.point, "faults.crash-seed": seed}
    return ExperimentConfig.from_run_config(flat)


def audit(record: RunRecord, cfg: ExperimentConfig) -> dict:
    """What the record shows about the run's faults (see the module docstring)."""
    faults = from_flat(FaultConfig, cfg.method_options, "faults")
    crashing = sorted(faults.crashing_silos(cfg.partition.num_silos))
    per_silo, lost = {}, []
    for name, events in sorted(record.timelines.items()):
        sent = Counter((e["message_type"], e["round"]) for e in events if e["event"] == "sent")
        outcomes = Counter((e["message_type"], e["round"]) for e in events if e["event"] in ("received", "failed"))
        lost += [f"{name}: {kind} (round {rnd}) has no outcome" for (kind, rnd), n in sent.items()
                 if outcomes[(kind, rnd)] < n]
        per_silo[name] = {"sent": sum(sent.values()),
                          "received": sum(e["event"] == "received" for e in events),
                          "failed": sum(e["event"] == "failed" for e in events),
                          "result": "silo-test.accuracy" in record.silo_metrics.get(name, {})}
    lost += [f"silo-{i}: did not crash, but has no result" for i in range(cfg.partition.num_silos)
             if i not in crashing and not per_silo.get(f"silo-{i}", {}).get("result")]
    lost += [f"{f['silo']}: failure that was not injected: {f['reason']}" for f in record.failures
             if "injected crash" not in f["reason"]]
    if cfg.method == "fedavg":
        planned = cfg.rounds
        completed = sum(bool(re.fullmatch(r"round-\d+\.silos", k)) for k in record.server_metrics)
    else:
        planned, completed = 1, int(record.status == "ok")
    return {"method": cfg.method, "fraction": faults.crash_fraction, "seed": cfg.seed, "crashing": crashing,
            "status": record.status, "error": record.error, "rounds_planned": planned, "rounds_completed": completed,
            "silos": per_silo, "injected_crashes": sum("injected crash" in f["reason"] for f in record.failures),
            "lost": lost, "wall_seconds": record.wall_seconds}


def markdown(rows: list[dict]) -> str:
    lines = ["| method | crashing silos | seed | status | rounds completed | results delivered per silo "
             "(replies / requests, ✓ final result) | injected crashes | lost |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delivered = " · ".join(f"{name} {'✓' if s['result'] else '✗'} {s['received']}/{s['sent']}"
                               for name, s in r["silos"].items())
        crashing = ", ".join(map(str, r["crashing"])) or "none"
        lines.append(f"| {r['method']} | {crashing} ({r['fraction']:g}) | {r['seed']} | {r['status']} | "
                     f"{r['rounds_completed']}/{r['rounds_planned']} | {delivered} | {r['injected_crashes']} | "
                     f"{len(r['lost'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random test models (seconds per run)")
    parser.add_argument("--engine", choices=ENGINES, default="inprocess")
    parser.add_argument("--methods", default="local,fedavg,fdkt")
    parser.add_argument("--fractions", default="0,0.25,0.5", help="fractions of the silos that crash")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--silos", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="FedAvg rounds")
    parser.add_argument("--probability", type=float, default=0.5, help="chance a crashing silo fails one message")
    parser.add_argument("--point", choices=CRASH_POINTS, default="random")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the server waits for one exchange")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.tiny:
        torch.set_num_threads(1)  # tiny models gain nothing from threads, and on a busy machine threads spin

    runs = [(m, float(f), int(s)) for m in args.methods.split(",") for f in args.fractions.split(",")
            for s in args.seeds.split(",")]
    rows = []
    for method, fraction, seed in tqdm(runs, desc="fault runs"):
        cfg = config_for(method, fraction, seed, args)
        try:
            run(cfg, engine=args.engine, quiet=True)
        except Exception as err:  # noqa: BLE001 - a failed run still writes its record, which is what we audit
            tqdm.write(f"{cfg.run_name}: {type(err).__name__}: {err}")
        record = RunRecord.read(Path(cfg.results_dir) / f"{cfg.run_name}.json")
        rows.append(audit(record, cfg))
        tqdm.write(f"{cfg.run_name}: {record.status}, lost {len(rows[-1]['lost'])}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python benchmarks/bench_faults.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "engine": args.engine, "tiny": args.tiny,
              "probability": args.probability, "point": args.point, "silos": args.silos,
              "versions": package_versions(), "runs": rows, "lost_total": sum(len(r["lost"]) for r in rows)}
    (out / "faults.json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    (out / "faults.md").write_text(markdown(rows))
    print(markdown(rows))
    print(f"lost in all runs: {result['lost_total']}  ->  {out / 'faults.json'}")


if __name__ == "__main__":
    main()
