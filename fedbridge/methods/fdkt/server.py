"""FDKT (Li et al. 2024, arXiv 2405.14212): DP synthetic demonstrations from silos, LLM augmentation on the server.

One round, as the paper:
  1. every silo writes DP synthetic demonstrations (``dp-sgd`` generator or ``dp-fewshot``) and sends only
     those, with their privacy cost;
  2. the server embeds and clusters them per label, asks its LLM to drop off-domain, wrong-label and
     near-duplicate ones, then prompts the LLM with 1-2 kept demonstrations to write new examples, which it
     parses, filters (length, label) and deduplicates (against each other and the demonstrations);
  3. (``fdkt.labels=dp-votes``, the default; not in the paper) every silo votes once, with DP, on the labels of all
     the augmented examples together (``fedbridge.methods.votes``): each example takes the federation's voted label,
     or is dropped where the vote is too close to call. The LLM's intended label is right on a third to a half of
     them; the votes are the silos' judgement, at ``fdkt.vote-epsilon`` more per silo;
  4. each silo receives its augmented set (or one pooled set), trains its SLM on private + augmented data, and
     reports metrics. With ``fdkt.labels=llm`` each set leaves as soon as it is ready (silos whose demonstrations
     arrive together are augmented in one pass of the LLM); a vote waits for every silo's demonstrations.
Everything the server does is post-processing of DP outputs, so it costs no further privacy.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import RecordDict

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.methods.base import Method, Session, mean_over_silos
from fedbridge.methods.fdkt.config import FDKTConfig
from fedbridge.methods.fdkt.messages import SYNTHESIZE
from fedbridge.methods.seeding import (
    filter_demonstration_sets,
    keep_demonstrations,
    read_demonstrations,
    seeded_prompts,
)
from fedbridge.methods.text import deduplicate, parse_generation
from fedbridge.methods.votes import Tally, VoteRequest, collect_votes, tally
from fedbridge.models.generation import GenerationStats, SamplingConfig
from fedbridge.models.llm import LLM, load_server_llm
from fedbridge.tasks import Examples, Task

# ------------------------------------------------------------------ server pipeline


def augment(llm: LLM, task: Task, sets: Mapping[str, Examples], cfg: FDKTConfig, seed: int, stats: GenerationStats,
            counts: Counter) -> dict[str, Examples]:
    """FDKT's server step for the DP demonstrations of one or more silos (or one pool): per set, its kept
    demonstrations + new examples. Each stage runs once over all the sets (one filter pass, one generation pass,
    one label check), so silos that arrive together share the LLM's batches; each set's prompts and deduplication
    are its own."""
    kept = filter_demonstration_sets(llm, task, sets, cfg.llm_filter, seed, stats, counts)
    prompts, intended, owner = [], [], []
    for key in sets:
        mine, labels = seeded_prompts(task, kept[key], cfg.augment_per_label, cfg.demos_per_prompt, random.Random(seed))
        prompts, intended, owner = prompts + mine, intended + labels, owner + [key] * len(mine)
    outs, st = llm.generate(prompts, SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                                    top_p=cfg.top_p, batch_size=16), seed=seed, progress="augment")
    stats += st
    texts = [parse_generation(o) for o in outs]
    counts["generated"] += len(texts)
    ok = [i for i, t in enumerate(texts) if len(t.split()) >= cfg.min_words]
    if cfg.label_filter and ok:
        probs = llm.label_probabilities([texts[i] for i in ok], task.labels, task.instruction)
        ok = [i for i, row in zip(ok, probs) if row[intended[i]] > row.min() or len(task.labels) == 1]
    counts["after-length-label-filter"] += len(ok)
    augmented = {}
    for key in sets:
        all_kept = [t for ts in kept[key].values() for t in ts]
        mine = [i for i in ok if owner[i] == key]
        new = [mine[j] for j in deduplicate([texts[i] for i in mine], all_kept, cfg.near_duplicate)]
        counts["after-dedup"] += len(new)
        augmented[key] = Examples.of(all_kept + [texts[i] for i in new],
                                     [y for y, ts in kept[key].items() for _ in ts] + [intended[i] for i in new])
    return augmented


def vote_candidates(sets: Mapping[str, Examples]) -> Examples:
    """The texts of every set, once each, in order (with the label the LLM was asked to write): what the silos vote on."""
    intended = {t: y for examples in sets.values() for t, y in zip(examples.texts, examples.labels)}
    return Examples.of(intended, intended.values())


def relabel(sets: Mapping[str, Examples], texts: Sequence[str], votes: Tally) -> tuple[dict[str, Examples], Counter]:
    """Each set with every example's label the federation's voted one (``votes`` is the tally of ``texts``), and the
    examples whose vote did not clear the noise dropped; with the counts of kept, dropped and relabelled examples."""
    voted = {t: int(y) for t, y, keep in zip(texts, votes.labels, votes.kept) if keep}
    out, counts = {}, Counter()
    for key, examples in sets.items():
        mine = [t for t in examples.texts if t in voted]
        out[key] = Examples.of(mine, [voted[t] for t in mine])
        counts["vote-kept"] += len(mine)
        counts["vote-dropped"] += len(examples) - len(mine)
        counts["vote-relabelled"] += sum(t in voted and voted[t] != y for t, y in zip(examples.texts, examples.labels))
    return out, counts


class FDKT(Method):
    name = "fdkt"
    description = "FDKT: DP synthetic demonstrations from silos, LLM-augmented on the server"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.options = from_flat(FDKTConfig, cfg.method_options, "fdkt")  # a bad fdkt.* key fails before any work

    def run(self, session: Session) -> None:
        """One FDKT round, checkpointed per silo and step (demonstrations received, augmented set made, votes, SLM
        trained): a resumed run skips what is done, and never asks a silo for demonstrations or votes it already sent.
        With ``fdkt.labels=llm`` and per-silo sets, each silo's set leaves as soon as its demonstrations are augmented;
        otherwise the sets leave together, once every silo's demonstrations are in (a pool, or one vote over all)."""
        cfg, record, ckpt, num_labels = self.options, session.record, session.checkpoint, len(session.task.labels)
        record.privacy = record.privacy or {}
        for off, note in ((math.isinf(cfg.epsilon), "fdkt: fdkt.epsilon=inf, the demonstrations are NOT "
                           "differentially private"),
                          (cfg.labels == "dp-votes" and math.isinf(cfg.vote_epsilon), "fdkt: fdkt.vote-epsilon=inf, "
                           "the votes that label the augmented examples are NOT differentially private")):
            if off and note not in record.notes:
                record.notes.append(note)
        with session.phase("server-llm-load"):
            llm = load_server_llm(self.cfg.llm, session.device)
        nodes = {silo: node for node, silo in session.silos.items()}
        demos = {step.split("/", 1)[1]: ckpt.load_examples(step) for step in ckpt.steps("demonstrations/")}
        trained = {step.split("/", 1)[1] for step in ckpt.steps("trained/")}
        pending: dict[str, int] = {}
        early = not cfg.pooled and cfg.labels == "llm"  # each silo's set leaves as soon as it is made

        def send(silos: list[str], augmented: Examples) -> None:
            request = self._train_request(session, augmented)
            pending.update(session.push(p.TRAIN_AUGMENTED, {nodes[s]: request for s in silos}, 2))

        def augment_each(silos: list[str]) -> None:  # per-silo sets, one LLM pass for all of them
            sets = self._augmented(session, {silo: ([silo], demos[silo]) for silo in silos}, llm)
            for silo in silos:
                send([silo], sets[silo])

        with session.phase("silo-synthesize+server-augment"):
            if early:  # resumed: silos whose demonstrations are here already get their sets first
                augment_each(sorted(demos.keys() & nodes.keys() - trained))
            ask = {node: p.request() for silo, node in nodes.items() if silo not in demos}
            for batch in session.reply_batches(
                    session.push(SYNTHESIZE, ask, 1), SYNTHESIZE, 1,
                    parse=lambda content: read_demonstrations(content, num_labels),
                    max_bytes=p.MAX_EXAMPLES_REPLY_BYTES):
                for node, (examples, privacy, metrics) in batch:
                    demos[session.silos[node]] = examples
                    keep_demonstrations(session, node, 1, examples, privacy, metrics)
                    session.event(node, "processed", SYNTHESIZE, 1)
                if early:  # the sets of the silos that arrived together go back at once
                    augment_each([session.silos[node] for node, _ in batch])
            if not early and demos:
                sources = sorted(demos)
                jobs = ({"pooled": (sources, Examples.of([t for s in sources for t in demos[s].texts],
                                                         [y for s in sources for y in demos[s].labels]))}
                        if cfg.pooled else {s: ([s], demos[s]) for s in sources})
                sets = self._augmented(session, jobs, llm)
        if not early and demos:
            if cfg.labels == "dp-votes":
                with session.phase("silo-vote"):
                    sets = self._relabelled(session, sets)
            for key, augmented in sets.items():
                todo = sorted(demos.keys() & nodes.keys() - trained) if cfg.pooled else [key]
                send([s for s in todo if s in nodes and s not in trained], augmented)
        with session.phase("silo-train-eval"):
            for node, reply in session.replies(pending, p.TRAIN_AUGMENTED, 2):
                silo = session.silos[node]
                session.record_silo_metrics({silo: reply})
                ckpt.complete(f"trained/{silo}")
                trained.add(silo)
        if not trained:
            raise session.no_silo_completed("FDKT training")
        mean_over_silos(record)

    def _relabelled(self, session: Session, sets: Mapping[str, Examples]) -> dict[str, Examples]:
        """Every augmented set labelled by the silos' DP votes (``relabel``), one vote per silo over all the sets'
        texts together. The summed votes are checkpointed: a resumed run asks no silo twice."""
        cfg, ckpt = self.options, session.checkpoint
        candidates = vote_candidates(sets)
        done = ckpt.done("votes")
        if done is not None:
            histogram = np.array(done["histogram"]).reshape(len(candidates), len(session.task.labels))
            return relabel(sets, candidates.texts, tally(histogram, done["noise_std"], True, cfg.vote_threshold))[0]
        histogram, noise_std = collect_votes(session, candidates, VoteRequest(cfg.vote_epsilon, 1, cfg.vote_k,
                                                                              cfg.noise_seed), 1)
        out, counts = relabel(sets, candidates.texts, tally(histogram, noise_std, True, cfg.vote_threshold))
        for name, value in counts.items():
            session.record.server_metrics[f"fdkt.{name}"] = value
        for key, examples in out.items():
            session.save_contribution(None, "synthetic", 1, examples, set=key)
        ckpt.complete("votes", histogram=histogram.tolist(), noise_std=noise_std)  # with the record as it is now
        return out

    def _augmented(self, session: Session, jobs: Mapping[str, tuple[list[str], Examples]],
                   llm: LLM) -> dict[str, Examples]:
        """The augmented set of each key (a silo, or 'pooled') from its (source silos, their demonstrations): from the
        checkpoint where a resumed run made it already; the others made in one ``augment`` call, counted in the
        record, and checkpointed."""
        ckpt, record, out, todo = session.checkpoint, session.record, {}, {}
        for key, (sources, demos) in jobs.items():
            done = ckpt.done(f"augmented/{key}")
            if done is not None and done["sources"] == sources:
                out[key] = ckpt.load_examples(f"augmented/{key}")
            else:
                todo[key] = demos
        if not todo:
            return out
        stats, counts = GenerationStats(), Counter()
        out |= augment(llm, session.task, todo, self.options, self.cfg.seed, stats, counts)
        for name, value in {**counts, "llm-seconds": stats.seconds}.items():
            record.server_metrics[f"fdkt.{name}"] = record.server_metrics.get(f"fdkt.{name}", 0) + value
        record.tokens["prompt"] += stats.prompt_tokens
        record.tokens["generated"] += stats.generated_tokens
        for key in todo:
            sources = jobs[key][0]
            ckpt.save_examples(f"augmented/{key}", out[key])
            ckpt.complete(f"augmented/{key}", sources=sources)
            session.save_contribution(None, "augmented", 1, out[key], set=key, sources=sources)
        return out

    def _train_request(self, session: Session, augmented: Examples) -> RecordDict:
        """The ``train.augmented`` request: the loss weight the server decides travels in it, unlike the silo's own
        demonstration options (``fdkt.epsilon``...), which the silo reads from the run config (``fedbridge.protocol``'s
        option-channel rule; Private Evolution sends the same message with its own weight)."""
        return p.request({"synthetic-weight": self.options.synthetic_weight}, global_test=session.global_test,
                         examples=p.examples_record(augmented))
