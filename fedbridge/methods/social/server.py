"""Social Learning (Mohtashami et al. 2023, arXiv 2312.11441): teacher silos teach a student LLM in natural language.

Roles: every silo is a *teacher* with its own causal LM (``social.teacher``) and private data; the server is the
*aggregator* and the *student* (the server LLM, ``llm.model``), which never sees private data and is never trained:
it answers the global test set in context. One run:
  1. ``query.teach``: each teacher writes
       examples      n_gen private examples in a few-shot prompt (no instruction), continuations sampled at
                     temperature τ, parsed into (text, label), copies of private text dropped (verbatim filter),
                     the top-k by the teacher's own perplexity kept; or
       instructions  from 8 private examples, a task description for someone who never sees the data;
     and sends only those, with how they were made (and, with ``social.dp=dp-fewshot``, their ε);
  2. ``query.vote`` (for the voting aggregators): every teacher scores every candidate by length-normalised
     likelihood (examples: as a continuation of its own held-out examples; instructions: its held-out examples as
     a continuation of the instruction);
  3. each aggregator in ``social.aggregators`` picks n candidates (``fedbridge.methods.social.aggregators``);
  4. the student answers the (capped) global test set with each aggregated context, with label-constrained
     answers, next to the baselines: 0-shot, each teacher's own contribution (``raw``), and n original private
     examples (``original``: a NON-PRIVATE upper bound, raw data crosses the wire, off unless asked for);
  5. with planted canaries (``canaries.enabled``), each student prompt's canary rank among 999 comparison secrets.
Each variant's metrics go to ``server_metrics["variant.<name>.<metric>"]`` (``fedbridge compare`` shows one row
each); ``global_metrics`` holds the first aggregator's.

Checkpoint (``resume=true``): each teacher's lesson (``lesson/<silo>``), each teacher's votes on the candidate list
they were cast on (``vote/<silo>``), and each variant's student metrics (``eval/<variant>``, ``canary/<variant>``) are
steps: a restarted server asks no teacher to teach again (a DP teacher could not: its budget is spent), and re-votes
only if the candidate list changed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig
from fedbridge.methods.base import AggregatorAxis, Method, Session
from fedbridge.methods.social.aggregators import AGGREGATORS, Candidate, get_aggregator
from fedbridge.methods.social.config import ORIGINAL, ZERO_SHOT, social_options
from fedbridge.methods.social.messages import SHARE_RAW, TEACH, VOTE
from fedbridge.methods.social.teaching import Lesson, examples_context, instructions_context
from fedbridge.models.generation import prompt_ids
from fedbridge.models.llm import LLM, load_server_llm
from fedbridge.models.llm_classifier import classification_prompt
from fedbridge.privacy.audit import RAW_KIND, canary_report
from fedbridge.privacy.canaries import run_canary
from fedbridge.tasks import Examples, classification_metrics

# ------------------------------------------------------------------ server side


@dataclass(frozen=True)
class Variant:
    """One student prompt to evaluate: its name, its context, and the ε of what it holds (nan: nothing shared)."""

    name: str
    context: str
    epsilon: float


class SocialLearning(Method):
    name = "social"
    description = ("Social Learning: teacher silos share synthetic examples or instructions; the server LLM learns "
                   "in context")
    aggregator = AggregatorAxis("social.aggregators", tuple(AGGREGATORS), one_run=True)

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.options = social_options(cfg)  # bad social.* keys fail before any work

    def non_private(self) -> tuple[str, ...]:
        votes = any(AGGREGATORS[a].needs_votes for a in self.options.aggregator_names)
        return (*(("votes",) if votes else ()), *(("raw examples",) if "original" in self.options.baseline_names
                                                  else ()))

    def run(self, session: Session) -> None:
        opts, record = self.options, session.record
        record.privacy = record.privacy or {}  # a resumed run's record holds its teachers' already
        test = session.global_test
        if opts.max_test and len(test) > opts.max_test:
            test = Examples.of(test.texts[:opts.max_test], test.labels[:opts.max_test])
        with session.phase("server-llm-load"):
            student = load_server_llm(self.cfg.llm, session.device)
        with session.phase("teach"):
            candidates = self._teach(session)
        aggregators = [get_aggregator(a, opts.diversity) for a in opts.aggregator_names]
        scores = None
        if any(a.needs_votes for a in aggregators):
            with session.phase("vote"):
                scores = self._vote(session, candidates)
        variants = self._variants(session, candidates, aggregators, scores)
        with session.phase("student-eval"):
            results = {v.name: _once(session, f"eval/{v.name}",
                                     lambda v=v: self._evaluate(student, session, test, v.context))
                       for v in variants}
            if "raw" in opts.baseline_names:
                results[f"{opts.mode}:raw"] = _once(session, f"eval/{opts.mode}:raw", lambda: self._evaluate_raw(
                    student, session, test, candidates))
        if self.cfg.canaries.enabled:
            canary = run_canary(self.cfg.canaries, self.cfg.seed)
            with session.phase("canary"):
                for v in variants:
                    if v.context:  # the student prompt of this variant, as the canary's context
                        results[v.name] |= _once(session, f"canary/{v.name}", lambda v=v: canary_report(
                            student, v.context + "\n\n", *canary))
        self._record(session, variants, results, aggregators[0].name)
        self._save_prompts(session, variants)

    # -------------------------------------------------------------- rounds

    def _teach(self, session: Session) -> list[Candidate]:
        opts, record, task, ckpt = self.options, session.record, session.task, session.checkpoint
        candidates, seen = [], set()

        def take(silo: str, lesson: Lesson) -> None:
            for text, label in zip(lesson.texts, lesson.labels or [None] * len(lesson.texts)):
                key = (" ".join(text.lower().split()), label)
                if key not in seen:  # two teachers may write the same text: the student needs it once
                    seen.add(key)
                    candidates.append(Candidate(text, label, silo))

        for step, state in ckpt.steps("lesson/").items():  # a resumed run: lessons received before the restart
            take(step.removeprefix("lesson/"), Lesson(**state))

        def parse(content) -> Lesson:
            metrics, privacy, provenance = p.read_metrics(content), p.read_privacy(content), p.read_provenance(content)
            if opts.mode == "instructions":
                return Lesson(p.read_texts(content, p.INSTRUCTIONS), None, provenance, privacy, metrics)
            examples = p.read_examples(content, p.EXAMPLES, len(task.labels))
            return Lesson(list(examples.texts), list(examples.labels), provenance, privacy, metrics)

        request = {n: p.request({"mode": opts.mode}) for n, silo in session.silos.items()
                   if not ckpt.done(f"lesson/{silo}")}
        for node, lesson in session.iter_replies(TEACH, request, round_=1, parse=parse,
                                                 max_bytes=p.MAX_EXAMPLES_REPLY_BYTES):
            silo = session.silos[node]
            record.privacy[silo] = lesson.privacy
            if lesson.labels is None:
                session.save_contribution(node, "social-instructions", 1, texts=lesson.texts,
                                          provenance=lesson.provenance, privacy=lesson.privacy)
            else:
                session.save_contribution(node, "social-examples", 1, Examples.of(lesson.texts, lesson.labels),
                                          provenance=lesson.provenance, privacy=lesson.privacy)
            take(silo, lesson)
            record.silo_metrics.setdefault(silo, {}).update(lesson.metrics)
            record.tokens["silo-generated"] = (record.tokens.get("silo-generated", 0)
                                               + int(lesson.metrics.get("teach.tokens-generated", 0)))
            session.event(node, "processed", TEACH, 1)
            ckpt.complete(f"lesson/{silo}", **dataclasses.asdict(lesson))
        if not candidates:
            raise RuntimeError("No teacher sent a usable example or instruction (see the record's failures and the "
                               "silos' teach.* metrics).")
        record.server_metrics["social.candidates"] = len(candidates)
        return candidates

    def _vote(self, session: Session, candidates: list[Candidate]) -> np.ndarray:
        opts = self.options
        texts = [c.text for c in candidates]
        if opts.mode == "examples":
            payload = {p.EXAMPLES: p.examples_record(Examples.of(texts, [c.label for c in candidates]))}
        else:
            payload = {p.INSTRUCTIONS: p.texts_record(texts)}
        ckpt = session.checkpoint
        voted_on = hashlib.sha256(json.dumps([dataclasses.astuple(c) for c in candidates]).encode()).hexdigest()
        rows = {step.removeprefix("vote/"): state["scores"] for step, state in ckpt.steps("vote/").items()
                if state["candidates"] == voted_on}  # a resumed run: votes on this same candidate list
        request = {n: p.request({"mode": opts.mode}, **payload) for n, silo in session.silos.items()
                   if silo not in rows}
        parse = functools.partial(p.read_floats, key=p.VOTES, field="scores", length=len(candidates))
        for node, scores in session.iter_replies(VOTE, request, round_=2, parse=parse):
            rows[session.silos[node]] = scores
            session.event(node, "processed", VOTE, 2)
            ckpt.complete(f"vote/{session.silos[node]}", candidates=voted_on, scores=scores)
        if not rows:
            raise RuntimeError("No teacher answered the vote (see the record's failures).")
        session.record.server_metrics["social.voters"] = len(rows)
        return np.array([rows[s] for s in sorted(rows)])

    def _variants(self, session: Session, candidates: list[Candidate], aggregators, scores) -> list[Variant]:
        opts, task = self.options, session.task
        variants = []
        if "zero-shot" in opts.baseline_names:
            variants.append(Variant(ZERO_SHOT, "", math.nan))
        for aggregator in aggregators:
            picked = [candidates[i] for i in aggregator.select(candidates, scores, opts.keep,
                                                               random.Random(self.cfg.seed))]
            session.record.server_metrics[f"social.{aggregator.name}.picked"] = len(picked)
            variants.append(Variant(f"{opts.mode}:{aggregator.name}", self._context(picked, task.labels),
                                    math.inf if aggregator.needs_votes else _shared_epsilon(session)))
        if "original" in opts.baseline_names:
            with session.phase("share-raw"):
                original = self._original(session)
            variants.append(Variant(ORIGINAL, examples_context(original.texts, original.labels, task.labels,
                                                               opts.max_example_chars), math.inf))
        return variants

    def _context(self, picked: Sequence[Candidate], label_names: Sequence[str]) -> str:
        if self.options.mode == "examples":
            return examples_context([c.text for c in picked], [c.label for c in picked], label_names,
                                    self.options.max_example_chars)
        return instructions_context([c.text for c in picked])

    def _original(self, session: Session) -> Examples:
        """The non-private upper bound: n raw private examples, an equal share from every silo."""
        opts = self.options
        per_silo = math.ceil(opts.num_examples / max(1, len(session.silos)))
        session.record.notes.append(f"social: '{ORIGINAL}' puts {opts.num_examples} raw private examples in the "
                                    "student prompt: a NON-PRIVATE upper bound (raw data crossed the wire)")
        texts, labels = [], []
        parse = functools.partial(p.read_examples, key=p.EXAMPLES, num_labels=len(session.task.labels))
        for node, raw in session.iter_replies(SHARE_RAW, {n: p.request({"n": per_silo}) for n in session.silos},
                                              round_=3, parse=parse, max_bytes=p.MAX_EXAMPLES_REPLY_BYTES):
            session.save_contribution(node, RAW_KIND, 3, raw)
            texts += raw.texts
            labels += raw.labels
        order = random.Random(self.cfg.seed).sample(range(len(texts)), min(opts.num_examples, len(texts)))
        return Examples.of([texts[i] for i in order], [labels[i] for i in order])

    # -------------------------------------------------------------- student

    def _evaluate(self, student: LLM, session: Session, test: Examples, context: str) -> dict[str, float]:
        task = session.task
        probs = student.label_probabilities(test.texts, task.labels, task.instruction,
                                            batch_size=self.cfg.llm.batch_size,
                                            max_tokens=self.options.max_prompt_tokens, progress="student",
                                            context=context, calibrate=self.cfg.llm.calibrate)
        session.record.tokens["prompt"] += sum(
            len(prompt_ids(student.tokenizer, classification_prompt(task.instruction, t, task.labels, context=context)))
            for t in test.texts)
        return classification_metrics(test.labels, probs)

    def _evaluate_raw(self, student: LLM, session: Session, test: Examples, candidates: list[Candidate]) -> dict:
        """Each teacher's own contribution alone (its top n) as the student's context, averaged over teachers."""
        per_teacher = []
        for teacher in sorted({c.teacher for c in candidates}):
            own = [c for c in candidates if c.teacher == teacher][:self.options.keep]
            per_teacher.append(self._evaluate(student, session, test, self._context(own, session.task.labels)))
        return {"accuracy": float(np.mean([m["accuracy"] for m in per_teacher])),
                "macro_f1": float(np.mean([m["macro_f1"] for m in per_teacher])), "n": per_teacher[0]["n"],
                "teachers": len(per_teacher)}

    # -------------------------------------------------------------- record

    def _record(self, session: Session, variants: list[Variant], results: dict[str, dict], headline: str) -> None:
        opts, record = self.options, session.record
        epsilons = {v.name: v.epsilon for v in variants} | {f"{opts.mode}:raw": _shared_epsilon(session)}
        for name, metrics in results.items():
            for key, value in metrics.items():
                record.server_metrics[f"variant.{name}.{key}"] = value
            record.server_metrics[f"variant.{name}.epsilon"] = epsilons.get(name, math.nan)
        head = results[f"{opts.mode}:{headline}"]
        record.global_metrics.update({k: head[k] for k in ("accuracy", "macro_f1", "n")})
        for key in ("canary-rank", "canary-exposure"):
            if key in head:
                record.server_metrics[key] = head[key]
        if opts.dp == "none":
            record.notes.append("social: teachers' examples/instructions are not differentially private "
                                "(social.dp=none); the verbatim filter and perplexity top-k limit copying, they "
                                "do not bound it")
        elif any(AGGREGATORS[a].needs_votes for a in opts.aggregator_names):
            record.notes.append("social: voting reads the teachers' held-out data without DP: the voting variants "
                                "are non-private (epsilon inf), whatever the examples' epsilon")

    def _save_prompts(self, session: Session, variants: list[Variant]) -> None:
        """The student prompts beside the run record, for ``fedbridge audit``."""
        path = Path(self.cfg.results_dir) / f"{session.record.run_name}.student-prompts.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"variant": v.name, "prompt": v.context}, ensure_ascii=False) + "\n"
                                for v in variants if v.context), encoding="utf-8")
        session.record.artifacts["student-prompts"] = str(path)


def _once(session: Session, step: str, compute: Callable[[], dict]) -> dict:
    """``compute()``, or its result from the checkpoint when a resumed run did it already."""
    step = re.sub(r"[^A-Za-z0-9_./-]", "_", step)  # variant names: 'examples:voting', 'original(non-private)'
    if (done := session.checkpoint.done(step)) is not None:
        return done
    result = compute()
    session.checkpoint.complete(step, **result)
    return result


def _shared_epsilon(session: Session) -> float:
    """The largest ε any teacher's contribution carries (inf: non-private)."""
    return max((float(v["epsilon"]) for v in session.record.privacy.values()), default=math.nan)
