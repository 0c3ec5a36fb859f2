"""Foundation benchmark: LLM generation throughput, SLM training throughput, and the demo's wall time.

    python benchmarks/bench_foundation.py [--skip-demo]

Writes benchmarks/results/foundation.json (figures from one run, on this machine, side by side).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from fedbridge.config import TaskConfig
from fedbridge.models.generation import SamplingConfig, generate
from fedbridge.models.loading import load_llm, load_slm
from fedbridge.models.slm import SLMOptions, train_classifier
from fedbridge.results import package_versions
from fedbridge.tasks import load_task

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "foundation.json"


def bench_generation(batch_sizes=(1, 16), new_tokens: int = 48) -> dict:
    model, tok = load_llm("embedded")
    texts = load_task(TaskConfig()).examples.texts
    out = {}
    generate(model, tok, ["Hello"], SamplingConfig(max_new_tokens=4))  # warm-up
    for bs in batch_sizes:
        prompts = [[{"role": "user", "content": f"Write a short drug review like this one: {t[:300]}"}]
                   for t in texts[:bs]]
        # ignore EOS so every row generates exactly new_tokens: throughput, not text quality, is measured
        model.generation_config.eos_token_id = None
        try:
            _, stats = generate(model, tok, prompts, SamplingConfig(max_new_tokens=new_tokens, batch_size=bs,
                                                                     temperature=1.0, top_p=0.9), seed=0)
        finally:
            model.generation_config.eos_token_id = tok.eos_token_id
        out[f"batch_{bs}"] = {**stats.as_dict(), "tokens_per_second": round(stats.tokens_per_second, 1)}
    first, last = batch_sizes[0], batch_sizes[-1]
    out[f"speedup_batch_{last}_vs_{first}"] = round(out[f"batch_{last}"]["tokens_per_second"]
                                                    / out[f"batch_{first}"]["tokens_per_second"], 2)
    return out


def bench_slm_training(n: int = 128) -> dict:
    task = load_task(TaskConfig())
    out = {}
    for spec in ("embedded", "minilm-l3"):
        cfg = SLMOptions(mode="full", epochs=1, batch_size=16, max_length=128)
        model = load_slm(spec, len(task.labels), options=cfg)
        stats = train_classifier(model, task.examples.texts[:n], task.examples.labels[:n], cfg)
        out[spec] = {"examples": stats.examples, "seconds": round(stats.seconds, 2),
                     "examples_per_second": round(stats.examples_per_second, 1)}
    out["speedup_l3_vs_l6"] = round(out["minilm-l3"]["examples_per_second"] / out["embedded"]["examples_per_second"], 2)
    return out


def bench_demo() -> dict:
    """The README's main job, `make demo` itself (one seed, six methods, simulation engine), from scratch; its table,
    plot and records are kept in benchmarks/results/demo/ so the figures in the README come from this very run."""
    out = OUT.parent / "demo"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run(["make", "-s", "demo", "SEEDS=0", f"DEMO_OUT={out}"], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    return {"seconds_one_seed": round(wall, 1),
            "per_run_wall_seconds": {k: round(v["wall_seconds"], 1) for k, v in sorted(runs.items())},
            "per_run_seconds_by_phase": {k: {ph: round(s, 1) for ph, s in v["seconds"].items()}
                                         for k, v in sorted(runs.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": {"cpus": os.cpu_count(), "torch_threads":
               torch.get_num_threads(), "platform": platform.platform()}, "versions": package_versions()}
    results["generation_embedded_llm_cpu"] = bench_generation()
    print(json.dumps(results["generation_embedded_llm_cpu"], indent=1))
    results["slm_training_cpu"] = bench_slm_training()
    print(json.dumps(results["slm_training_cpu"], indent=1))
    if not args.skip_demo:
        results["demo"] = bench_demo()
        print(json.dumps(results["demo"], indent=1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
