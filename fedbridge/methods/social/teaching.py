"""Social Learning's shared formats and the teacher's side: what a silo writes and how the student reads it."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import ConfigRecord

from fedbridge import protocol as p
from fedbridge.methods.social.config import SocialConfig
from fedbridge.models.generation import SamplingConfig
from fedbridge.models.llm import LLM
from fedbridge.privacy.canaries import CopyDetector
from fedbridge.tasks import Examples

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


def perplexities(llm: LLM, prompts: Sequence[str], continuations: Sequence[str], batch_size: int = 8) -> list[float]:
    """exp(mean negative log-likelihood per token) of each continuation given its prompt, under ``llm``."""
    scored = llm.continuation_logprobs(prompts, continuations, batch_size=batch_size)
    return [math.exp(-total / n) for total, n in scored]


def top_k_by_perplexity(values: Sequence[float], k: int) -> list[int]:
    """Indices of the k lowest perplexities, lowest first (ties: the earlier one)."""
    return sorted(range(len(values)), key=lambda i: (values[i], i))[:k]


# ------------------------------------------------------------------ teacher side (called by Silo)
# The teacher is the silo's LLM interface (``models/llm.py:load_silo_llm``): it writes and scores through it.


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


def write_examples(llm: LLM, label_names: Sequence[str], private: Examples, cfg: SocialConfig, seed: int,
                   detector: CopyDetector | None) -> Lesson:
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
    outputs, stats = llm.generate(prompts, sampling, seed=seed, progress="teach")
    parsed, seen = [], set()
    for prompt, head, out in zip(prompts, heads, outputs):
        pair = (out.strip()[:cfg.max_example_chars], head) if label_first else parse_free_generation(out, label_names)
        if pair is None or not pair[0] or (key := (" ".join(pair[0].lower().split()), pair[1])) in seen:
            continue
        seen.add(key)
        parsed.append((prompt, *pair))
    fresh = [c for c in parsed if detector is None or not detector.copies(c[1])]
    continuations = [f" {t}" if label_first else f" {t}\nLabel: {label_names[y]}" for _, t, y in fresh]
    ppl = perplexities(llm, [c[0] for c in fresh], continuations) if fresh else []
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


def public_top_k(llm: LLM, label_names: Sequence[str], examples: Sequence[tuple[str, int]], k: int
                 ) -> tuple[list[int], list[float]]:
    """The k DP examples of lowest perplexity given the data-free prompt 'Label: y\nText:' (post-processing of
    the DP release: no private data is read, so the selection costs no privacy). Returns indices and perplexities."""
    if not examples:
        return [], []
    ppl = perplexities(llm, [f"Label: {label_names[y]}\nText:" for _, y in examples],
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


def write_instruction(llm: LLM, description: str, label_names: Sequence[str], private: Examples, cfg: SocialConfig,
                      seed: int, detector: CopyDetector | None) -> Lesson:
    """Instructions mode: one task description from ``instruction_shots`` private examples; lines that copy
    private text are removed (verbatim filter)."""
    rng = random.Random(seed)
    shots = rng.sample(range(len(private)), min(cfg.instruction_shots, len(private)))
    blocks = [example_block(private.texts[j], label_names[private.labels[j]], cfg.max_example_chars) for j in shots]
    sampling = SamplingConfig(max_new_tokens=cfg.instruction_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              batch_size=1)
    [output], stats = llm.generate([instruction_prompt(description, label_names, blocks)], sampling, seed=seed)
    lines = output.splitlines()
    kept = [line for line in lines if detector is None or not detector.copies(line)]
    text = "\n".join(kept).strip()
    provenance = {"mode": "instructions", "teacher": cfg.teacher, "shots": len(shots),
                  "temperature": cfg.temperature, "top-p": cfg.top_p, "max-new-tokens": cfg.instruction_tokens,
                  "verbatim-filter": detector is not None, "verbatim-ngram": cfg.verbatim_ngram}
    metrics = {"teach.generated": 1, "teach.lines-dropped": len(lines) - len(kept), "teach.kept": int(bool(text)),
               "teach.seconds": stats.seconds, "teach.tokens-generated": stats.generated_tokens}
    return Lesson([text] if text else [], None, provenance, dict(NON_PRIVATE), metrics)


def vote_scores(llm: LLM, label_names: Sequence[str], held_out: Examples, mode: str, texts: Sequence[str],
                labels: Sequence[int] | None, max_chars: int) -> list[float]:
    """A teacher's length-normalised log-likelihood (per token) of each candidate, against its held-out examples.

    examples      the candidate as a continuation of the held-out examples (one prompt: its KV cache is reused);
    instructions  the held-out examples as continuations of the instruction, averaged.
    """
    held = [example_block(t, label_names[y], max_chars) for t, y in zip(held_out.texts, held_out.labels)]
    if mode == "examples":
        candidates = [example_block(t, label_names[y], max_chars) for t, y in zip(texts, labels or ())]
        scored = llm.continuation_logprobs_shared("\n\n".join(held) + "\n\n", candidates)
        return [total / n for total, n in scored]
    out = []
    for instruction in texts:
        scored = llm.continuation_logprobs_shared(instructions_context([instruction]) + "\n\n", held)
        out.append(float(np.mean([total / n for total, n in scored])))
    return out




def lesson_records(lesson: Lesson) -> dict[str, ConfigRecord]:
    """The records of a ``query.teach`` reply (see ``fedbridge.protocol``)."""
    payload = ({p.EXAMPLES: p.examples_record(Examples.of(lesson.texts, lesson.labels))} if lesson.labels is not None
               else {p.INSTRUCTIONS: p.texts_record(lesson.texts)})
    return {**payload, p.PROVENANCE: ConfigRecord(lesson.provenance), p.PRIVACY: ConfigRecord(lesson.privacy)}
