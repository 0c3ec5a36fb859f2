"""New labelled examples seeded by DP demonstrations: FDKT's server stages, shared with the pipeline method.

The server LLM first drops demonstrations that are off-domain, wrong-label or near-copies (``filter_demonstrations``:
per label, clustered, the LLM names the ones to keep), then is prompted with 1-2 kept demonstrations of a label to
write a new example of it (``seeded_prompts``). Everything here is post-processing of DP outputs.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Hashable, Mapping

import numpy as np
from flwr.app import RecordDict
from sklearn.cluster import KMeans

from fedbridge import protocol as p
from fedbridge.methods.base import Session
from fedbridge.models.embedding import embed
from fedbridge.models.generation import GenerationStats, Prompt, SamplingConfig
from fedbridge.models.llm import LLM
from fedbridge.tasks import Examples, Task


def parse_kept_indices(answer: str, n: int) -> list[int] | None:
    """Numbers 1..n in the LLM's answer, as 0-based indices; None when it names none (keep everything then)."""
    found = sorted({int(m) - 1 for m in re.findall(r"\d+", answer) if 1 <= int(m) <= n})
    return found or None


def _filter_prompt(task: Task, label: str, texts: list[str]) -> Prompt:
    listing = "\n".join(f"{i + 1}. {t[:400]}" for i, t in enumerate(texts))
    return [{"role": "user", "content":
             f"Below are {len(texts)} examples of a {task.description} with label '{label}'.\n{listing}\n\n"
             f"Which numbers are real {task.description}s, really have the label '{label}', and are not "
             "near-copies of another one? Answer with the numbers only, separated by commas."}]


def llm_filter(llm: LLM, task: Task, label: str, texts: list[str], seed: int, stats: GenerationStats,
               counts: Counter) -> list[int]:
    """Cluster the demonstrations (k = ceil(n/4)), ask the LLM per cluster which to keep; unparseable = keep all."""
    return _llm_filter_all(llm, task, [(label, texts)], seed, stats, counts)[0]


def _llm_filter_all(llm: LLM, task: Task, jobs: list[tuple[str, list[str]]], seed: int, stats: GenerationStats,
                    counts: Counter) -> list[list[int]]:
    """``llm_filter`` for many (label, texts) sets at once: every cluster's question in one generation pass."""
    members = []  # per job, its clusters (lists of indices); a set of fewer than two texts is kept whole, unasked
    for _, texts in jobs:
        k = math.ceil(len(texts) / 4)
        clusters = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(embed(texts, device=llm.device)) if k > 1 \
            else np.zeros(len(texts), dtype=int)
        members.append([[i for i in range(len(texts)) if clusters[i] == c] for c in range(k)]
                       if len(texts) >= 2 else [])
    prompts = [_filter_prompt(task, label, [texts[i] for i in m])
               for (label, texts), clusters in zip(jobs, members) for m in clusters]
    answers = iter([])
    if prompts:
        found, st = llm.generate(prompts, SamplingConfig(max_new_tokens=24, temperature=0.0, batch_size=8))
        stats += st
        answers = iter(found)
    kept_all = []
    for (_, texts), clusters in zip(jobs, members):
        kept = [] if clusters else list(range(len(texts)))
        for m in clusters:
            picked = parse_kept_indices(next(answers), len(m))
            counts["filter-unparseable"] += picked is None
            kept += [m[j] for j in (picked if picked is not None else range(len(m)))]
        kept_all.append(sorted(kept))
    return kept_all


def filter_demonstrations(llm: LLM, task: Task, demos: Examples, use_llm: bool, seed: int, stats: GenerationStats,
                          counts: Counter) -> dict[int, list[str]]:
    """The demonstrations of each label that the LLM keeps (all of them when ``use_llm`` is off)."""
    return filter_demonstration_sets(llm, task, {None: demos}, use_llm, seed, stats, counts)[None]


def filter_demonstration_sets(llm: LLM, task: Task, sets: Mapping[Hashable, Examples], use_llm: bool, seed: int,
                              stats: GenerationStats, counts: Counter) -> dict[Hashable, dict[int, list[str]]]:
    """``filter_demonstrations`` of several silos' sets, with one LLM pass for all of them."""
    jobs = [(key, y, [t for t, label in zip(demos.texts, demos.labels) if label == y])
            for key, demos in sets.items() for y in range(len(task.labels))]
    if use_llm:
        picks = _llm_filter_all(llm, task, [(task.labels[y], texts) for _, y, texts in jobs], seed, stats, counts)
    else:
        picks = [range(len(texts)) for *_, texts in jobs]
    kept: dict[Hashable, dict[int, list[str]]] = {key: {} for key in sets}
    for (key, y, texts), idx in zip(jobs, picks):
        kept[key][y] = [texts[i] for i in idx]
        counts["demonstrations"] += len(texts)
        counts["kept-by-filter"] += len(kept[key][y])
    return kept


STYLES = ("", "Keep it short.", "Write two or three sentences.", "Write it in the first person.",
          "Use plain, everyday words.", "Include one concrete detail.", "Make it sound like a real person wrote it.")


def generation_prompt(task: Task, label: str, style: str = "") -> Prompt:
    """The random API: one new example of a label, from the task's description alone."""
    hint = f" {style}" if style else ""
    return [{"role": "user", "content": f"Write one {task.description} with label '{label}'.{hint} "
                                        "Reply with the text only."}]


def variation_prompt(task: Task, label: str, text: str, style: str = "") -> Prompt:
    """The variation API: a new example that says what ``text`` says, in other words."""
    hint = f" {style}" if style else ""
    return [{"role": "user", "content": f"Here is a {task.description} with label '{label}':\n\n{text[:500]}\n\n"
                                        f"Rewrite it as a new {task.description} with label '{label}', in different "
                                        f"words, keeping its topic and tone.{hint} Reply with the text only."}]


def _augment_prompt(task: Task, label: str, demos: list[str]) -> Prompt:
    shown = "\n\n".join(f"Example: {d[:500]}" for d in demos)
    return [{"role": "user", "content":
             f"Here are examples of a {task.description} with label '{label}'.\n\n{shown}\n\nWrite one new "
             f"{task.description} with label '{label}'. Make it different from the examples; do not copy them. "
             "Reply with the text only."}]


def seeded_prompts(task: Task, kept: dict[int, list[str]], per_label: int, demos_per_prompt: int,
                   rng: random.Random) -> tuple[list[Prompt], list[int]]:
    """``per_label`` prompts for each label with kept demonstrations, each showing ``demos_per_prompt`` of them
    drawn by ``rng``, and the label each prompt asks for."""
    prompts, intended = [], []
    for y, texts in kept.items():
        for _ in range(per_label if texts else 0):
            prompts.append(_augment_prompt(task, task.labels[y], rng.sample(texts, min(demos_per_prompt, len(texts)))))
            intended.append(y)
    return prompts, intended


def read_demonstrations(content: RecordDict, num_labels: int) -> tuple[Examples, dict, dict]:
    """A ``query.synthesize`` reply: (the DP demonstrations, their privacy cost, the synthesis metrics)."""
    return p.read_examples(content, p.EXAMPLES, num_labels), p.read_privacy(content), p.read_metrics(content)


def keep_demonstrations(session: Session, node: int, round_: int, examples: Examples, privacy: dict,
                        metrics: dict) -> None:
    """One silo's DP demonstrations arrived: its privacy entry and synthesis metrics in the record, the
    contribution the audit reads, and the checkpoint step a resumed run skips (it never asks again)."""
    record, silo = session.record, session.silo_name(node)
    record.privacy = record.privacy or {}
    record.privacy[silo] = privacy
    session.save_contribution(node, "dp-demonstrations", round_, examples, privacy=privacy)
    record.silo_metrics.setdefault(silo, {}).update(metrics)
    record.tokens["silo-generated"] = record.tokens.get("silo-generated", 0) + int(metrics.get("synth.tokens-generated", 0))
    session.checkpoint.save_examples(f"demonstrations/{silo}", examples)
    session.checkpoint.complete(f"demonstrations/{silo}")
