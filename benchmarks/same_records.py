"""Do two fedbridge versions compute the same runs? Fixed-seed run records of every method, before and after a change.

    python benchmarks/same_records.py run OUT [--methods local,fdkt,...]   # with the fedbridge on sys.path
    python benchmarks/same_records.py diff OLD NEW                         # exit 1 if a computed figure differs

``run`` writes one record per method with tiny models built in process (``tiny-bert`` SLMs, a ``tiny-llama`` LLM), 120
drug reviews, 2 iid silos, every random choice seeded (FDKT's and PE's noise seeds too; CrossLM scores with the
silos' SLMs, as its DP votes take no run-config seed), each run with a fresh silo state directory (a seeded
silo's noise also depends on the releases its lifetime ledger holds), on the in-process engine, through the
CLI (``fedbridge run``), the one interface every version has. To run an older version, check it out elsewhere and put
it first on the path:

    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old python benchmarks/same_records.py run /tmp/records-old

``diff`` compares what a run computed: global, per-silo and server metrics, privacy spent, bytes moved, tokens, and
failures; wall-clock figures (keys naming seconds, timelines) and run bookkeeping (start time, versions, notes,
artifact paths) are left out. Floats must agree to ``--rtol`` (default 0: bit for bit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = {"slm.model": "tiny-bert", "llm.model": "tiny-llama", "task.max-examples": 120, "slm.epochs": 1,
        "slm.max-length": 64, "llm.max-length": 64, "partition.num-silos": 2, "partition.kind": "iid", "rounds": 2,
        "timeout": 300.0}
METHOD_SIZES = {
    "fdkt": {"fdkt.num-per-label": 1, "fdkt.max-tokens": 8, "fdkt.groups": 2, "fdkt.augment-per-label": 2,
             "fdkt.max-new-tokens": 16, "fdkt.noise-seed": 0, "fdkt.min-words": 1, "fdkt.generator": "tiny-llama"},
    "crosslm": {"crosslm.scores": "slm",  # DP votes draw the silos' own noise (no run-config seed): not repeatable
                "crosslm.per-label": 2, "crosslm.max-new-tokens": 16, "crosslm.min-words": 1,
                "crosslm.llm-eval-examples": 10, "crosslm.ppl-passages": 2, "crosslm.mode": "sync",
                "crosslm.min-reward": -1.0},  # every example eligible: random tiny SLMs score below 0
    "social": {"social.samples": 4, "social.top-k": 2, "social.num-examples": 2, "social.max-test": 10,
               "social.max-new-tokens": 16, "social.shots": 2, "social.vote-examples": 2, "social.teacher": "tiny-llama"},
}
METHOD_SIZES["pipeline"] = {**METHOD_SIZES["fdkt"], **METHOD_SIZES["crosslm"]}
METHOD_SIZES["pe"] = {"pe.noise-seed": 0}
METHODS = "local,fedavg,centralized,llm-zero-shot,fdkt,crosslm,social,pipeline,pe"
COMPARED = ("status", "global_metrics", "silo_metrics", "server_metrics", "communication", "tokens", "privacy",
            "failures")


def run(out: Path, methods: str) -> None:
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for method in methods.split(","):
        sets = {**TINY, **METHOD_SIZES.get(method, {}), "run-name": method}
        argv = ["run", "--engine", "inprocess", "--method", method, "--seed", "0", "--results-dir", str(out)]
        argv += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        code = "import fedbridge, sys; print(fedbridge.__file__, file=sys.stderr); from fedbridge.simulations.cli import main; main()"
        # a fresh silo state directory per run: a seeded silo's noise also depends on how many releases its
        # lifetime ledger already holds, so a ledger left by an earlier run would change every draw
        env = {**os.environ, "FEDBRIDGE_SILO_STATE_DIR": tempfile.mkdtemp(prefix=f"silo-state-{method}-")}
        # run from OUT: `python -c` puts its working directory first on sys.path, ahead of PYTHONPATH's version
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=out, env=env)
        where = done.stderr.splitlines()[0] if done.stderr else "?"
        print(f"{method}: {'ok' if done.returncode == 0 else 'FAILED'} (fedbridge from {where})", flush=True)
        if done.returncode:
            print(done.stderr[-2000:], file=sys.stderr)


def _timed(key: str) -> bool:
    return "second" in key or key.endswith(".s") or "wall" in key


def differences(old, new, path: str, rtol: float) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(k for k in old.keys() | new.keys() if not _timed(str(k)))
        return [d for k in keys for d in differences(old.get(k), new.get(k), f"{path}.{k}", rtol)]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{path}[{i}]", rtol)]
    if isinstance(old, float) and isinstance(new, float):
        same = math.isclose(old, new, rel_tol=rtol, abs_tol=0.0) or (math.isnan(old) and math.isnan(new))
        return [] if same else [f"{path}: {old!r} -> {new!r}"]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def diff(old_dir: Path, new_dir: Path, rtol: float) -> int:
    names = sorted(p.name for p in old_dir.glob("*.json") if (new_dir / p.name).exists())
    if not names:
        print(f"no record is in both {old_dir} and {new_dir}")
        return 1
    failed = 0
    for name in names:
        old, new = (json.loads((d / name).read_text()) for d in (old_dir, new_dir))
        found = [d for key in COMPARED for d in differences(old.get(key), new.get(key), key, rtol)]
        failed += bool(found)
        print(f"{name}: {'same' if not found else f'{len(found)} differences'}")
        for line in found[:10]:
            print(f"  {line}")
    return int(failed > 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run_ap = sub.add_parser("run")
    run_ap.add_argument("out", type=Path)
    run_ap.add_argument("--methods", default=METHODS)
    diff_ap = sub.add_parser("diff")
    diff_ap.add_argument("old", type=Path)
    diff_ap.add_argument("new", type=Path)
    diff_ap.add_argument("--rtol", type=float, default=0.0)
    args = ap.parse_args()
    if args.command == "run":
        run(args.out, args.methods)
    else:
        sys.exit(diff(args.old, args.new, args.rtol))


if __name__ == "__main__":
    main()
