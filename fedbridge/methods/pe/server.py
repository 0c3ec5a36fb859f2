"""Private Evolution (Aug-PE, Xie et al. ICML 2024; PrE-Text, Hou et al. ICML 2024), federated: the silos' DP votes,
not the LLM, decide which synthetic examples exist and what label each carries.

    population = LLM("write a <label> example") x candidates-per-label, for every label
    for t in 1..T:
        H = sum over silos of DP vote histograms of the population      # (candidates x labels), one release per silo
        label(c) = argmax_y H[c, y] / H[:, y].sum()                     # (balance) the federation's label, not the LLM's
        margin(c) = how far label(c)'s votes lead the runner-up's;   keep c if the margin clears the noise
        if t < T: parents = the clearest keep-fraction of each label; population = parents + LLM variations of
                  them (+ fresh candidates where a label has too few parents)
    synthetic set = the clearest num-per-label of each label among the kept candidates of every iteration
    every silo: SLM on private + synthetic -> metrics

Each silo spends pe.epsilon over its T vote releases (σ calibrated on the silo); everything the server does with the
histograms is post-processing. Every iteration is checkpointed (the population, then the summed votes), so a resumed
run never asks the silos to vote twice on the same iteration.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.methods.base import Method, Session, mean_over_silos
from fedbridge.methods.pe.config import PEConfig
from fedbridge.methods.seeding import STYLES, generation_prompt, variation_prompt
from fedbridge.methods.text import NearDuplicates, parse_generation
from fedbridge.methods.votes import VoteRequest, best_per_label, collect_votes, tally
from fedbridge.models.generation import GenerationStats, Prompt, SamplingConfig
from fedbridge.models.llm import LLM, load_server_llm
from fedbridge.tasks import Examples, Task


class PrivateEvolution(Method):
    name = "pe"
    description = "Private Evolution: LLM candidates chosen and labelled by the silos' DP votes, then varied"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.options = from_flat(PEConfig, cfg.method_options, "pe")  # a bad pe.* key fails before any work

    def run(self, session: Session) -> None:
        opts, ckpt, task, record = self.options, session.checkpoint, session.task, session.record
        record.privacy = record.privacy or {}
        if math.isinf(opts.epsilon) and (note := "pe: pe.epsilon=inf, the votes are NOT differentially private") \
                not in record.notes:
            record.notes.append(note)
        with session.phase("server-llm-load"):
            llm = load_server_llm(self.cfg.llm, session.device)
        stats, counts = GenerationStats(), Counter()
        seen = NearDuplicates(opts.near_duplicate)  # every candidate ever written: variations must be new
        pool: list[tuple[str, int, float]] = []  # every kept candidate of every iteration: (text, label, votes)
        parents: list[tuple[str, int]] = []
        for t in range(1, opts.iterations + 1):
            population = ckpt.load_examples(f"population/{t}")
            if population is None:
                with session.phase("server-generate"):
                    population = self._population(llm, task, parents, seen, self.cfg.seed + t, stats, counts)
                ckpt.save_examples(f"population/{t}", population)
            else:
                for text in population.texts:
                    seen.add(text)
            done = ckpt.done(f"votes/{t}")
            if done is None:
                with session.phase("silo-vote"):
                    histogram, noise_std = collect_votes(session, population, VoteRequest(
                        opts.epsilon, opts.iterations, opts.k, opts.noise_seed), t)
                ckpt.complete(f"votes/{t}", histogram=histogram.tolist(), noise_std=noise_std)
            else:
                histogram = np.array(done["histogram"]).reshape(len(population), len(task.labels))
                noise_std = done["noise_std"]
            result = tally(histogram, noise_std, opts.balance, opts.threshold)
            pool += [(population.texts[i], int(result.labels[i]), float(result.margins[i]))
                     for i in np.flatnonzero(result.kept)]
            counts["candidates-voted"] += len(population)
            counts["candidates-kept"] += int(result.kept.sum())
            intended = np.array(population.labels, dtype=int)
            counts["candidates-relabelled"] += int((result.kept & (result.labels != intended)).sum())
            n_parents = max(1, round(opts.keep * opts.candidates_per_label))
            parents = [(population.texts[i], int(result.labels[i])) for i in best_per_label(
                result.labels, result.margins, result.kept, len(task.labels), n_parents)]
        synthetic = self._synthetic(pool, len(task.labels))
        self._record(session, stats, counts, synthetic)
        with session.phase("silo-train-eval"):
            self._train(session, synthetic)
        mean_over_silos(record)

    # ------------------------------------------------------------ the steps

    def _population(self, llm: LLM, task: Task, parents: list[tuple[str, int]], seen: NearDuplicates, seed: int,
                    stats: GenerationStats, counts: Counter) -> Examples:
        """Parents, variations of them and fresh candidates: ``candidates-per-label`` per label, each new text not a
        near-copy of any written before."""
        opts, rng = self.options, random.Random(seed)
        texts, labels = [t for t, _ in parents], [y for _, y in parents]
        prompts: list[Prompt] = []
        intended: list[int] = []
        for y, label in enumerate(task.labels):
            mine = [text for text, parent_label in parents if parent_label == y]
            for i in range(max(0, opts.candidates_per_label - len(mine))):
                style = rng.choice(STYLES)
                prompts.append(variation_prompt(task, label, mine[i % len(mine)], style) if mine
                               else generation_prompt(task, label, style))
                intended.append(y)
        sampling = SamplingConfig(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p)
        outputs, st = llm.generate(prompts, sampling, seed=seed, progress="pe generate")
        stats += st
        counts["generated"] += len(outputs)
        for text, y in zip(map(parse_generation, outputs), intended):
            if len(text.split()) >= opts.min_words and seen.add(text, unless_near=True):
                texts.append(text)
                labels.append(y)
        return Examples.of(texts, labels)

    def _synthetic(self, pool: list[tuple[str, int, float]], num_labels: int) -> Examples:
        """The ``num-per-label`` of each label with the clearest margins among the kept candidates of all iterations
        (a text voted in several iterations counts with its latest votes)."""
        latest = {text: (y, votes) for text, y, votes in pool}
        texts = list(latest)
        labels, votes = np.array([latest[t][0] for t in texts]), np.array([latest[t][1] for t in texts])
        chosen = best_per_label(labels, votes, np.ones(len(texts), bool), num_labels, self.options.num_per_label)
        return Examples.of([texts[i] for i in chosen], [int(labels[i]) for i in chosen])

    def _record(self, session: Session, stats: GenerationStats, counts: Counter, synthetic: Examples) -> None:
        """The run's counts, tokens and the set it sent, once: a resumed run that made the set already has them in the
        record its checkpoint restored."""
        if session.checkpoint.done("synthetic") is not None:
            return
        record = session.record
        for name, value in {**counts, "llm-seconds": stats.seconds, "synthetic": len(synthetic)}.items():
            record.server_metrics[f"pe.{name}"] = record.server_metrics.get(f"pe.{name}", 0) + value
        for y, n in Counter(synthetic.labels).items():
            record.server_metrics[f"pe.synthetic-{session.task.labels[y]}"] = n
        record.tokens["prompt"] += stats.prompt_tokens
        record.tokens["generated"] += stats.generated_tokens
        session.save_contribution(None, "synthetic", self.options.iterations, synthetic)
        session.checkpoint.complete("synthetic")

    def _train(self, session: Session, synthetic: Examples) -> None:
        """Every silo not yet trained gets the set at once and reports as soon as its SLM is trained."""
        ckpt = session.checkpoint
        request = p.request({"synthetic-weight": self.options.synthetic_weight}, global_test=session.global_test,
                            examples=p.examples_record(synthetic))
        todo = {node: request for node, silo in session.silos.items() if ckpt.done(f"trained/{silo}") is None}
        for node, reply in session.iter_replies(p.TRAIN_AUGMENTED, todo, self.options.iterations + 1):
            silo = session.silos[node]
            session.record_silo_metrics({silo: reply})
            ckpt.complete(f"trained/{silo}")
        if not ckpt.steps("trained/"):
            raise session.no_silo_completed("Private Evolution's training")
