"""What a real deployment costs: the same run in-process, on Flower's simulation engine, and on a loopback
deployment (one SuperLink and one SuperNode process per silo), with and without TLS + SuperNode authentication.

    python benchmarks/bench_deployment.py            # the demo's fedavg run (embedded MiniLM, 4 silos, 3 rounds)
    python benchmarks/bench_deployment.py --quick    # tiny models, 2 silos, 1 round: checks the script (~4 min)

Every variant runs the same config and the same data: the deployed SuperNodes get ``partition-id``/``num-partitions``
node configs, so each silo holds the very partition the simulated one holds. Timings are wall seconds on this
machine; "end-to-end" is from launching the run to its record on disk (for the deployments, after the federation is
up; its setup time is listed apart). Writes benchmarks/results/deployment.json (deployment-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fedbridge.config import ExperimentConfig
from fedbridge.deploy import LoopbackDeployment
from fedbridge.results import RunRecord, package_versions
from fedbridge.simulations.runner import run_inprocess, run_simulation

OUT = Path(__file__).parent / "results"
QUICK = {"slm.model": "tiny-bert", "llm.model": "tiny-llama", "task.max-examples": 120, "slm.epochs": 1,
         "partition.num-silos": 2, "partition.kind": "iid", "rounds": 1, "timeout": 300.0}
FULL = {"rounds": 3}  # everything else at the project's defaults: the demo's fedavg run


def timed(run: Callable[[], RunRecord]) -> dict:
    t0 = time.perf_counter()
    record = run()
    return {"end_to_end_seconds": round(time.perf_counter() - t0, 2),
            "server_app_seconds": round(record.wall_seconds, 2),
            "seconds_by_phase": {k: round(v, 2) for k, v in record.seconds.items()},
            "bytes": record.communication["bytes_sent"] + record.communication["bytes_received"],
            "global_accuracy": record.global_metrics.get("accuracy"), "failures": len(record.failures)}


def deployed(cfg: ExperimentConfig, work: Path, tls: bool) -> dict:
    n = cfg.partition.num_silos
    t0 = time.perf_counter()
    with LoopbackDeployment(work, [{"partition-id": i, "num-partitions": n} for i in range(n)], tls=tls) as dep:
        setup = time.perf_counter() - t0
        result = timed(lambda: dep.run(cfg))
    left = dep.leftovers()
    return {**result, "setup_seconds": round(setup, 2), "processes_left": len(left)}


def median_of(results: list[dict]) -> dict:
    """The run with the median end-to-end time, with every repeat's end-to-end time beside it."""
    ordered = sorted(results, key=lambda r: r["end_to_end_seconds"])
    return {**ordered[len(ordered) // 2], "end_to_end_all": [r["end_to_end_seconds"] for r in results]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 silos, 1 round")
    parser.add_argument("--method", default="fedavg")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant (the median is reported)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # the in-process run would log every round
    from fedbridge.simulations.cli import parse_sets

    overrides = {**(QUICK if args.quick else FULL), "method": args.method, **parse_sets(args.set)}
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-deployment-") as tmp:
        for repeat in range(args.repeats):
            for variant in ("inprocess", "simulation", "deployment-plaintext", "deployment-tls"):
                results_dir = Path(tmp) / variant / str(repeat)
                cfg = ExperimentConfig.from_run_config({**ExperimentConfig().to_run_config(), **overrides,
                                                        "results-dir": str(results_dir), "run-name": "bench"})
                print(f"[{repeat + 1}/{args.repeats}] {variant} ...", flush=True)
                if variant == "inprocess":
                    result = timed(lambda: run_inprocess(cfg))
                elif variant == "simulation":
                    result = timed(lambda: run_simulation(cfg, quiet=True))
                else:
                    result = deployed(cfg, results_dir / "federation", tls=variant == "deployment-tls")
                print(f"    {result['end_to_end_seconds']:.1f} s end to end", flush=True)
                results.setdefault(variant, []).append(result)
    runs = {variant: median_of(rs) for variant, rs in results.items()}
    e2e = {variant: r["end_to_end_seconds"] for variant, r in runs.items()}
    report = {
        "what": "the same run in-process, on the simulation engine, and deployed on loopback (one process per "
                "silo) without and with TLS + SuperNode authentication",
        "date": time.strftime("%Y-%m-%d"), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "versions": package_versions(), "run_config": overrides, "repeats": args.repeats, "runs": runs,
        "ratios_end_to_end": {
            "deployment-tls / simulation": round(e2e["deployment-tls"] / e2e["simulation"], 2),
            "deployment-tls / inprocess": round(e2e["deployment-tls"] / e2e["inprocess"], 2),
            "deployment-tls / deployment-plaintext": round(e2e["deployment-tls"] / e2e["deployment-plaintext"], 2),
            "simulation / inprocess": round(e2e["simulation"] / e2e["inprocess"], 2)},
    }
    out = OUT / ("deployment-quick.json" if args.quick else "deployment.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["ratios_end_to_end"], indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
