"""How well the silos' DP votes label LLM-written text, against the noise: the figure behind Private Evolution's gain.

    python benchmarks/vote_labels.py [--task tweets] [--seed 0] [--candidates-per-label 50] [--out DIR]

The embedded LLM writes candidates per label from the task description alone (the random API); every silo of the
federation (tweets: 1,000 tweets, 4 Dirichlet(0.5) silos) votes on them with ``fedbridge.privacy.dp_votes`` at
several k and noise levels (σ for ε = 4 over 1, 2 and 3 releases, and none); the label each candidate gets
(balanced votes, as ``pe``) is compared with the ``centralized`` SLM's prediction (the judge of
``synthetic_quality.py``), over all candidates and over the quarter with the clearest margin. The LLM's intended label
and a non-DP nearest-neighbour classifier (each candidate's 15 nearest private records) are the references.
Writes DIR/vote-labels.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from fedbridge.config import ExperimentConfig
from fedbridge.methods.centralized.server import train_pooled
from fedbridge.methods.pe.server import tally
from fedbridge.methods.seeding import STYLES, generation_prompt
from fedbridge.methods.text import parse_generation
from fedbridge.models.generation import SamplingConfig, generate
from fedbridge.models.loading import load_llm, load_slm
from fedbridge.models.slm import predict_proba
from fedbridge.privacy.dp_votes import sigma_for_votes, vote_histogram
from fedbridge.silo import VOTE_MAX_TOKENS
from fedbridge.tasks import load_federation

REPEATS = 5  # noise draws per setting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="tweets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--candidates-per-label", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/dp-transfer"))
    args = ap.parse_args()
    flat = {**ExperimentConfig().to_run_config(), "task.name": args.task, "seed": args.seed}
    if args.task == "tweets":
        flat |= {"partition.kind": "dirichlet", "task.max-examples": 1000}
    cfg = ExperimentConfig.from_run_config(flat)
    federation = load_federation(cfg.task, cfg.partition, cfg.seed)
    task = federation.task

    model, tok = load_llm("embedded")
    rng = random.Random(args.seed)
    prompts, intended = [], []
    for y, label in enumerate(task.labels):
        for _ in range(args.candidates_per_label):
            prompts.append(generation_prompt(task, label, rng.choice(STYLES)))
            intended.append(y)
    outputs, _ = generate(model, tok, prompts, SamplingConfig(max_new_tokens=48, temperature=0.9, top_p=0.95),
                          seed=args.seed)
    texts, intended = [parse_generation(o) for o in outputs], np.array(intended)

    judge = train_pooled(cfg, federation, cfg.slm.spec_for(0))[0]
    judged = predict_proba(judge, texts).argmax(1)
    test = federation.global_test
    judge_real = float((predict_proba(judge, test.texts).argmax(1) == np.array(test.labels)).mean())

    encoder = load_slm(cfg.slm.spec_for(0), len(task.labels), 0, None,
                       cfg.slm.options(mode="head", max_length=VOTE_MAX_TOKENS))
    candidates = encoder.frozen_features(texts).numpy()
    silos = [(encoder.frozen_features(list(s.train.texts)).numpy(), np.array(s.train.labels)) for s in federation.silos]
    private, labels = np.concatenate([f for f, _ in silos]), np.concatenate([y for _, y in silos])
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    nearest = np.argsort(-(unit(candidates) @ unit(private).T), axis=1)[:, :15]
    knn = np.stack([(labels[nearest] == y).sum(1) / np.mean(labels == y) for y in range(len(task.labels))], 1)

    rows = [{"labels by": "the LLM's intended label", "k": "", "sigma": "", "epsilon": "", "agree all": float(
        np.mean(intended == judged)), "agree clearest 25%": ""},
            {"labels by": "15 nearest private records (non-DP)", "k": "", "sigma": "", "epsilon": "",
             "agree all": float(np.mean(knn.argmax(1) == judged)), "agree clearest 25%": ""}]
    noise = np.random.default_rng(args.seed)
    for k in (4, 16, 48):
        histogram = sum(vote_histogram(f, y, candidates, len(task.labels), k) for f, y in silos)
        for releases in (None, 1, 2, 3):
            sigma = 0.0 if releases is None else sigma_for_votes(4.0, 1e-5, releases)
            agree, clear = [], []
            for _ in range(REPEATS if sigma else 1):
                noisy = histogram + noise.normal(0, sigma, (len(silos), *histogram.shape)).sum(0)
                result = tally(noisy, sigma * np.sqrt(len(silos)), True, 0.0)
                top = np.argsort(-result.margins)[:len(texts) // 4]
                agree.append(np.mean(result.labels == judged))
                clear.append(np.mean(result.labels[top] == judged[top]))
            rows.append({"labels by": "DP votes (balanced)", "k": k, "sigma": round(sigma, 2),
                         "epsilon": "∞" if releases is None else f"4 over {releases} release(s)",
                         "agree all": float(np.mean(agree)), "agree clearest 25%": float(np.mean(clear))})

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"task": args.task, "seed": args.seed, "candidates": len(texts), "private records": int(len(private)),
            "silos": len(silos), "judge accuracy on real test texts": judge_real, "repeats": REPEATS}
    (args.out / "vote-labels.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    fmt = lambda v: f"{100 * v:.1f} %" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"Candidates: {len(texts)} ({args.candidates_per_label} per label, the random API); private records: "
             f"{len(private)} in {len(silos)} silos; judge ({args.task}, seed {args.seed}) on real test texts: "
             f"{100 * judge_real:.1f} %. Agreement with the judge, mean of {REPEATS} noise draws.", "",
             "| labels by | k | σ per silo | ε | agree (all) | agree (clearest 25 %) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['labels by']} | {r['k']} | {r['sigma']} | {r['epsilon']} | {fmt(r['agree all'])} | "
              f"{fmt(r['agree clearest 25%'])} |" for r in rows]
    (args.out / "vote-labels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
