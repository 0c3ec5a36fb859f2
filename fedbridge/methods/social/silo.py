"""Social Learning's silo side: the silo as a teacher (its lessons, its votes, and the non-private raw-examples
baseline), every release through the silo's own policy and ledger."""

from __future__ import annotations

import dataclasses
import math
import random

from fedbridge.config import from_flat
from fedbridge.errors import ConfigError
from fedbridge.methods.social.config import SocialConfig
from fedbridge.methods.social.teaching import Lesson, public_top_k, vote_scores, write_examples, write_instruction
from fedbridge.models.llm import load_silo_llm
from fedbridge.privacy import DPFewShotConfig, SynthesisResult, dp_fewshot_synthesize
from fedbridge.privacy.canaries import CopyDetector
from fedbridge.privacy.dp_fewshot import sigma_for_epsilon
from fedbridge.privacy.policy import RunLedger
from fedbridge.silo import Silo
from fedbridge.tasks import Examples, load_task


def teach(silo: Silo, mode: str, experiment: str = "") -> Lesson:
    """Synthetic examples or instructions written by the teacher LM from the private training split; copies of
    private text are filtered out (``SiloPolicy.verbatim``). Without DP this is a non-private release, which
    the silo's policy must allow."""
    cfg = from_flat(SocialConfig, silo.cfg.method_options, "social")
    seed = silo.cfg.seed * 1000 + silo.index
    if cfg.dp == "dp-fewshot":
        return _teach_dp(silo, cfg, experiment)
    privacy = silo.non_private_release(f"Social Learning {mode}", experiment)
    detector = (CopyDetector([*silo.data.train.texts, *silo.data.test.texts], cfg.verbatim_ngram)
                if silo.policy.verbatim(cfg.verbatim_filter) else None)
    teacher = load_silo_llm(silo.cfg.llm, cfg.teacher, silo.device)
    if mode == "instructions":
        description = load_task(silo.cfg.task, silo.cfg.seed).description
        lesson = write_instruction(teacher, description, silo.labels, silo.data.train, cfg, seed, detector)
    else:
        lesson = write_examples(teacher, silo.labels, silo.data.train, cfg, seed, detector)
    return dataclasses.replace(lesson, privacy=privacy)


def _teach_dp(silo: Silo, cfg: SocialConfig, experiment: str) -> Lesson:
    """Examples by DP few-shot generation (charged to this silo's ledger), then the top-k by perplexity given the
    data-free prompt (post-processing). No verbatim filter: reading private data to filter would not be. The
    synthesis runs on the teacher's exact path (its DP analysis assumes full next-token distributions); the top-k
    asks the teacher."""
    texts, labels = list(silo.data.train.texts), list(silo.data.train.labels)
    teacher = load_silo_llm(silo.cfg.llm, cfg.teacher, silo.device)
    model, tok = teacher.exact()

    def release(ledger: RunLedger, noise_seed: int | None) -> SynthesisResult:
        mech = DPFewShotConfig(num_groups=cfg.dp_groups, shots_per_group=cfg.dp_shots_per_group,
                               max_tokens=cfg.max_new_tokens, public_top_k=cfg.dp_public_top_k,
                               num_per_label=math.ceil(cfg.samples / len(silo.labels)), noise_seed=noise_seed,
                               max_text_chars=cfg.max_example_chars, sigma=0.0, count_bound=silo.count_bound())
        sigma = sigma_for_epsilon(min(cfg.epsilon, ledger.remaining()), ledger.delta, labels, len(silo.labels),
                                  mech)
        return dp_fewshot_synthesize(model, tok, texts, labels, silo.labels,
                                     dataclasses.replace(mech, sigma=sigma), ledger)

    result, privacy = silo.dp_release("Social Learning examples", cfg.epsilon, cfg.noise_seed, experiment,
                                      release)
    kept, ppl = public_top_k(teacher, silo.labels, result.examples, cfg.top_k)
    provenance = {"mode": "examples", "teacher": cfg.teacher, "dp": cfg.dp, "dp-groups": cfg.dp_groups,
                  "dp-shots-per-group": cfg.dp_shots_per_group, "samples": len(result.examples),
                  "top-k": cfg.top_k, "conditioning": "label", "selection": "lowest perplexity given the "
                  "data-free prompt", "verbatim-filter": False, "perplexities": ppl}
    metrics = {"teach.generated": len(result.examples), "teach.kept": len(kept),
               "teach.seconds": sum(result.seconds.values()),
               "teach.tokens-generated": result.tokens.get("generated", 0)}
    return Lesson([result.examples[i][0] for i in kept], [result.examples[i][1] for i in kept], provenance,
                  privacy, metrics)


def vote(silo: Silo, mode: str, texts: list[str], labels: list[int] | None, experiment: str = "") -> list[float]:
    """The teacher's length-normalised log-likelihood of each candidate against its held-out examples (a seeded
    sample of its test split, which no teaching prompt ever showed). Votes are not DP: a non-private release."""
    cfg = from_flat(SocialConfig, silo.cfg.method_options, "social")
    if not len(silo.data.test):
        raise ConfigError(f"{silo.name} has no held-out (test) examples to vote with; raise "
                          "task.silo-test-fraction or drop the voting aggregators.")
    silo.non_private_release("Social Learning votes", experiment)
    rng = random.Random(f"vote/{silo.cfg.seed}/{silo.index}")  # a stream of its own, not the teaching draws
    held = rng.sample(range(len(silo.data.test)), min(cfg.vote_examples, len(silo.data.test)))
    teacher = load_silo_llm(silo.cfg.llm, cfg.teacher, silo.device)
    return vote_scores(teacher, silo.labels, Examples.of([silo.data.test.texts[i] for i in held],
                                                         [silo.data.test.labels[i] for i in held]),
                       mode, texts, labels, cfg.max_example_chars)


def share_raw(silo: Silo, n: int, experiment: str = "") -> tuple[Examples, dict]:
    """Social Learning's NON-PRIVATE upper bound: n raw training examples. Refused unless the run asks for the
    'original' baseline (social.baselines) and the silo's policy allows non-private releases."""
    cfg = from_flat(SocialConfig, silo.cfg.method_options, "social")
    if "original" not in cfg.baseline_names:
        raise ConfigError(f"{silo.name} refuses to share raw examples: the run did not ask for the non-private "
                          "'original' baseline (social.baselines).")
    privacy = silo.non_private_release("raw examples", experiment)
    rng = random.Random(f"share-raw/{silo.cfg.seed}/{silo.index}")
    picked = rng.sample(range(len(silo.data.train)), min(n, len(silo.data.train)))
    raw = Examples.of([silo.data.train.texts[i] for i in picked], [silo.data.train.labels[i] for i in picked])
    return raw, privacy
