"""CrossLM benchmark: silo scoring throughput, LLM generation of a batch, LoRA step time and peak memory with and
without the KL term; and a report over CrossLM run records.

    python benchmarks/bench_crosslm.py [--quick] [--out PATH]
    python benchmarks/bench_crosslm.py --report results/crosslm-drug [results/crosslm-tweets ...]

Default: the embedded models (SmolLM2-135M LLM; MiniLM-L6 and MiniLM-L3 SLMs) on drug-review texts. ``--quick``
swaps in the tiny random test models and small settings, only to check that the script works (its figures mean
nothing). Writes benchmarks/results/crosslm.json (crosslm-quick.json with --quick).

- scoring: what a silo does for ``query.score`` (``Silo.score``: restore the kept SLM from the node state, then
  class probabilities): seconds and examples/s per request of one CrossLM batch (24 texts), the restore alone,
  and inference examples/s over many texts.
- generation: one CrossLM batch written by the LLM (``write_labelled``), examples/s and tokens/s.
- LoRA step: ``RewardTrainer.step`` on 4 scored examples (quality + task sequences), mean seconds over the steps
  after a warm-up one, with KL (one extra forward pass of the same network, adapters disabled) and without.
  Each runs in a fresh process, so that one's allocator caches do not hide the other's memory; peak memory is the
  peak resident set size (RSS) from the first step on minus the RSS after loading, sampled every 5 ms (psutil).

``--report`` tabulates crosslm run records (``<dir>/**/*.json``): per silo SLM accuracy before/after, the LLM's
label-scoring accuracy and perplexity before/after, and wall time, grouped by task, mode, kl-weight and faults.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import torch
from flwr.app import ArrayRecord, RecordDict

from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.methods.crosslm import silo as crosslm_silo
from fedbridge.methods.crosslm.config import CrossLMConfig
from fedbridge.methods.crosslm.llm import crosslm_prompts, write_labelled
from fedbridge.methods.crosslm.silo import KEPT_SLM
from fedbridge.methods.seeding import generation_prompt
from fedbridge.models.generation import GenerationStats
from fedbridge.models.llm import load_llm_interface
from fedbridge.models.loading import load_llm, load_slm
from fedbridge.models.reward import LLMUpdateConfig, RewardTrainer, ScoredExample
from fedbridge.models.slm import predict_proba
from fedbridge.results import RunRecord, package_versions
from fedbridge.silo import Silo
from fedbridge.tasks import Task, load_federation, load_task

RESULTS = Path(__file__).parent / "results"
MB = 1024 * 1024


@contextmanager
def peak_rss(out: dict, interval: float = 0.005):
    """Peak RSS increase (MB) of this process while the block runs, sampled by a thread."""
    process, stop = psutil.Process(), threading.Event()
    start = peak = process.memory_info().rss

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, process.memory_info().rss)
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        peak = max(peak, process.memory_info().rss)
        out.update(rss_before_mb=round(start / MB, 1), peak_rss_increase_mb=round((peak - start) / MB, 1))


def bench_scoring(spec: str, texts: list[str], batch: int, cfg: ExperimentConfig) -> dict:
    """``Silo.score`` as the ``query.score`` handler runs it, on a state holding a trained-shape SLM."""
    task = load_task(cfg.task, cfg.seed)
    silo_cfg = ExperimentConfig.from_run_config({**cfg.to_run_config(), "slm.model": spec})
    silo = Silo(0, silo_cfg, task.labels, load_federation(silo_cfg.task, silo_cfg.partition, cfg.seed).silos[0])
    model = load_slm(spec, len(task.labels), options=silo_cfg.slm)
    state = RecordDict({KEPT_SLM: ArrayRecord(model.trainable_state())})
    crosslm_silo.score(silo, state, tuple(texts[:4]))  # warm-up: file caches, first-call overheads
    per_request, restore = [], []
    for start in range(0, min(len(texts), 3 * batch), batch):
        t0 = time.perf_counter()
        crosslm_silo.score(silo, state, tuple(texts[start:start + batch]))
        per_request.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        kept = crosslm_silo.kept_slm(silo, state)
        restore.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    probs = predict_proba(kept, texts)
    seconds = time.perf_counter() - t0
    assert probs.shape == (len(texts), len(task.labels))
    return {"spec": spec, "texts": len(texts), "max_length": kept.max_length, "mode": silo_cfg.slm.mode,
            "inference_examples_per_s": round(len(texts) / seconds, 1),
            "restore_seconds": round(statistics.median(restore), 3), "request_examples": batch,
            "request_seconds": round(statistics.median(per_request), 3),
            "request_examples_per_s": round(batch / statistics.median(per_request), 1)}


def bench_generation(spec: str, cfg: ExperimentConfig, options: CrossLMConfig) -> dict:
    llm = load_llm_interface(spec, torch.device("cpu"))  # fedbridge's backend, as before
    task = load_task(cfg.task, cfg.seed)
    stats, counts = GenerationStats(), Counter()
    t0 = time.perf_counter()
    prompts, labels = crosslm_prompts(task, options.per_label, random.Random(cfg.seed))
    examples = write_labelled(llm, prompts, labels, options, [], cfg.seed, cfg.llm.batch_size, stats, counts)
    seconds = time.perf_counter() - t0
    return {"spec": spec, "prompts": stats.prompts, "kept": len(examples), "max_new_tokens": options.max_new_tokens,
            "batch_size": cfg.llm.batch_size, "seconds": round(seconds, 2),
            "examples_per_s": round(stats.prompts / seconds, 3), "tokens_per_s": round(stats.tokens_per_second, 1),
            "sample": [e.text[:200] for e in examples[:3]]}


def _lora_steps(spec: str, kl_weight: float, examples: list[ScoredExample], names: tuple[str, ...],
                instruction: str, steps: int, threads: int, queue: mp.Queue) -> None:
    """In a fresh process: ``steps`` + 1 RewardTrainer steps, the first a warm-up."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, tok = load_llm(spec, trainable=True)
    cfg = LLMUpdateConfig(kl_weight=kl_weight)
    trainer = RewardTrainer(model, tok, cfg, names, instruction, seed=0)
    batches = [examples[i:i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    times, entries, memory = [], [], {}
    with peak_rss(memory):  # from the first step on: it allocates what later steps reuse
        trainer.step(batches[0])
        for i in range(steps):
            t0 = time.perf_counter()
            entries.append(trainer.step(batches[(i + 1) % len(batches)]))
            times.append(time.perf_counter() - t0)
    queue.put({"kl_weight": kl_weight, "steps": steps, "batch_examples": cfg.batch_size,
               "mean_step_s": round(statistics.mean(times), 3), "median_step_s": round(statistics.median(times), 3),
               "target_tokens_per_step": round(statistics.mean(e["tokens"] for e in entries), 1),
               "sequences_per_step": round(statistics.mean(e["sequences"] for e in entries), 1),
               "last_kl": entries[-1].get("kl"), **memory})


def bench_lora(spec: str, task: Task, steps: int) -> dict:
    """Scored examples as CrossLM makes them: real texts under their label's generation prompt, mixed rewards
    (so likelihood, unlikelihood and task sequences all occur)."""
    texts, labels = task.examples.texts[:16], task.examples.labels[:16]
    examples = [ScoredExample(generation_prompt(task, task.labels[y]), t, y, r)
                for t, y, r in zip(texts, labels, [0.8, -0.6, 0.5, -0.3] * len(texts))]
    ctx = mp.get_context("spawn")
    out = {}
    for kl_weight in (1.0, 0.0):
        queue = ctx.Queue()
        proc = ctx.Process(target=_lora_steps, args=(spec, kl_weight, examples, task.labels, task.instruction, steps,
                                                     torch.get_num_threads(), queue))
        proc.start()
        result = queue.get()
        proc.join()
        out["with_kl" if kl_weight else "without_kl"] = result
    with_kl, without = out["with_kl"], out["without_kl"]
    out["kl_step_time_ratio"] = round(with_kl["mean_step_s"] / without["mean_step_s"], 2)
    out["kl_extra_peak_mb"] = round(with_kl["peak_rss_increase_mb"] - without["peak_rss_increase_mb"], 1)
    return out


def run_benchmarks(quick: bool, out: Path) -> dict:
    overrides = {"slm.model": "tiny-bert", "task.max-examples": 120, "partition.kind": "iid",
                 "partition.num-silos": 2} if quick else {}
    cfg = ExperimentConfig.from_run_config({**ExperimentConfig().to_run_config(), **overrides})
    task = load_task(cfg.task, cfg.seed)
    texts = list(task.examples.texts)
    llm = "tiny-llama" if quick else "embedded"
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "quick": quick, "machine": {
        "platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available()}, "versions": package_versions(), "llm": llm}
    n = 32 if quick else 256
    results["scoring"] = [bench_scoring(spec, texts[:n], 24, cfg)
                          for spec in (["tiny-bert"] if quick else ["embedded", "minilm-l3"])]
    print("scoring", json.dumps(results["scoring"], indent=1), flush=True)
    options = CrossLMConfig(per_label=2 if quick else 4, max_new_tokens=12 if quick else 48, min_words=1)
    results["generation"] = bench_generation(llm, cfg, options)
    print("generation", json.dumps(results["generation"], indent=1), flush=True)
    results["lora_step"] = bench_lora(llm, task, steps=3 if quick else 5)
    print("lora_step", json.dumps(results["lora_step"], indent=1), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results


# ------------------------------------------------------------------ report over run records


def _fmt(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v for v in values if v is not None and not np.isnan(v)]
    if not values:
        return "—"
    mean = scale * float(np.mean(values))
    return f"{mean:.{digits}f} ± {scale * float(np.std(values)):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def report(dirs: list[Path]) -> str:
    """Markdown tables over the crosslm records (and local/fedavg/fdkt for reference) under ``dirs``."""
    records = [r for r in _records(dirs) if r.status == "ok"]
    groups: dict[tuple, list[RunRecord]] = {}
    for r in records:
        c = r.config
        o = from_flat(CrossLMConfig, {k: v for k, v in c.items() if k.startswith("crosslm.")}, "crosslm")
        setting = (f"{o.mode}, kl-weight={o.kl_weight:g}, score-on={o.score_on}"
                   + (", with-private" if o.with_private else "")) if r.method == "crosslm" else ""
        key = (Path(str(c.get("task.name"))).stem, r.method, f"{c.get('slm.model')}; {setting}".strip("; "),
               f"silo {c['faults.slow-silos']} x{c.get('faults.slow-factor')}" if c.get("faults.slow-silos") else "")
        groups.setdefault(key, []).append(r)
    lines = ["| task | method | setting | faults | seeds | SLM global acc before → after | SLM global F1 before → after "
             "| SLM silo-test acc before → after | LLM acc before → after | LLM F1 before → after | perplexity "
             "before → after | wall s |", "|" + "---|" * 12]
    for (task, method, setting, faults), rs in sorted(groups.items()):
        g = [r.global_metrics for r in rs]
        s = [r.server_metrics for r in rs]

        def before_after(before: str, after: str, src: list[dict] = g) -> str:
            return f"{_fmt([x.get(before) for x in src])} → {_fmt([x.get(after) for x in src])}"

        lines.append("| " + " | ".join([
            task, method, setting or "—", faults or "—", str(len(rs)),
            before_after("before_accuracy", "accuracy") if method == "crosslm" else _fmt([x.get("accuracy") for x in g]),
            before_after("before_macro_f1", "macro_f1") if method == "crosslm" else _fmt([x.get("macro_f1") for x in g]),
            before_after("before_silo_test_accuracy", "silo_test_accuracy") if method == "crosslm"
            else _fmt([x.get("silo_test_accuracy") for x in g]),
            before_after("crosslm.llm-before.accuracy", "crosslm.llm-after.accuracy", s) if method == "crosslm" else "—",
            before_after("crosslm.llm-before.macro_f1", "crosslm.llm-after.macro_f1", s) if method == "crosslm" else "—",
            (f"{_fmt([x.get('crosslm.llm-before.perplexity') for x in s], 1, 2)} → "
             f"{_fmt([x.get('crosslm.llm-after.perplexity') for x in s], 1, 2)}") if method == "crosslm" else "—",
            _fmt([r.wall_seconds for r in rs], 1, 0)]) + " |")
    lines += ["", "Accuracy and macro-F1 in %, mean ± std over seeds. SLM: mean over silos (global = the server's "
              "held-out set). LLM: label scoring on `crosslm.llm-eval-examples` global-test examples. Perplexity: "
              "the held-out general text (`crosslm.general-text`).", "", "Per silo (crosslm runs, mean over seeds):",
              "", "| task | setting | faults | silo | SLM | global acc before → after | global F1 before → after | "
              "silo-test acc before → after |", "|" + "---|" * 8]
    for (task, method, setting, faults), rs in sorted(groups.items()):
        if method != "crosslm":
            continue
        for silo in sorted({s for r in rs for s in r.silo_metrics}):
            m = [r.silo_metrics.get(silo, {}) for r in rs]
            spec = ExperimentConfig.from_run_config(rs[0].config).slm.spec_for(int(silo.split("-")[1]))
            lines.append(f"| {task} | {setting} | {faults or '—'} | {silo} | {spec} | "
                         f"{_fmt([x.get('before.global-test.accuracy') for x in m])} → "
                         f"{_fmt([x.get('global-test.accuracy') for x in m])} | "
                         f"{_fmt([x.get('before.global-test.macro_f1') for x in m])} → "
                         f"{_fmt([x.get('global-test.macro_f1') for x in m])} | "
                         f"{_fmt([x.get('before.silo-test.accuracy') for x in m])} → "
                         f"{_fmt([x.get('silo-test.accuracy') for x in m])} |")
    return "\n".join(lines) + "\n"


def _records(dirs: list[Path]) -> list[RunRecord]:
    """Every run record under ``dirs`` (other JSON files there are skipped)."""
    out = []
    for path in sorted(p for d in dirs for p in d.rglob("*.json")):
        try:
            out.append(RunRecord.read(path))
        except (ValueError, TypeError, KeyError):
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models and small settings: a smoke check")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", type=Path, nargs="+", default=None, help="tabulate run records under these dirs")
    args = parser.parse_args()
    if args.report:
        text = report(args.report)
        print(text)
        path = args.out or args.report[0] / "crosslm-report.md"
        path.write_text(text)
        print(f"wrote {path}")
        return
    run_benchmarks(args.quick, args.out or RESULTS / ("crosslm-quick.json" if args.quick else "crosslm.json"))


if __name__ == "__main__":
    main()
