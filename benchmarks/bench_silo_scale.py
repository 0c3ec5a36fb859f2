"""Hundreds of silos on Flower's simulation engine: wall time, peak memory and traffic as the silo count grows.

    python benchmarks/bench_silo_scale.py                                   # the whole grid, resumable
    python benchmarks/bench_silo_scale.py --methods local --silos 10,100 --partitions iid

Each cell is one ``fedbridge run`` (a subprocess, seed 0) on tweets with a fixed 12,000-tweet sample, so more silos
means the same data split finer (300 silos: ~32 training tweets each). FDKT runs at the reduced sizes of the
transfer grids (one DP demonstration per label per silo, 32 tokens, 2 groups, one pooled augmented set of 8 per
label). Memory is the machine's used memory above what it used before the run (the simulation runs in Flower's
SuperLink processes, not the child of this script), sampled every second: nothing else may run beside it.
Results go to OUT/scale.json (one entry per cell; a rerun skips finished cells), OUT/scale.md and OUT/growth.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
FEDBRIDGE = Path(sys.executable).with_name("fedbridge")
TWEETS = ["--task", "tweets", "--set", "task.max-examples=12000"]
METHOD_SETS = {
    "local": [],
    "fedavg": [],
    "fdkt": ["--set", "fdkt.num-per-label=1", "--set", "fdkt.max-tokens=32", "--set", "fdkt.groups=2",
             "--set", "fdkt.pooled=true", "--set", "fdkt.augment-per-label=8"],
}
GOALS_S = {("local", 100): 600, ("fedavg", 100): 600, ("fdkt", 100): 1800}  # the bars on 2 CPU cores


class PeakMemory:
    """The machine's peak used memory above its level at start, sampled every ``every`` seconds in a thread."""

    def __init__(self, every: float = 1.0) -> None:
        self.base = psutil.virtual_memory().used
        self.peak, self.every = 0, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, psutil.virtual_memory().used - self.base)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_cell(method: str, silos: int, partition: str, out: Path, timeout: float) -> dict:
    name = f"{method}-{partition}-{silos}"
    runs = out / "runs" / name
    cmd = [str(FEDBRIDGE), "run", "--method", method, *TWEETS, "--set", f"partition.num-silos={silos}",
           "--set", f"partition.kind={partition}", *METHOD_SETS[method], "--results-dir", str(runs)]
    env = {**os.environ, "FEDBRIDGE_SILO_STATE_DIR": str(out / "silo-state" / name)}
    t0 = time.perf_counter()
    with PeakMemory() as memory, open(out / "logs" / f"{name}.log", "w") as log:
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    wall = time.perf_counter() - t0
    cell = {"method": method, "silos": silos, "partition": partition, "wall_seconds": round(wall, 1),
            "peak_mb": round(memory.peak / 2**20), "status": "ok" if code == 0 else f"failed ({code})"}
    records = sorted(runs.glob("*.json"))
    if code == 0 and records:
        record = json.loads(records[-1].read_text())
        traffic = record["communication"]["bytes_sent"] + record["communication"]["bytes_received"]
        cell.update(macro_f1=round(100 * record["global_metrics"]["macro_f1"], 1),
                    run_seconds=round(record["wall_seconds"], 1), traffic_mb=round(traffic / 2**20, 2),
                    record=str(records[-1].relative_to(out)))
    cell.update(seconds_per_silo=round(wall / silos, 2), mb_per_silo=round(cell["peak_mb"] / silos, 1))
    return cell


def table(cells: list[dict]) -> str:
    rows = ["| method | partition | silos | status | wall s | s / silo | peak MB | MB / silo | traffic MB | "
            "macro-F1 | goal |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in sorted(cells, key=lambda c: (list(METHOD_SETS).index(c["method"]), c["partition"], c["silos"])):
        goal = GOALS_S.get((c["method"], c["silos"]))
        verdict = "" if goal is None else f"< {goal} s: {'met' if c['status'] == 'ok' and c['wall_seconds'] < goal else 'missed'}"
        rows.append(f"| {c['method']} | {c['partition']} | {c['silos']} | {c['status']} | {c['wall_seconds']:.0f} | "
                    f"{c['seconds_per_silo']:.2f} | {c['peak_mb']} | {c['mb_per_silo']:.1f} | "
                    f"{c.get('traffic_mb', '—')} | {c.get('macro_f1', '—')} | {verdict} |")
    return "\n".join(rows) + "\n"


def plot(cells: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for (method, partition) in sorted({(c["method"], c["partition"]) for c in cells}):
        done = sorted((c for c in cells if (c["method"], c["partition"]) == (method, partition)
                       and c["status"] == "ok"), key=lambda c: c["silos"])
        if not done:
            continue
        style = "-" if partition == "iid" else "--"
        xs = [c["silos"] for c in done]
        left.plot(xs, [c["wall_seconds"] / 60 for c in done], style, marker="o", label=f"{method} {partition}")
        right.plot(xs, [c["peak_mb"] / 1024 for c in done], style, marker="o", label=f"{method} {partition}")
    for ax, ylabel in ((left, "wall time (min)"), (right, "peak memory above idle (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("silos")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle("fedbridge on Flower's simulation engine, tweets, 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="local,fedavg,fdkt")
    parser.add_argument("--silos", default="10,100,300")
    parser.add_argument("--partitions", default="iid,dirichlet")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a cell is stopped and failed")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "silo-scale")
    args = parser.parse_args()
    if unknown := set(args.methods.split(",")) - set(METHOD_SETS):
        parser.error(f"unknown methods {sorted(unknown)}: use some of {', '.join(METHOD_SETS)}")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    path = args.out / "scale.json"
    cells = json.loads(path.read_text()) if path.exists() else []
    for partition in args.partitions.split(","):
        for silos in map(int, args.silos.split(",")):
            for method in args.methods.split(","):
                key = (method, silos, partition)
                if any((c["method"], c["silos"], c["partition"]) == key and c["status"] == "ok" for c in cells):
                    continue
                print(f"{method}, {silos} silos, {partition} ...", flush=True)
                cell = run_cell(method, silos, partition, args.out, args.timeout)
                print(json.dumps(cell), flush=True)
                cells = [c for c in cells if (c["method"], c["silos"], c["partition"]) != key] + [cell]
                path.write_text(json.dumps(cells, indent=1) + "\n")
                (args.out / "scale.md").write_text(table(cells))
                plot(cells, args.out / "growth.png")


if __name__ == "__main__":
    main()
