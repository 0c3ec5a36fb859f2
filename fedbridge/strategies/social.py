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
  3. each aggregator in ``social.aggregators`` picks n candidates (``fedbridge.strategies.aggregators``);
  4. the student answers the (capped) global test set with each aggregated context, with label-constrained
     answers, next to the baselines: 0-shot, each teacher's own contribution (``raw``), and n original private
     examples (``original``: a NON-PRIVATE upper bound, raw data crosses the wire, off unless asked for);
  5. with planted canaries (``social.canaries``), each student prompt's canary rank among 999 comparison secrets.
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
from flwr.app import ConfigRecord
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import ConfigError
from fedbridge.models.generation import (
    SamplingConfig,
    continuation_logprobs,
    continuation_logprobs_shared,
    generate,
    prompt_ids,
)
from fedbridge.models.llm_classifier import classification_prompt, label_probabilities
from fedbridge.models.loading import load_llm
from fedbridge.privacy.audit import RAW_KIND, CanarySetup, canary_report
from fedbridge.privacy.canaries import TEMPLATES, CopyDetector
from fedbridge.strategies.aggregators import AGGREGATORS, Candidate, get_aggregator
from fedbridge.strategies.base import Method, Session
from fedbridge.tasks import Examples, classification_metrics

MODES = p.SOCIAL_MODES
BASELINES = ("zero-shot", "raw", "original")
CONDITIONINGS = ("label", "none")
DP_MECHANISMS = ("none", "dp-fewshot")
ZERO_SHOT, ORIGINAL = "0-shot", "original(non-private)"


@dataclass(frozen=True)
class SocialConfig:
    mode: str = "examples"  # examples | instructions
    num_examples: int = 16  # n: synthetic examples in the student's prompt (and original examples for the bound)
    num_instructions: int = 1  # instructions in the student's prompt (instructions mode)
    aggregators: str = "balanced,voting,random"  # each is evaluated on the same candidates; the first is the headline
    baselines: str = "zero-shot"  # comma list of zero-shot, raw (each teacher alone), original (NON-PRIVATE bound)
    teacher: str = "embedded"  # the teachers' causal LM (any HF id or directory; tiny-llama in tests)
    # examples mode (teacher side)
    shots: int = 8  # n_gen: private examples in each generation prompt
    samples: int = 8  # generations per teacher, each from a fresh draw of n_gen examples
    top_k: int = 4  # kept per teacher: the lowest perplexity under the teacher's own model
    conditioning: str = "label"  # label: prompt ends with 'Label: y' (labels cycled), the teacher writes the text;
    # none: the paper's free continuation, (text, label) parsed from it, unparseable ones dropped
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 64
    max_example_chars: int = 300  # every example (private, synthetic, held-out) is cut to this in prompts
    verbatim_filter: bool = True  # drop generations that copy private text (a whole example or a long n-gram)
    verbatim_ngram: int = 8  # words in a row that count as a copy
    # instructions mode (teacher side)
    instruction_shots: int = 8
    instruction_tokens: int = 160
    # voting (teacher side) and the balanced aggregator (server side)
    vote_examples: int = 8  # held-out examples (the silo's test split) each teacher scores candidates against
    diversity: float = 1.0  # balanced: weight of the similarity penalty (0 = consensus and label balance only)
    # optional DP examples (teacher side): Tang et al.'s DP few-shot generation, charged to the silo's ledger
    dp: str = "none"  # none | dp-fewshot
    epsilon: float = 4.0  # the ε asked of each teacher (at the silo's own δ, node config)
    dp_groups: int = 4
    dp_shots_per_group: int = 1
    dp_public_top_k: int = 100
    noise_seed: int = -1  # -1 = secret OS entropy; >= 0 only for reproducible tests
    # memorisation: a canary planted in every silo's training split (by the silos, for any method; see the audit)
    canaries: bool = False
    canary_kind: str = "digits"  # digits: "My PIN code is NNNN." | name: "My secret contact is FIRST LAST."
    canary_copies: int = 1  # copies per silo
    canary_candidates: int = 999  # comparison secrets it is ranked against
    # student (server side)
    max_test: int = 150  # global test examples the student answers per variant (0 = all)
    max_prompt_tokens: int = 2048  # student prompt tokens kept (cut from the left)

    def __post_init__(self) -> None:
        checks = (("mode", self.mode, MODES), ("conditioning", self.conditioning, CONDITIONINGS),
                  ("dp", self.dp, DP_MECHANISMS))
        for key, value, allowed in checks:
            if value not in allowed:
                raise ConfigError(f"social.{key}='{value}' is not one of: {', '.join(allowed)}.")
        for name in self.aggregator_names:
            get_aggregator(name)
        if not self.aggregator_names:
            raise ConfigError(f"social.aggregators is empty. Use a comma list of: {', '.join(AGGREGATORS)}.")
        if unknown := [b for b in self.baseline_names if b not in BASELINES]:
            raise ConfigError(f"social.baselines: unknown '{unknown[0]}'. Use a comma list of: {', '.join(BASELINES)}.")
        if min(self.num_examples, self.num_instructions, self.shots, self.samples, self.top_k, self.max_new_tokens,
               self.instruction_shots, self.instruction_tokens, self.vote_examples, self.max_example_chars) < 1:
            raise ConfigError("social sizes (num-examples, num-instructions, shots, samples, top-k, max-new-tokens, "
                              "instruction-shots, instruction-tokens, vote-examples, max-example-chars) must be >= 1.")
        if self.verbatim_ngram < 2 or self.max_test < 0 or self.diversity < 0 or self.max_prompt_tokens < 64:
            raise ConfigError("social.verbatim-ngram must be >= 2, max-test >= 0, diversity >= 0 and "
                              "max-prompt-tokens >= 64.")
        if not self.epsilon > 0:
            raise ConfigError("social.epsilon must be > 0 (inf = non-private).")
        if self.canary_kind not in TEMPLATES or self.canary_copies < 1 or self.canary_candidates < 1:
            raise ConfigError(f"social.canary-kind must be one of {', '.join(TEMPLATES)}; social.canary-copies and "
                              "social.canary-candidates >= 1.")
        if self.dp != "none" and self.mode != "examples":
            raise ConfigError(f"social.dp={self.dp} applies to examples mode only; set social.mode=examples.")

    @property
    def aggregator_names(self) -> list[str]:
        return [a.strip() for a in self.aggregators.split(",") if a.strip()]

    @property
    def baseline_names(self) -> list[str]:
        return [b.strip() for b in self.baselines.split(",") if b.strip()]

    @property
    def canary_setup(self) -> CanarySetup | None:
        return CanarySetup(self.canary_kind, self.canary_copies, self.canary_candidates) if self.canaries else None

    @property
    def keep(self) -> int:
        """How many candidates the student sees."""
        return self.num_examples if self.mode == "examples" else self.num_instructions


def social_options(cfg: ExperimentConfig) -> SocialConfig:
    return from_flat(SocialConfig, cfg.method_options, "social")


# ------------------------------------------------------------------ formats (teachers and student share them)


def example_block(text: str, label: str, max_chars: int, label_first: bool = False) -> str:
    text = " ".join(text.split())[:max_chars]
    return f"Label: {label}\nText: {text}" if label_first else f"Text: {text}\nLabel: {label}"


def examples_context(texts: Sequence[str], labels: Sequence[int], label_names: Sequence[str], max_chars: int) -> str:
    blocks = [example_block(t, label_names[y], max_chars) for t, y in zip(texts, labels)]
    return "Labelled examples:\n\n" + "\n\n".join(blocks) if blocks else ""


def instructions_context(instructions: Sequence[str]) -> str:
    return "Instructions:\n" + "\n\n".join(instructions) if instructions else ""


_LABEL_LINE = re.compile(r"^(?P<text>.*?)\s*\n\s*Label:\s*(?P<label>.+?)\s*$", re.S)


def parse_free_generation(output: str, label_names: Sequence[str]) -> tuple[str, int] | None:
    """(text, label id) from a free continuation 'TEXT\\nLabel: LABEL'; None when it does not have that shape or
    names no known label (case and trailing punctuation ignored)."""
    match = _LABEL_LINE.match(output.strip())
    if not match or not match["text"].strip():
        return None
    said = match["label"].split()[0].strip(".,;:!\"'").lower() if match["label"].split() else ""
    lowered = [name.lower() for name in label_names]
    return (match["text"].strip(), lowered.index(said)) if said in lowered else None


def perplexities(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: Sequence[str],
                 continuations: Sequence[str], batch_size: int = 8) -> list[float]:
    """exp(mean negative log-likelihood per token) of each continuation given its prompt."""
    scored = continuation_logprobs(model, tok, prompts, continuations, batch_size=batch_size)
    return [math.exp(-total / n) for total, n in scored]


def top_k_by_perplexity(values: Sequence[float], k: int) -> list[int]:
    """Indices of the k lowest perplexities, lowest first (ties: the earlier one)."""
    return sorted(range(len(values)), key=lambda i: (values[i], i))[:k]


# ------------------------------------------------------------------ teacher side (called by Silo)


@dataclass
class Lesson:
    """What one teacher sends: examples (texts + labels) or instructions (labels None), how they were made, what
    they cost in privacy, and counts."""

    texts: list[str]
    labels: list[int] | None
    provenance: dict
    privacy: dict
    metrics: dict[str, float]


NON_PRIVATE = {"mechanism": "none (non-private)", "epsilon": math.inf, "epsilon-total": math.inf, "delta": 0.0,
               "budget": math.inf, "noise-multiplier": 0.0, "steps": 0, "private": False}


def write_examples(model: PreTrainedModel, tok: PreTrainedTokenizerBase, label_names: Sequence[str],
                   private: Examples, cfg: SocialConfig, seed: int, detector: CopyDetector | None) -> Lesson:
    """Examples mode: few-shot prompts of n_gen private examples, sampled continuations, parsed, copies dropped,
    top-k by the teacher's own perplexity (given the prompt that produced each)."""
    rng, label_first = random.Random(seed), cfg.conditioning == "label"
    prompts, heads = [], []
    for i in range(cfg.samples):
        shots = rng.sample(range(len(private)), min(cfg.shots, len(private)))
        blocks = [example_block(private.texts[j], label_names[private.labels[j]], cfg.max_example_chars, label_first)
                  for j in shots]
        heads.append(i % len(label_names) if label_first else None)
        head = f"Label: {label_names[heads[-1]]}\nText:" if label_first else "Text:"
        prompts.append("\n\n".join([*blocks, head]))
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              stop=("\n",) if label_first else ("\n\n",), batch_size=8)
    outputs, stats = generate(model, tok, prompts, sampling, seed=seed, progress="teach")
    parsed, seen = [], set()
    for prompt, head, out in zip(prompts, heads, outputs):
        pair = (out.strip()[:cfg.max_example_chars], head) if label_first else parse_free_generation(out, label_names)
        if pair is None or not pair[0] or (key := (" ".join(pair[0].lower().split()), pair[1])) in seen:
            continue
        seen.add(key)
        parsed.append((prompt, *pair))
    fresh = [c for c in parsed if detector is None or not detector.copies(c[1])]
    continuations = [f" {t}" if label_first else f" {t}\nLabel: {label_names[y]}" for _, t, y in fresh]
    ppl = perplexities(model, tok, [c[0] for c in fresh], continuations) if fresh else []
    kept = top_k_by_perplexity(ppl, cfg.top_k)
    provenance = {"mode": "examples", "teacher": cfg.teacher, "shots": cfg.shots, "samples": cfg.samples,
                  "top-k": cfg.top_k, "temperature": cfg.temperature, "top-p": cfg.top_p,
                  "conditioning": cfg.conditioning, "selection": "lowest perplexity under the teacher's model, "
                  "given the prompt that produced it", "verbatim-filter": detector is not None,
                  "verbatim-ngram": cfg.verbatim_ngram, "perplexities": [ppl[i] for i in kept]}
    metrics = {"teach.generated": len(outputs), "teach.parsed": len(parsed), "teach.copies-dropped":
               len(parsed) - len(fresh), "teach.kept": len(kept), "teach.seconds": stats.seconds,
               "teach.tokens-generated": stats.generated_tokens}
    return Lesson([fresh[i][1] for i in kept], [fresh[i][2] for i in kept], provenance, dict(NON_PRIVATE), metrics)


def public_top_k(model: PreTrainedModel, tok: PreTrainedTokenizerBase, label_names: Sequence[str],
                 examples: Sequence[tuple[str, int]], k: int) -> tuple[list[int], list[float]]:
    """The k DP examples of lowest perplexity given the data-free prompt 'Label: y\nText:' (post-processing of
    the DP release: no private data is read, so the selection costs no privacy). Returns indices and perplexities."""
    if not examples:
        return [], []
    ppl = perplexities(model, tok, [f"Label: {label_names[y]}\nText:" for _, y in examples],
                       [f" {t}" for t, _ in examples])
    kept = top_k_by_perplexity(ppl, k)
    return kept, [ppl[i] for i in kept]


def instruction_prompt(description: str, label_names: Sequence[str], blocks: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "user", "content":
             f"Here are {len(blocks)} labelled examples of a task. Each {description} gets one label out of: "
             f"{', '.join(label_names)}.\n\n" + "\n\n".join(blocks) + "\n\n"
             f"Write instructions for someone who will never see these examples, so that they can label a new "
             f"{description} correctly: describe the task, what each label means, and the patterns that decide "
             "between them. Do not copy the examples. Reply with the instructions only."}]


def write_instruction(model: PreTrainedModel, tok: PreTrainedTokenizerBase, description: str,
                      label_names: Sequence[str], private: Examples, cfg: SocialConfig, seed: int,
                      detector: CopyDetector | None) -> Lesson:
    """Instructions mode: one task description from ``instruction_shots`` private examples; lines that copy
    private text are removed (verbatim filter)."""
    rng = random.Random(seed)
    shots = rng.sample(range(len(private)), min(cfg.instruction_shots, len(private)))
    blocks = [example_block(private.texts[j], label_names[private.labels[j]], cfg.max_example_chars) for j in shots]
    sampling = SamplingConfig(max_new_tokens=cfg.instruction_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              batch_size=1)
    [output], stats = generate(model, tok, [instruction_prompt(description, label_names, blocks)], sampling, seed=seed)
    lines = output.splitlines()
    kept = [line for line in lines if detector is None or not detector.copies(line)]
    text = "\n".join(kept).strip()
    provenance = {"mode": "instructions", "teacher": cfg.teacher, "shots": len(shots),
                  "temperature": cfg.temperature, "top-p": cfg.top_p, "max-new-tokens": cfg.instruction_tokens,
                  "verbatim-filter": detector is not None, "verbatim-ngram": cfg.verbatim_ngram}
    metrics = {"teach.generated": 1, "teach.lines-dropped": len(lines) - len(kept), "teach.kept": int(bool(text)),
               "teach.seconds": stats.seconds, "teach.tokens-generated": stats.generated_tokens}
    return Lesson([text] if text else [], None, provenance, dict(NON_PRIVATE), metrics)


def vote_scores(model: PreTrainedModel, tok: PreTrainedTokenizerBase, label_names: Sequence[str], held_out: Examples,
                mode: str, texts: Sequence[str], labels: Sequence[int] | None, max_chars: int) -> list[float]:
    """A teacher's length-normalised log-likelihood (per token) of each candidate, against its held-out examples.

    examples      the candidate as a continuation of the held-out examples (one prompt: its KV cache is reused);
    instructions  the held-out examples as continuations of the instruction, averaged.
    """
    held = [example_block(t, label_names[y], max_chars) for t, y in zip(held_out.texts, held_out.labels)]
    if mode == "examples":
        candidates = [example_block(t, label_names[y], max_chars) for t, y in zip(texts, labels or ())]
        scored = continuation_logprobs_shared(model, tok, "\n\n".join(held) + "\n\n", candidates)
        return [total / n for total, n in scored]
    out = []
    for instruction in texts:
        scored = continuation_logprobs_shared(model, tok, instructions_context([instruction]) + "\n\n", held)
        out.append(float(np.mean([total / n for total, n in scored])))
    return out


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
            student, tok = load_llm(self.cfg.llm.model)
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
                                     lambda v=v: self._evaluate(student, tok, session, test, v.context))
                       for v in variants}
            if "raw" in opts.baseline_names:
                results[f"{opts.mode}:raw"] = _once(session, f"eval/{opts.mode}:raw", lambda: self._evaluate_raw(
                    student, tok, session, test, candidates))
        if opts.canary_setup is not None:
            canary = opts.canary_setup.canary(self.cfg.seed)
            with session.phase("canary"):
                for v in variants:
                    if v.context:  # the student prompt of this variant, as the canary's context
                        results[v.name] |= _once(session, f"canary/{v.name}", lambda v=v: canary_report(
                            student, tok, v.context + "\n\n", *canary))
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
        for node, lesson in session.iter_replies(p.TEACH, request, round_=1, parse=parse,
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
            session.event(node, "processed", p.TEACH, 1)
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
        for node, scores in session.iter_replies(p.VOTE, request, round_=2, parse=parse):
            rows[session.silos[node]] = scores
            session.event(node, "processed", p.VOTE, 2)
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
        for node, raw in session.iter_replies(p.SHARE_RAW, {n: p.request({"n": per_silo}) for n in session.silos},
                                              round_=3, parse=parse, max_bytes=p.MAX_EXAMPLES_REPLY_BYTES):
            session.save_contribution(node, RAW_KIND, 3, raw)
            texts += raw.texts
            labels += raw.labels
        order = random.Random(self.cfg.seed).sample(range(len(texts)), min(opts.num_examples, len(texts)))
        return Examples.of([texts[i] for i in order], [labels[i] for i in order])

    # -------------------------------------------------------------- student

    def _evaluate(self, student: PreTrainedModel, tok: PreTrainedTokenizerBase, session: Session, test: Examples,
                  context: str) -> dict[str, float]:
        task = session.task
        probs = label_probabilities(student, tok, test.texts, task.labels, task.instruction,
                                    batch_size=self.cfg.llm.batch_size, max_tokens=self.options.max_prompt_tokens,
                                    progress="student", context=context, calibrate=self.cfg.llm.calibrate)
        session.record.tokens["prompt"] += sum(
            len(prompt_ids(tok, classification_prompt(task.instruction, t, task.labels, context=context)))
            for t in test.texts)
        return classification_metrics(test.labels, probs)

    def _evaluate_raw(self, student, tok, session: Session, test: Examples, candidates: list[Candidate]) -> dict:
        """Each teacher's own contribution alone (its top n) as the student's context, averaged over teachers."""
        per_teacher = []
        for teacher in sorted({c.teacher for c in candidates}):
            own = [c for c in candidates if c.teacher == teacher][:self.options.keep]
            per_teacher.append(self._evaluate(student, tok, session, test, self._context(own, session.task.labels)))
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


def lesson_records(lesson: Lesson) -> dict[str, ConfigRecord]:
    """The records of a ``query.teach`` reply (see ``fedbridge.protocol``)."""
    payload = ({p.EXAMPLES: p.examples_record(Examples.of(lesson.texts, lesson.labels))} if lesson.labels is not None
               else {p.INSTRUCTIONS: p.texts_record(lesson.texts)})
    return {**payload, p.PROVENANCE: ConfigRecord(lesson.provenance), p.PRIVACY: ConfigRecord(lesson.privacy)}

