"""A silo: its private data, its SLM, and what it does with them. The ClientApp handlers only translate messages.

Where the data comes from:
  simulation  ``node_config["partition-id"]`` selects one partition of the configured task;
  deployment  ``node_config["data-path"]`` (plus optional ``text-column``/``label-column``) is the silo's own file.
State that must outlive a run (the privacy ledger of each experiment, CrossLM's latest SLM) lives in
``node_config["state-dir"]``
(default ``~/.cache/fedbridge/silo-state``), on the silo's own disk.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedbridge.checkpoint import DEFAULT_SILO_STATE_DIR, atomic_write, save_tensors
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import ConfigError
from fedbridge.models.loading import load_llm, load_slm
from fedbridge.models.llm_classifier import label_probabilities
from fedbridge.models.slm import SLM, TrainStats, predict_proba, train_classifier, validation_split
from fedbridge.privacy import (
    DPFewShotConfig,
    DPSGDConfig,
    PrivacyEvent,
    SynthesisResult,
    dp_fewshot_synthesize,
    dp_sgd_synthesize,
)
from fedbridge.privacy.audit import plant_canaries
from fedbridge.privacy.canaries import CopyDetector
from fedbridge.privacy.dp_fewshot import sigma_for_epsilon
from fedbridge.privacy.policy import RunLedger, SiloLedger, SiloPolicy, data_identity
from fedbridge.protocol import ProtocolError
from fedbridge.strategies.fdkt import FDKTConfig
from fedbridge.strategies.social import (
    Lesson,
    SocialConfig,
    public_top_k,
    social_options,
    vote_scores,
    write_examples,
    write_instruction,
)
from fedbridge.tasks import Examples, SiloData, classification_metrics, load_federation, load_task, silo_from_file
from fedbridge.tasks.task import BUILTIN_TASKS


@dataclass(frozen=True)
class Silo:
    index: int
    cfg: ExperimentConfig
    labels: tuple[str, ...]
    data: SiloData
    state_dir: Path = DEFAULT_SILO_STATE_DIR  # node config 'state-dir': state that outlives a run
    policy: SiloPolicy = SiloPolicy()  # node config: what this silo lets leave (fedbridge.privacy.policy)

    @property
    def name(self) -> str:
        return f"silo-{self.index}"

    @classmethod
    def from_context(cls, context: Context) -> Silo:
        return _silo(tuple(sorted(context.run_config.items())), tuple(sorted(context.node_config.items())))

    # ------------------------------------------------------------ SLM

    def new_slm(self, weights: Mapping[str, torch.Tensor] | None = None) -> SLM:
        """This silo's SLM: fresh for training, or with ``weights`` (its ``trainable_state()``). Its token length is
        fitted to the silo's own training texts, so every SLM the silo builds (kept, reloaded, enhanced) reads
        texts the same way."""
        model = load_slm(self.cfg.slm.spec_for(self.index), len(self.labels), self.cfg.seed + self.index, weights,
                         self.cfg.slm)
        model.fit_max_length(self.data.train.texts)
        return model

    def slm_from_arrays(self, arrays: ArrayRecord) -> SLM:
        return self.new_slm(arrays.to_torch_state_dict())

    @functools.cached_property
    def private_split(self) -> tuple[Examples, Examples]:
        """The private training split as (fit, validation): the validation part only chooses the epoch to keep
        (early stopping), so no synthetic example and no test example ever decides it."""
        train = self.data.train
        fit, val = validation_split(train.labels, self.cfg.slm.validation_fraction, self.cfg.seed + self.index)
        return (Examples.of([train.texts[i] for i in fit], [train.labels[i] for i in fit]),
                Examples.of([train.texts[i] for i in val], [train.labels[i] for i in val]))

    def train_slm(self, model: SLM, epochs: int | None = None, extra: Examples | None = None,
                  extra_weight: float = 1.0, private: bool = True, soft: np.ndarray | None = None,
                  seed: int = 0, progress: str = "train") -> TrainStats:
        """Train on the private fit split (``private``) plus optional extra (e.g. synthetic) examples with their
        loss weight, and hard labels or ``soft`` targets for the extra ones. ``epochs=None``: the SLM's own recipe,
        the epoch chosen on the private validation split; a number: exactly that many epochs on all private data
        (FedAvg's local epochs)."""
        fit, val = self.private_split if epochs is None else (self.data.train, Examples.of([], []))
        own = fit if private else Examples.of([], [])
        texts, weights = [*own.texts, *(extra.texts if extra else ())], [1.0] * len(own) + [extra_weight] * len(extra or ())
        targets = list(own.labels) + list(extra.labels if extra else ())
        if soft is not None:
            targets = np.concatenate([np.eye(len(self.labels))[list(own.labels)].reshape(-1, len(self.labels)), soft])
        options = self.cfg.slm.options() if epochs is None else self.cfg.slm.options(epochs=epochs)
        return train_classifier(model, texts, targets, options, weights, seed=self.cfg.seed + self.index + seed,
                                progress=f"{self.name} {progress}",
                                validation=(val.texts, val.labels) if len(val) else None)

    def evaluate_slm(self, model: SLM, global_test: Examples | None = None) -> dict[str, float]:
        splits = {"silo-test": self.data.test, **({"global-test": global_test} if global_test is not None else {})}
        out: dict[str, float] = {}
        for split, ex in splits.items():
            probs = predict_proba(model, ex.texts)
            out.update({f"{split}.{k}": v for k, v in classification_metrics(ex.labels, probs).items()})
        return out

    # ------------------------------------------------------------ LLM

    def evaluate_llm(self) -> dict[str, float]:
        """The public LLM, run inside the silo on the silo's own test split (no data leaves)."""
        model, tok = load_llm(self.cfg.llm.model)
        task = load_task(self.cfg.task, self.cfg.seed)
        t0 = time.perf_counter()
        probs = label_probabilities(model, tok, self.data.test.texts, self.labels, task.instruction,
                                    batch_size=self.cfg.llm.batch_size, max_tokens=self.cfg.llm.max_length,
                                    progress=f"{self.name} llm", calibrate=self.cfg.llm.calibrate)
        metrics = {f"silo-test.{k}": v for k, v in classification_metrics(self.data.test.labels, probs).items()}
        return {**metrics, "llm.seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------ FDKT contribution

    @functools.cached_property
    def data_id(self) -> str:
        """The identity of this silo's data (a content hash): its lifetime privacy ledger's name."""
        return data_identity([*self.data.train.texts, *self.data.test.texts],
                             [*self.data.train.labels, *self.data.test.labels])

    def run_ledger(self, run_budget: float, experiment: str = "") -> RunLedger:
        """This run's view of the silo's lifetime ledger (a file in ``state_dir``, per data identity): every charge
        is composed with every earlier release of this data, whichever run, experiment or method made it."""
        return RunLedger(SiloLedger(self.state_dir / "privacy" / f"{self.data_id}.json", self.policy), experiment,
                         run_budget)

    def dp_release(self, what: str, run_budget: float, requested_seed: int, experiment: str,
                   release: Callable[[RunLedger, int | None], SynthesisResult]) -> tuple[SynthesisResult, dict]:
        """Every DP release of this silo goes through here: the silo's policy decides whether a non-private (ε = ∞)
        release or a server-chosen noise seed is allowed, the run's ledger view refuses when nothing is left, and
        ``release(ledger, noise_seed)`` calibrates, charges and runs the mechanism. Returns its result and the
        privacy record that leaves with it (whatever was charged stays charged, also when the mechanism fails)."""
        if math.isinf(run_budget):
            self.policy.require_non_private(self.name, f"{what} without DP (epsilon=inf)")
        seed, private = self.policy.noise_seed_for(self.name, requested_seed)
        ledger = self.run_ledger(run_budget, experiment)
        ledger.check_can_release(self.name)
        result = release(ledger, None if seed is None else seed + self.index)
        mechanism = result.mechanism if private else f"{result.mechanism} with a server-chosen noise seed (non-private)"
        return result, ledger.record(mechanism, result.epsilon, result.noise_multiplier, result.steps, private)

    def non_private_release(self, what: str, experiment: str = "") -> dict:
        """A release without DP (SLM weights, scores, votes, raw examples, non-DP teaching): allowed only by the
        silo's policy, and recorded in its lifetime ledger (after it, no finite ε holds for this data)."""
        self.policy.require_non_private(self.name, what)
        ledger = self.run_ledger(math.inf, experiment)
        if not any(e.mechanism == what for e in ledger.events):  # once per run and kind
            ledger.charge(PrivacyEvent(0.0, 1.0, 1, what))
        return ledger.record(f"{what} (non-private)", math.inf, 0.0, 0, private=False)

    def count_bound(self, per_label: bool = True) -> int:
        """The public bound that sets a mechanism's sampling rate: the silo's declared ``count-bound`` (per label;
        x labels for the whole set); without one, 0 (the exact counts) if non-private details may leave, else the
        smallest count that gives q = 1 (nothing about the counts is used)."""
        if self.policy.count_bound:
            return self.policy.count_bound * (1 if per_label else len(self.labels))
        return 0 if self.policy.allow_non_private else 1

    def synthesize(self, experiment: str = "") -> tuple[Examples, dict, dict[str, float]]:
        """DP synthetic demonstrations of the private training split: (examples, privacy cost, metrics)."""
        cfg = from_flat(FDKTConfig, self.cfg.method_options, "fdkt")
        texts, labels = list(self.data.train.texts), list(self.data.train.labels)

        def release(ledger: RunLedger, noise_seed: int | None) -> SynthesisResult:
            budget = min(cfg.epsilon, ledger.remaining())
            if cfg.mechanism == "dp-sgd":
                model, tok = load_llm(cfg.generator, trainable=True)
                mech = DPSGDConfig(target_epsilon=budget, max_grad_norm=cfg.clip, epochs=cfg.sgd_epochs,
                                   batch_size=cfg.sgd_batch_size, lr=cfg.sgd_lr, num_per_label=cfg.num_per_label,
                                   min_words=cfg.min_words, noise_seed=noise_seed, max_length=cfg.sgd_max_length,
                                   size_bound=self.count_bound(per_label=False))
                return dp_sgd_synthesize(model, tok, texts, labels, self.labels, mech, ledger,
                                         self.cfg.seed + self.index)
            model, tok = load_llm(cfg.generator)
            mech = DPFewShotConfig(num_groups=cfg.groups, shots_per_group=cfg.shots_per_group,
                                   max_tokens=cfg.max_tokens, public_top_k=cfg.public_top_k,
                                   num_per_label=cfg.num_per_label, min_words=cfg.min_words, noise_seed=noise_seed,
                                   max_text_chars=cfg.max_text_chars, sigma=0.0, count_bound=self.count_bound())
            sigma = sigma_for_epsilon(budget, ledger.delta, labels, len(self.labels), mech)
            return dp_fewshot_synthesize(model, tok, texts, labels, self.labels,
                                         dataclasses.replace(mech, sigma=sigma), ledger)

        result, privacy = self.dp_release("FDKT demonstrations", cfg.epsilon, cfg.noise_seed, experiment, release)
        metrics = {"synth.examples": len(result.examples),
                   **{f"synth.seconds-{k}": v for k, v in result.seconds.items()},
                   **{f"synth.tokens-{k}": v for k, v in result.tokens.items()}}
        return Examples.of([t for t, _ in result.examples], [y for _, y in result.examples]), privacy, metrics

    # ------------------------------------------------------------ CrossLM: one SLM kept across messages
    # The SLM after round r (0 = trained on private data) lives in the node's Flower state and, under the server's
    # experiment id, on the silo's disk too: a restarted server is a new Flower run with empty node state, and its
    # resumed run asks for the SLM of the round it had reached. The disk also remembers each finished round's
    # metrics, so a request the earlier run already completed is answered again, never trained twice.

    def _crosslm_meta(self, experiment: str) -> tuple[Path, dict]:
        """The silo's CrossLM file for this experiment and its content: the latest round and each round's metrics."""
        path = self.state_dir / experiment / f"{self.name}-crosslm.json"
        return path, json.loads(path.read_text()) if path.exists() else {"round": None, "metrics": {}}

    def _crosslm_weights(self, experiment: str, round_: int) -> Path:
        return self.state_dir / experiment / f"{self.name}-crosslm-slm-round-{round_}.safetensors"

    def crosslm_done(self, experiment: str, round_: int) -> dict[str, float] | None:
        """The metrics of ``round_`` if this silo finished it for this experiment already (a resumed server)."""
        return self._crosslm_meta(experiment)[1]["metrics"].get(str(round_)) if experiment else None

    def kept_slm(self, state: RecordDict, round_: int | None = None, experiment: str = "") -> SLM:
        """The SLM as it was after ``round_`` (None: the latest), from the node state or the silo's disk."""
        if KEPT_SLM in state and (round_ is None or state[KEPT_ROUND]["round"] == round_):
            return self.slm_from_arrays(state[KEPT_SLM])
        if experiment:
            latest = self._crosslm_meta(experiment)[1]["round"]
            weights = self._crosslm_weights(experiment, latest)
            if latest is not None and round_ in (None, latest) and weights.exists():
                return self.new_slm(safetensors.torch.load_file(weights))
        wanted = "a trained SLM" if round_ is None else f"its SLM after round {round_}"
        raise ProtocolError(f"{self.name} does not have {wanted}: the server must send train.private first, or "
                            "resume with the same experiment and the silo's same state-dir.")

    def keep_slm(self, state: RecordDict, model: SLM, round_: int = 0, experiment: str = "",
                 metrics: dict[str, float] | None = None, final: bool = False) -> None:
        """Keep the SLM (what its mode trains) after ``round_`` for later messages; with an experiment id also on
        disk, with the round's metrics. The weights file is written before the JSON that points to it, and the
        previous round's removed after, so a crash at any point leaves a consistent pair. After the ``final`` round
        only the metrics stay."""
        weights = model.trainable_state()
        state[KEPT_SLM] = ArrayRecord(weights)
        state[KEPT_ROUND] = ConfigRecord({"round": round_})
        if not experiment:
            return
        path, stored = self._crosslm_meta(experiment)
        if not final:
            save_tensors(self._crosslm_weights(experiment, round_), weights)
        atomic_write(path, json.dumps({"round": round_, "metrics": {**stored["metrics"], str(round_): metrics or {}}}))
        stale = [stored["round"]] if stored["round"] not in (None, round_) else []
        for old in stale + ([round_] if final else []):
            self._crosslm_weights(experiment, old).unlink(missing_ok=True)

    def train_private(self, state: RecordDict, global_test: Examples | None, experiment: str = "") -> dict[str, float]:
        """Train a fresh SLM on the private split, keep it for later messages, and evaluate it."""
        if (done := self.crosslm_done(experiment, 0)) is not None:
            return done
        model = self.new_slm()
        stats = self.train_slm(model)
        metrics = {**self.evaluate_slm(model, global_test), **self.info(), **train_metrics(stats)}
        self.keep_slm(state, model, 0, experiment, metrics)
        return metrics

    def score(self, state: RecordDict, texts: tuple[str, ...], round_: int | None = None,
              experiment: str = "") -> np.ndarray:
        """Class probabilities of the server's texts, shape (len(texts), num_labels), by the SLM after ``round_``."""
        return predict_proba(self.kept_slm(state, round_, experiment), texts)

    def enhance(self, state: RecordDict, examples: Examples, targets: np.ndarray | None, epochs: int, weight: float,
                with_private: bool, global_test: Examples | None, round_: int = 1, experiment: str = "",
                final: bool = False) -> dict[str, float]:
        """Round ``round_``: fine-tune the SLM of the round before on the server's selected examples (hard labels,
        or soft ``targets`` to distil), optionally with the private split again, keep it, and evaluate it.
        ``epochs=0``: the SLM's own recipe, the epoch chosen on the private validation split."""
        if (done := self.crosslm_done(experiment, round_)) is not None:
            return done
        model = self.kept_slm(state, round_ - 1, experiment)
        seen = 0
        if len(examples) or with_private:
            stats = self.train_slm(model, epochs or None, examples, weight, private=with_private, soft=targets,
                                   seed=1000 * round_, progress="enhance")
            seen = stats.examples
        metrics = {**self.evaluate_slm(model, global_test), **self.info(), "train.examples": seen,
                   "train.synthetic": len(examples)}
        self.keep_slm(state, model, round_, experiment, metrics, final)
        return metrics

    def install_slm(self, state: RecordDict, arrays: ArrayRecord, global_test: Examples | None, round_: int = 1,
                    experiment: str = "", final: bool = False) -> dict[str, float]:
        """Keep SLM weights the server enhanced in round ``round_`` (score-on=server), and evaluate them."""
        if (done := self.crosslm_done(experiment, round_)) is not None:
            return done
        model = self.slm_from_arrays(arrays)
        metrics = {**self.evaluate_slm(model, global_test), **self.info()}
        self.keep_slm(state, model, round_, experiment, metrics, final)
        return metrics

    # ------------------------------------------------------------ Social Learning: the silo as a teacher

    def teach(self, mode: str, experiment: str = "") -> Lesson:
        """Synthetic examples or instructions written by the teacher LM from the private training split; copies of
        private text are filtered out (``SiloPolicy.verbatim``). Without DP this is a non-private release, which
        the silo's policy must allow."""
        cfg = from_flat(SocialConfig, self.cfg.method_options, "social")
        seed = self.cfg.seed * 1000 + self.index
        if cfg.dp == "dp-fewshot":
            return self._teach_dp(cfg, experiment)
        privacy = self.non_private_release(f"Social Learning {mode}", experiment)
        detector = (CopyDetector([*self.data.train.texts, *self.data.test.texts], cfg.verbatim_ngram)
                    if self.policy.verbatim(cfg.verbatim_filter) else None)
        model, tok = load_llm(cfg.teacher)
        if mode == "instructions":
            description = load_task(self.cfg.task, self.cfg.seed).description
            lesson = write_instruction(model, tok, description, self.labels, self.data.train, cfg, seed, detector)
        else:
            lesson = write_examples(model, tok, self.labels, self.data.train, cfg, seed, detector)
        return dataclasses.replace(lesson, privacy=privacy)

    def _teach_dp(self, cfg: SocialConfig, experiment: str) -> Lesson:
        """Examples by DP few-shot generation (charged to this silo's ledger), then the top-k by perplexity given the
        data-free prompt (post-processing). No verbatim filter: reading private data to filter would not be."""
        texts, labels = list(self.data.train.texts), list(self.data.train.labels)
        model, tok = load_llm(cfg.teacher)

        def release(ledger: RunLedger, noise_seed: int | None) -> SynthesisResult:
            mech = DPFewShotConfig(num_groups=cfg.dp_groups, shots_per_group=cfg.dp_shots_per_group,
                                   max_tokens=cfg.max_new_tokens, public_top_k=cfg.dp_public_top_k,
                                   num_per_label=math.ceil(cfg.samples / len(self.labels)), noise_seed=noise_seed,
                                   max_text_chars=cfg.max_example_chars, sigma=0.0, count_bound=self.count_bound())
            sigma = sigma_for_epsilon(min(cfg.epsilon, ledger.remaining()), ledger.delta, labels, len(self.labels),
                                      mech)
            return dp_fewshot_synthesize(model, tok, texts, labels, self.labels,
                                         dataclasses.replace(mech, sigma=sigma), ledger)

        result, privacy = self.dp_release("Social Learning examples", cfg.epsilon, cfg.noise_seed, experiment,
                                          release)
        kept, ppl = public_top_k(model, tok, self.labels, result.examples, cfg.top_k)
        provenance = {"mode": "examples", "teacher": cfg.teacher, "dp": cfg.dp, "dp-groups": cfg.dp_groups,
                      "dp-shots-per-group": cfg.dp_shots_per_group, "samples": len(result.examples),
                      "top-k": cfg.top_k, "conditioning": "label", "selection": "lowest perplexity given the "
                      "data-free prompt", "verbatim-filter": False, "perplexities": ppl}
        metrics = {"teach.generated": len(result.examples), "teach.kept": len(kept),
                   "teach.seconds": sum(result.seconds.values()),
                   "teach.tokens-generated": result.tokens.get("generated", 0)}
        return Lesson([result.examples[i][0] for i in kept], [result.examples[i][1] for i in kept], provenance,
                      privacy, metrics)

    def vote(self, mode: str, texts: list[str], labels: list[int] | None, experiment: str = "") -> list[float]:
        """The teacher's length-normalised log-likelihood of each candidate against its held-out examples (a seeded
        sample of its test split, which no teaching prompt ever showed). Votes are not DP: a non-private release."""
        cfg = from_flat(SocialConfig, self.cfg.method_options, "social")
        if not len(self.data.test):
            raise ConfigError(f"{self.name} has no held-out (test) examples to vote with; raise "
                              "task.silo-test-fraction or drop the voting aggregators.")
        self.non_private_release("Social Learning votes", experiment)
        rng = random.Random(f"vote/{self.cfg.seed}/{self.index}")  # a stream of its own, not the teaching draws
        held = rng.sample(range(len(self.data.test)), min(cfg.vote_examples, len(self.data.test)))
        model, tok = load_llm(cfg.teacher)
        return vote_scores(model, tok, self.labels, Examples.of([self.data.test.texts[i] for i in held],
                                                                [self.data.test.labels[i] for i in held]),
                           mode, texts, labels, cfg.max_example_chars)

    def share_raw(self, n: int, experiment: str = "") -> tuple[Examples, dict]:
        """Social Learning's NON-PRIVATE upper bound: n raw training examples. Refused unless the run asks for the
        'original' baseline (social.baselines) and the silo's policy allows non-private releases."""
        cfg = from_flat(SocialConfig, self.cfg.method_options, "social")
        if "original" not in cfg.baseline_names:
            raise ConfigError(f"{self.name} refuses to share raw examples: the run did not ask for the non-private "
                              "'original' baseline (social.baselines).")
        privacy = self.non_private_release("raw examples", experiment)
        rng = random.Random(f"share-raw/{self.cfg.seed}/{self.index}")
        picked = rng.sample(range(len(self.data.train)), min(n, len(self.data.train)))
        raw = Examples.of([self.data.train.texts[i] for i in picked], [self.data.train.labels[i] for i in picked])
        return raw, privacy

    def info(self) -> dict[str, int]:
        """Partition id and example counts; the counts are exact only where non-private details may leave (0 =
        withheld)."""
        shown = self.policy.allow_non_private
        return {"partition-id": self.index, "num-train": len(self.data.train) if shown else 0,
                "num-test": len(self.data.test) if shown else 0}

    def releasable(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """The metrics a reply may carry: all of them, or, where non-private details may not leave, none that grows
        with the private data (seconds, example and token counts); scores on the silo's test split always go, and
        every record labels them non-private; scores on the server's global test set are the server's own."""
        if self.policy.allow_non_private:
            return dict(metrics)
        return {k: v for k, v in metrics.items() if k in ("partition-id", "num-train", "num-test")
                or k.startswith("global-test.") or not any(word in k for word in COUNT_DERIVED)}


def train_metrics(stats: TrainStats) -> dict[str, float]:
    """What a silo reports about one SLM training: seconds, examples seen, epochs run and the epoch kept."""
    return {"train.seconds": stats.seconds, "train.examples": stats.examples, "train.epochs": stats.epochs,
            "train.best-epoch": stats.best_epoch, "train.validation": stats.validation}


COUNT_DERIVED = ("seconds", "examples", "validation", "tokens", "num-", "epochs", ".n")
KEPT_SLM = "crosslm-slm"  # CrossLM: the silo's SLM, kept in the node state between messages
KEPT_ROUND = "crosslm-slm-round"  # ... and the round it is the result of


@functools.lru_cache(maxsize=16)
def _silo(run_items: tuple, node_items: tuple) -> Silo:
    """One Silo per (run config, node config) per process: data is loaded and split once."""
    cfg, node = ExperimentConfig.from_run_config(dict(run_items)), dict(node_items)
    if "partition-id" not in node:
        raise ConfigError("This SuperNode has no 'partition-id' in its node config. Start it with "
                          "--node-config \"partition-id=<k> ...\" (and data-path=<file> for its own data).")
    index = int(node["partition-id"])
    if "data-path" in node and cfg.task.labels and cfg.task.name not in BUILTIN_TASKS:
        labels = cfg.task.labels  # what the server's task file or dataset resolves to; the silo need not have it
    else:
        labels = load_task(cfg.task, cfg.seed).labels
    if "data-path" in node:
        file_cfg = dataclasses.replace(cfg.task, text_column=str(node.get("text-column", cfg.task.text_column)),
                                       label_column=str(node.get("label-column", cfg.task.label_column)))
        data = silo_from_file(file_cfg, str(node["data-path"]), labels, cfg.seed + index)
    else:
        federation = load_federation(cfg.task, cfg.partition, cfg.seed)
        if not 0 <= index < len(federation.silos):
            raise ConfigError(f"partition-id {index} is outside 0..{len(federation.silos) - 1} "
                              f"(partition.num-silos={cfg.partition.num_silos}). Match num-supernodes to it.")
        data = federation.silos[index]
    data = plant_canaries(data, social_options(cfg).canary_setup, cfg.seed, index)  # social.canaries: to measure leaks
    return Silo(index, cfg, labels, data, Path(str(node.get("state-dir", DEFAULT_SILO_STATE_DIR))).expanduser(),
                SiloPolicy.from_node_config(node))
