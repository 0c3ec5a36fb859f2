"""CrossLM (Deng et al. 2023, arXiv 2312.05842): silo SLMs judge the server LLM's generations; the rewards train
the LLM (LoRA, on a KL leash to the original) and pick the examples that enhance every silo's SLM.

Per silo, asynchronously by default (Flower has no asynchronous strategy: this is a push/pull loop on the grid):
  1. ``train.private``: the silo trains its SLM on its private data and keeps it in its node state. Architectures
     may differ per silo (``slm.model`` is a comma list).
  2. The server LLM writes batch b: per-label prompts with varied style hints, sampled, parsed, length-filtered
     and deduplicated against everything written before. A batch is written once, when the first silo needs it;
     later silos score the same batch, so their rewards can be combined.
  3. ``query.score`` (``score-on=silo``, default): the silo returns its SLM's class probabilities of the batch and
     nothing else. With ``score-on=server`` (opt-in, weaker privacy) the silo uploads its SLM once
     (``query.upload``) and the server scores with it.
  4. As soon as one silo's scores arrive, the server combines the rewards r = 2·S(y|x) − 1 of every silo that has
     scored the batch so far (mean / median / trimmed mean); updates the LLM when at least ``min-scorers`` silos
     have scored it and the batch is at most ``max-staleness`` LLM updates old; selects high-reward, diverse,
     label-balanced examples; and sends this silo ``train.enhance`` at once. The silo fine-tunes its SLM on them
     (hard labels, or the combined SLM probabilities as soft labels), or, with uploaded weights, the server
     fine-tunes its copy and sends the weights back.
  5. When the silo's enhanced metrics arrive, its next round starts (step 3 with batch b+1), whatever the others do.
Every message has a TTL (``crosslm.ttl``); an error reply or a silo that stays silent is logged as a failure and
dropped, never waited for. ``crosslm.mode=sync`` runs each step for all silos and waits for all, for comparison.

Checkpoint (``resume=true``): after every step above the server saves the LLM adapter and its optimizer state (per LLM
version), the batches with the scores received, each silo's progress (trained / scored round / enhanced round), the
counters and the LoRA step log. A restarted server reloads them and sends each silo its next request; silos keep
their SLM of the latest round on their own disk (``Silo.keep_slm``) and answer a request they already finished with
its stored metrics, so no round is trained twice and no LLM update is lost or repeated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import ConfigError
from fedbridge.methods.base import POLL_SECONDS, AggregatorAxis, Method, RejectedReply, Session, mean_over_silos
from fedbridge.methods.crosslm.config import CHECKPOINT_STEP, SERVER_ENHANCE_EPOCHS, CrossLMConfig
from fedbridge.methods.selection import select_balanced
from fedbridge.methods.text import deduplicate, parse_generation
from fedbridge.models.embedding import embed
from fedbridge.models.generation import GenerationStats, Prompt, SamplingConfig, generate
from fedbridge.models.llm_classifier import label_probabilities
from fedbridge.models.loading import ModelSpecError, load_llm, load_slm
from fedbridge.models.reward import (
    AGGREGATIONS,
    RewardTrainer,
    ScoredExample,
    aggregate,
    aggregate_probabilities,
    general_text,
    perplexity,
    rewards_from_probabilities,
)
from fedbridge.models.slm import SLM, predict_proba, train_classifier
from fedbridge.tasks import Examples, Task, classification_metrics

log = logging.getLogger(__name__)
# ------------------------------------------------------------------ generation and selection

STYLES = ("", "Keep it short.", "Write two or three sentences.", "Write it in the first person.",
          "Use plain, everyday words.", "Include one concrete detail.", "Make it sound like a real person wrote it.")


def generation_prompt(task: Task, label: str, style: str = "") -> Prompt:
    hint = f" {style}" if style else ""
    return [{"role": "user", "content": f"Write one {task.description} with label '{label}'.{hint} "
                                        "Reply with the text only."}]


@dataclass(frozen=True)
class Generated:
    prompt: Prompt
    text: str
    label: int


def crosslm_prompts(task: Task, per_label: int, rng: random.Random) -> tuple[list[Prompt], list[int]]:
    """CrossLM's prompts for one batch: ``per_label`` per label, each with a style hint drawn by ``rng``."""
    prompts, labels = [], []
    for y, label in enumerate(task.labels):
        for _ in range(per_label):
            prompts.append(generation_prompt(task, label, rng.choice(STYLES)))
            labels.append(y)
    return prompts, labels


def write_labelled(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[Prompt], labels: list[int],
                   cfg: CrossLMConfig, history: list[str], seed: int, batch_size: int, stats: GenerationStats,
                   counts: Counter) -> list[Generated]:
    """One batch from ``prompts`` (each asking for its label): sampled, parsed, kept if long enough and not a
    near-copy of anything written before (``history``, extended in place)."""
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              batch_size=batch_size)
    outs, st = generate(model, tok, prompts, sampling, seed=seed, progress="crosslm generate")
    stats += st
    texts = [parse_generation(o) for o in outs]
    long_enough = [i for i, t in enumerate(texts) if len(t.split()) >= cfg.min_words]
    kept = [long_enough[j] for j in deduplicate([texts[i] for i in long_enough], history, cfg.near_duplicate)]
    history += [texts[i] for i in kept]
    counts["generated"] += len(texts)
    counts["kept-after-filter"] += len(kept)
    return [Generated(prompts[i], texts[i], labels[i]) for i in kept]


def select_examples(labels: list[int] | tuple[int, ...], rewards: np.ndarray, max_examples: int, min_reward: float,
                    embeddings: np.ndarray | None = None, diversity: float = 0.0) -> list[int]:
    """Up to ``max_examples`` indices with reward above ``min_reward``, label-balanced and diverse by cosine
    similarity of their embeddings (``select_balanced``: high reward first, but not the same thing twice)."""
    similarity = None if embeddings is None else (
        lambda i, chosen: float(np.max(embeddings[chosen] @ embeddings[i])))
    return select_balanced(labels, rewards, max_examples, eligible=np.flatnonzero(rewards > min_reward).tolist(),
                           similarity=similarity, diversity=diversity)


@dataclass
class Batch:
    """Examples the LLM wrote at one version, and each silo's class probabilities of them as they arrive."""

    index: int
    version: int  # LLM updates done before it was written
    examples: list[Generated]
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # silo name -> (n, num_labels)
    learned: bool = False  # sync: the LLM has been updated on it
    embeddings: np.ndarray | None = None

    @property
    def texts(self) -> list[str]:
        return [g.text for g in self.examples]

    @property
    def labels(self) -> list[int]:
        return [g.label for g in self.examples]

    def rewards(self, rule: str, trim: float) -> np.ndarray:
        """Combined reward per example over the silos that have scored the batch so far."""
        if not self.examples:
            return np.zeros(0)
        return aggregate([rewards_from_probabilities(s, self.labels) for s in self.scores.values()], rule, trim)

    def to_json(self) -> dict:
        return {"version": self.version, "learned": self.learned,
                "examples": [[g.prompt, g.text, g.label] for g in self.examples],
                "scores": {silo: probs.tolist() for silo, probs in self.scores.items()}}

    @classmethod
    def from_json(cls, index: int, data: dict) -> Batch:
        return cls(index, data["version"], [Generated(prompt, text, label) for prompt, text, label in data["examples"]],
                   {silo: np.array(probs, dtype=np.float64) for silo, probs in data["scores"].items()},
                   data["learned"])


@dataclass
class Progress:
    """How far one silo has got: its SLM trained, the last batch it scored and the last round it was enhanced in."""

    scored: int = 0
    enhanced: int = 0


@dataclass(frozen=True)
class _Pending:
    node: int
    message_type: str
    round: int
    deadline: float  # monotonic time after which it counts as lost


# ------------------------------------------------------------------ the method


class CrossLM(Method):
    name = "crosslm"
    description = "CrossLM: silo SLMs score LLM generations; LLM reward-trained (LoRA + KL), SLMs enhanced, async"
    dp_slm = True
    aggregator = AggregatorAxis("crosslm.aggregate", AGGREGATIONS)
    note = "crosslm: silo scores of server-written text leave the silos without DP noise (no formal privacy guarantee)"

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.options = from_flat(CrossLMConfig, cfg.method_options, "crosslm")  # bad crosslm.* keys fail up front
        if cfg.slm.private and self.options.with_private and self.options.score_on == "silo":
            raise ConfigError("slm.dp-epsilon with crosslm.with-private=true would fine-tune each silo's DP SLM on its "
                              "private data again every round. Set crosslm.with-private=false.")
        if cfg.slm.private:
            self.note = None  # the scores are post-processing of DP SLMs: the record's privacy field has their ε

    def non_private(self) -> tuple[str, ...]:
        if self.cfg.slm.private:  # a DP SLM's scores and weights: post-processing
            return ()
        return ("SLM scores", *(("SLM weights",) if self.options.score_on == "server" else ()))

    def run(self, session: Session) -> None:
        _Run(self.cfg, self.options, session).run()


class _Run:
    """One CrossLM run: the push/pull loop, the LLM and its trainer, the batches, and what goes in the record."""

    def __init__(self, cfg: ExperimentConfig, opts: CrossLMConfig, session: Session) -> None:
        self.cfg, self.opts, self.session, self.record, self.task = cfg, opts, session, session.record, session.task
        self.num_labels = len(self.task.labels)
        self.ttl = opts.ttl or cfg.timeout
        self.pending: dict[str, _Pending] = {}
        self.live: set[int] = set(session.silos)
        self.batches: list[Batch] = []
        self.history: list[str] = []
        self.version = 0  # LLM updates so far
        self.server_slms: dict[int, SLM] = {}
        self.slm_specs: dict[str, str] = {}  # score-on=server: silo name -> the spec of the SLM it uploaded
        self.counts: Counter = Counter()
        self.selected: dict[str, int] = {}  # "silo/round" -> examples sent for that round's enhancement
        self.stats = GenerationStats()
        self.trainer: RewardTrainer | None = None
        self.steps_path = Path(cfg.results_dir) / f"{self.record.run_name}.crosslm-steps.jsonl"
        self.progress: dict[str, Progress] = {}  # silo name -> progress; absent = not trained yet
        self.before: dict[str, float] = {}  # the LLM's metrics before any update
        self.saved = session.checkpoint.done(CHECKPOINT_STEP)  # the earlier attempt's state, when resuming
        self.saved_version: int | None = None  # the LLM version whose adapter the checkpoint holds

    # -------------------------------------------------------------- run

    def run(self) -> None:
        session, opts = self.session, self.opts
        if opts.score_on == "server":
            self.record.notes.append("crosslm: score-on=server: silos uploaded their SLM weights to the server "
                                     "(weaker privacy than score-on=silo, where only probabilities leave a silo)")
        if self.saved is not None:
            self.progress = {silo: Progress(**prog) for silo, prog in self.saved["progress"].items()}
        else:
            self.steps_path.unlink(missing_ok=True)  # an earlier attempt's steps are not this run's
        self.start_silos()  # silos work while the server loads and evaluates its LLM
        with session.phase("server-llm-load"):
            model, tok = load_llm(self.cfg.llm.model, trainable=True)
            eval_set = _subsample(session.global_test, opts.llm_eval_examples, self.cfg.seed)
            passages = general_text(opts.general_text)
            passages = passages[:opts.ppl_passages] if opts.ppl_passages > 0 else passages
        if self.saved is None:
            with session.phase("llm-eval-before"):
                self.before = self.evaluate_llm(model, tok, eval_set, passages)
        self.trainer = RewardTrainer(model, tok, opts.update_config(), self.task.labels, self.task.instruction,
                                     seed=self.cfg.seed)
        if self.saved is not None:
            self.restore(self.saved)
        with session.phase("crosslm-rounds"):
            self.run_async() if opts.mode == "async" else self.run_sync()
        if not any("global-test.accuracy" in m for m in self.record.silo_metrics.values()):
            raise self.session.no_silo_completed("a CrossLM round")
        with session.phase("llm-eval-after"):
            after = self.evaluate_llm(self.trainer.model, tok, eval_set, passages)
        self.finish(self.before, after)

    def start_silos(self) -> None:
        """The first request to every silo not trained yet: train its SLM on its private data."""
        for node in sorted(self.live):
            if self.session.silo_name(node) not in self.progress:
                self.train_private(node)

    def train_private(self, node: int) -> None:
        self.push(node, p.TRAIN_PRIVATE, 0, p.request({"round": 0}, global_test=self.session.global_test))

    def run_async(self) -> None:
        for node in sorted(self.live):  # a resumed run: trained silos go on where they were
            if self.session.silo_name(node) in self.progress:
                self.advance(node, "resume")
        for pend, content in self.replies():
            self.on_reply(pend, content)

    def on_reply(self, pend: _Pending, content: RecordDict) -> None:
        """Async: one silo's reply, and that silo's next request."""
        node, r = pend.node, pend.round
        if pend.message_type == p.TRAIN_PRIVATE:
            self.on_trained(node, content)
            self.advance(node, p.TRAIN_PRIVATE)
        elif pend.message_type == p.UPLOAD:
            if self.on_uploaded(pend, content):
                self.advance(node, p.UPLOAD)
        elif pend.message_type == p.SCORE:
            if (probs := self.read_scores(pend, content)) is not None:
                self.process(node, r, probs, p.SCORE)
        elif pend.message_type == p.ENHANCE:
            self.on_enhanced(node, r, content)
            self.advance(node, p.ENHANCE)

    def advance(self, node: int, trigger: str) -> None:
        """Async: send a silo its next request, from its progress (fresh, or restored from the checkpoint)."""
        prog = self.progress[self.session.silo_name(node)]
        if self.opts.score_on == "server" and node not in self.server_slms:
            self.push(node, p.UPLOAD, prog.enhanced, p.request({"round": prog.enhanced}))
        elif prog.scored > prog.enhanced:  # resumed after its scores were used, before its enhancement came back
            batch = self.batch(prog.scored)
            self.send_enhancement(node, batch, batch.rewards(self.opts.aggregate, self.opts.trim))
        elif prog.enhanced < self.opts.rounds and self.opts.score_on == "server":
            self.process(node, prog.enhanced + 1, self.server_scores(node, prog.enhanced + 1), trigger)
        elif prog.enhanced < self.opts.rounds:
            self.request_scores(node, prog.enhanced + 1)

    def run_sync(self) -> None:
        for pend, content in self.replies():
            self.on_setup(pend, content)
        if self.opts.score_on == "server":
            for node in sorted(self.live - set(self.server_slms)):  # a resumed run restored the others' copies
                enhanced = self.progress[self.session.silo_name(node)].enhanced
                self.push(node, p.UPLOAD, enhanced, p.request({"round": enhanced}))
            for pend, content in self.replies():
                self.on_uploaded(pend, content)
        for r in range(1, self.opts.rounds + 1):
            todo = [node for node in sorted(self.live) if self.progress[self.session.silo_name(node)].enhanced < r]
            if not todo:
                continue  # a resumed run: every silo finished this round before the restart
            batch = self.batch(r)
            unscored = [node for node in todo if self.session.silo_name(node) not in batch.scores]
            if self.opts.score_on == "server":
                for node in unscored:
                    self.take_scores(node, batch, self.server_scores(node, r))
            else:
                for node in unscored:
                    self.request_scores(node, r)
                for pend, content in self.replies():
                    if (probs := self.read_scores(pend, content)) is not None:
                        self.take_scores(pend.node, batch, probs)
            if not batch.scores:
                break
            rewards = batch.rewards(self.opts.aggregate, self.opts.trim)
            if not batch.learned:
                # as many steps as async spends on a batch: one update per arrival from the min-scorers-th on
                contributions = len(batch.scores) - min(self.opts.min_scorers, len(self.live)) + 1
                self.learn(batch, rewards, "all", self.opts.lora_steps * max(1, contributions))
                batch.learned = True
            ready = [node for node in todo if node in self.live and self.session.silo_name(node) in batch.scores]
            for node in ready:
                self.progress[self.session.silo_name(node)].scored = r
            self.save()
            for node in ready:
                self.session.event(node, "processed", p.SCORE, r)
                self.send_enhancement(node, batch, rewards)
            for pend, content in self.replies():
                self.on_enhanced(pend.node, pend.round, content)
            if not self.live:
                break

    def on_setup(self, pend: _Pending, content: RecordDict) -> None:
        """Sync: a reply to what ``start_silos`` asked (the private training)."""
        self.on_trained(pend.node, content)

    # -------------------------------------------------------------- messaging with per-message TTL

    def push(self, node: int, message_type: str, round_: int, content: RecordDict) -> None:
        for message_id in self.session.push(message_type, {node: content}, round_, timeout=self.ttl):
            self.pending[message_id] = _Pending(node, message_type, round_, time.monotonic() + self.ttl)

    def replies(self) -> Iterator[tuple[_Pending, RecordDict]]:
        """Yield (request, reply content) in arrival order until nothing is pending; requests pushed meanwhile
        are waited for too. Error replies, replies over the size cap or with malformed metrics, and expired
        messages drop that silo (a failure), as ``Session.replies`` does."""
        grid = self.session.grid
        while self.pending:
            arrived = []
            for reply in grid.pull_messages(list(self.pending)):
                pend = self.pending.pop(reply.metadata.reply_to_message_id, None)
                if pend is None:
                    continue
                cap = p.MAX_REPLY_BYTES if pend.message_type == p.UPLOAD else p.MAX_EXAMPLES_REPLY_BYTES
                try:
                    self.session.accept(pend.node, reply, pend.message_type, pend.round, p.read_reply, cap)
                except RejectedReply as rejected:
                    self.drop(pend, str(rejected))
                    continue
                arrived.append((pend, reply.content))
            now = time.monotonic()
            for message_id, pend in list(self.pending.items()):
                if now > pend.deadline:
                    del self.pending[message_id]
                    self.drop(pend, f"no reply within the {self.ttl:g} s TTL")
            yield from arrived
            if not arrived and self.pending:
                time.sleep(POLL_SECONDS)

    def drop(self, pend: _Pending, reason: str) -> None:
        self.session.fail(pend.node, pend.message_type, pend.round, reason)
        self.live.discard(pend.node)

    # -------------------------------------------------------------- per-silo steps

    def on_trained(self, node: int, content: RecordDict) -> None:
        metrics = self.silo_metrics(node)
        for key, value in p.read_metrics(content).items():
            if key != "partition-id":
                metrics[key if key.startswith("num-") else f"before.{key}"] = value
        self.progress[self.session.silo_name(node)] = Progress()
        self.session.event(node, "processed", p.TRAIN_PRIVATE, 0)
        self.save()

    def on_uploaded(self, pend: _Pending, content: RecordDict) -> bool:
        """Load the SLM a silo uploaded (score-on=server); a malformed upload drops the silo."""
        try:
            arrays = p.read_arrays(content)
            slm = content.get(p.SLM)
            spec = slm.get("spec") if isinstance(slm, ConfigRecord) else None
            if not isinstance(spec, str) or not spec:
                raise p.ProtocolError("upload has no 'slm' record with the model's 'spec'.")
            model = load_slm(spec, self.num_labels, seed=self.cfg.seed, weights=arrays.to_torch_state_dict(),
                             options=self.cfg.slm)
        except (p.ProtocolError, ModelSpecError, RuntimeError) as err:
            self.drop(pend, f"rejected: unusable SLM upload: {err}")
            return False
        self.server_slms[pend.node] = model
        self.slm_specs[self.session.silo_name(pend.node)] = spec
        self.session.checkpoint.save_arrays(f"slm/{self.session.silo_name(pend.node)}", model.trainable_state())
        self.session.save_contribution(pend.node, "slm-upload", 0, spec=spec, bytes=p.payload_bytes(content))
        self.session.event(pend.node, "processed", p.UPLOAD, 0)
        return True

    def read_scores(self, pend: _Pending, content: RecordDict) -> np.ndarray | None:
        try:
            return p.read_probabilities(content, p.SCORES, len(self.batches[pend.round - 1].examples), self.num_labels)
        except p.ProtocolError as err:
            self.drop(pend, f"rejected: {err}")
            return None

    def server_scores(self, node: int, round_: int) -> np.ndarray:
        return predict_proba(self.server_slms[node], self.batch(round_).texts)

    def score_request(self, batch: Batch) -> RecordDict:
        return p.request({"round": batch.index}, examples=p.examples_record(Examples.of(batch.texts, batch.labels)))

    def request_scores(self, node: int, round_: int) -> None:
        self.push(node, p.SCORE, round_, self.score_request(self.batch(round_)))

    def take_scores(self, node: int, batch: Batch, probs: np.ndarray) -> None:
        batch.scores[self.session.silo_name(node)] = probs
        self.session.save_contribution(node, "scores", batch.index, Examples.of(batch.texts, batch.labels),
                                       probs=np.round(probs, 4).tolist())

    def process(self, node: int, round_: int, probs: np.ndarray, trigger: str) -> None:
        """Async: one silo's scores of batch ``round_`` have arrived; learn from them and send its enhancement."""
        batch = self.batch(round_)
        self.take_scores(node, batch, probs)
        rewards = batch.rewards(self.opts.aggregate, self.opts.trim)
        self.learn(batch, rewards, self.session.silo_name(node), self.opts.lora_steps)
        self.progress[self.session.silo_name(node)].scored = round_
        self.save()  # before the enhancement goes out: a restart then resends it, and the silo's answer is idempotent
        self.send_enhancement(node, batch, rewards)
        self.session.event(node, "processed", trigger, round_)

    def on_enhanced(self, node: int, round_: int, content: RecordDict) -> None:
        metrics = self.silo_metrics(node)
        for key, value in p.read_metrics(content).items():
            if key == "partition-id":
                continue
            metrics[key] = value
            if key.endswith((".accuracy", ".macro_f1")):
                metrics[f"round-{round_}.{key}"] = value
        self.progress[self.session.silo_name(node)].enhanced = round_
        if node in self.server_slms:  # score-on=server: the server's copy, as of the round the silo confirmed
            self.session.checkpoint.save_arrays(f"slm/{self.session.silo_name(node)}",
                                                self.server_slms[node].trainable_state())
        self.session.event(node, "processed", p.ENHANCE, round_)
        self.save()

    # -------------------------------------------------------------- server work

    def batch(self, round_: int) -> Batch:
        """Batch ``round_``, written by the current LLM the first time a silo needs it."""
        while len(self.batches) < round_:
            index = len(self.batches) + 1
            with self.session.phase("server-generate"):
                examples = self.write_batch(index)
            self.batches.append(Batch(index, self.version, examples))
            log.info("crosslm: batch %d written by LLM version %d: %d examples", index, self.version, len(examples))
        return self.batches[round_ - 1]

    def write_batch(self, index: int) -> list[Generated]:
        """Batch ``index``, written by the current LLM from CrossLM's own prompts."""
        seed = self.cfg.seed * 1000 + index
        prompts, labels = crosslm_prompts(self.task, self.opts.per_label, random.Random(seed))
        return write_labelled(self.trainer.model, self.trainer.tok, prompts, labels, self.opts, self.history, seed,
                              self.cfg.llm.batch_size, self.stats, self.counts)

    def learn(self, batch: Batch, rewards: np.ndarray, silo: str, steps: int) -> None:
        """Update the LLM on the batch's combined rewards, unless too few silos scored it or it is too stale."""
        needed = min(self.opts.min_scorers, max(1, len(self.live)))
        if len(batch.scores) < needed:
            self.counts["waiting-for-scorers"] += 1
            return
        staleness = self.version - batch.version
        if staleness > self.opts.max_staleness:
            self.counts["stale-contributions"] += 1
            log.info("crosslm: %s's rewards on batch %d are %d LLM updates stale (max %d): not used for the LLM",
                     silo, batch.index, staleness, self.opts.max_staleness)
            return
        examples = [ScoredExample(g.prompt, g.text, g.label, float(r)) for g, r in zip(batch.examples, rewards)]
        with self.session.phase("server-llm-update"):
            entries = self.trainer.update(examples, steps, progress=f"crosslm llm update ({silo})", silo=silo,
                                          batch=batch.index, version=self.version, staleness=staleness,
                                          scorers=len(batch.scores))
        if entries:
            self.version += 1
            self.counts["llm-updates"] += 1
            self.steps_path.parent.mkdir(parents=True, exist_ok=True)
            with self.steps_path.open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(e) + "\n" for e in entries)
            self.record.artifacts["crosslm-steps"] = str(self.steps_path)

    def send_enhancement(self, node: int, batch: Batch, rewards: np.ndarray) -> None:
        """Select this silo's examples from the batch and send them (or, score-on=server, the weights enhanced on
        them). A resumed run may send a silo's round again: counted once, by (silo, round)."""
        opts = self.opts
        if opts.diversity and batch.embeddings is None and batch.examples:
            batch.embeddings = embed(batch.texts)
        chosen = select_examples(batch.labels, rewards, opts.select_max, opts.min_reward, batch.embeddings,
                                 opts.diversity)
        self.selected[f"{self.session.silo_name(node)}/{batch.index}"] = len(chosen)
        examples = Examples.of([batch.texts[i] for i in chosen], [batch.labels[i] for i in chosen])
        self.session.save_contribution(None, "selected", batch.index, examples, to=self.session.silo_name(node))
        targets = (aggregate_probabilities([s[chosen] for s in batch.scores.values()], opts.aggregate, opts.trim)
                   if opts.targets == "soft" and chosen else None)
        config = {"round": batch.index, "final": batch.index == opts.rounds}
        if opts.score_on == "server":
            model = self.server_slms[node]
            if chosen:  # the server holds no validation data: a fixed number of epochs
                with self.session.phase("server-slm-enhance"):
                    train_classifier(model, examples.texts, examples.labels if targets is None else targets,
                                     self.cfg.slm.options(epochs=opts.enhance_epochs or SERVER_ENHANCE_EPOCHS),
                                     [opts.synthetic_weight] * len(chosen), seed=self.cfg.seed + 1000 * batch.index)
            content = p.request(config, global_test=self.session.global_test,
                                arrays=ArrayRecord(model.trainable_state()))
        else:
            config |= {"epochs": opts.enhance_epochs, "synthetic-weight": opts.synthetic_weight,
                       "with-private": opts.with_private}
            extra = {"targets": p.probabilities_record(targets)} if targets is not None else {}
            content = p.request(config, global_test=self.session.global_test, examples=p.examples_record(examples),
                                **extra)
        self.push(node, p.ENHANCE, batch.index, content)

    # -------------------------------------------------------------- checkpoint

    def save(self) -> None:
        """Checkpoint the run: the adapter and optimizer of the current LLM version (once per version; the
        previous one is dropped after), then the rest as the step's JSON state."""
        ckpt, trainer = self.session.checkpoint, self.trainer
        if self.saved_version != self.version:
            ckpt.save_adapter(f"llm-v{self.version}", trainer.model)
            ckpt.save_optimizer(f"llm-v{self.version}", trainer.optim)
        rng = trainer.rng.getstate()
        ckpt.complete(CHECKPOINT_STEP, version=self.version, before=self.before, counts=dict(self.counts),
                      stats=dataclasses.asdict(self.stats), log=trainer.log, rng=[rng[0], list(rng[1])],
                      selected=self.selected, slm_specs=self.slm_specs,
                      progress={silo: dataclasses.asdict(prog) for silo, prog in self.progress.items()},
                      batches=[batch.to_json() for batch in self.batches])
        if self.saved_version not in (None, self.version):
            ckpt.delete(f"llm-v{self.saved_version}")
        self.saved_version = self.version

    def restore(self, saved: dict) -> None:
        """Go on from the earlier attempt's checkpoint: the LLM as it was, and everything written and scored."""
        ckpt, trainer, name = self.session.checkpoint, self.trainer, f"llm-v{saved['version']}"
        if not (ckpt.load_adapter(name, trainer.model) and ckpt.load_optimizer(name, trainer.optim)):
            raise ConfigError(f"The CrossLM checkpoint in {ckpt.directory} lacks the LLM adapter '{name}'. Delete "
                              "the directory to start over.")
        self.version = self.saved_version = saved["version"]
        self.before, self.counts, self.selected = saved["before"], Counter(saved["counts"]), saved["selected"]
        self.stats = GenerationStats(**saved["stats"])
        trainer.log = list(saved["log"])
        trainer.rng.setstate((saved["rng"][0], tuple(saved["rng"][1]), None))
        self.batches = [Batch.from_json(i + 1, data) for i, data in enumerate(saved["batches"])]
        self.history = [text for batch in self.batches for text in batch.texts]
        self.slm_specs = saved["slm_specs"]
        for node, silo in self.session.silos.items():  # score-on=server: the copies as of each silo's last round
            if silo in self.slm_specs and (arrays := ckpt.load_arrays(f"slm/{silo}")) is not None:
                self.server_slms[node] = load_slm(self.slm_specs[silo], self.num_labels, self.cfg.seed, arrays,
                                                  self.cfg.slm)
        with self.steps_path.open("w", encoding="utf-8") as f:  # the steps the checkpoint covers, not any after it
            f.writelines(json.dumps(entry) + "\n" for entry in trainer.log)
        log.info("crosslm: resumed at LLM version %d with %d batches; silo progress %s", self.version,
                 len(self.batches), {silo: dataclasses.asdict(prog) for silo, prog in self.progress.items()})

    def evaluate_llm(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, eval_set: Examples,
                     passages: list[str]) -> dict[str, float]:
        probs = label_probabilities(model, tok, eval_set.texts, self.task.labels, self.task.instruction,
                                    batch_size=self.cfg.llm.batch_size, max_tokens=self.cfg.llm.max_length,
                                    progress="crosslm llm eval", calibrate=self.cfg.llm.calibrate)
        return {**classification_metrics(eval_set.labels, probs),
                "perplexity": perplexity(model, tok, passages, self.opts.ppl_max_tokens, self.cfg.llm.batch_size)}

    # -------------------------------------------------------------- the record

    def silo_metrics(self, node: int) -> dict[str, float]:
        return self.record.silo_metrics.setdefault(self.session.silo_name(node), {})

    def finish(self, before: dict[str, float], after: dict[str, float]) -> None:
        record, server = self.record, self.record.server_metrics
        server.update({f"crosslm.llm-before.{k}": v for k, v in before.items()})
        server.update({f"crosslm.llm-after.{k}": v for k, v in after.items()})
        server.update({f"crosslm.{k}": v for k, v in sorted(self.counts.items())})
        server["crosslm.selected"] = sum(self.selected.values())
        server["crosslm.llm-version"] = self.version
        server["crosslm.llm-steps"] = len(self.trainer.log)
        server["crosslm.batches"] = len(self.batches)
        steps = self.trainer.log
        for key in ("loss", "quality", "task", "kl", "seconds"):
            values = [s[key] for s in steps if key in s]
            if values:
                server.update({f"crosslm.step-first.{key}": values[0], f"crosslm.step-last.{key}": values[-1],
                               f"crosslm.step-mean.{key}": float(np.mean(values))})
        rewards = [batch.rewards(self.opts.aggregate, self.opts.trim) for batch in self.batches if batch.scores]
        if rewards and (flat := np.concatenate(rewards)).size:
            server["crosslm.mean-reward"] = float(flat.mean())
            server["crosslm.positive-reward-share"] = float((flat > 0).mean())
        record.tokens["prompt"] += self.stats.prompt_tokens
        record.tokens["generated"] += self.stats.generated_tokens
        mean_over_silos(record)
        for split, prefix in (("global-test", ""), ("silo-test", "silo_test_")):
            for metric in ("accuracy", "macro_f1"):
                values = [m[f"before.{split}.{metric}"] for m in record.silo_metrics.values()
                          if f"before.{split}.{metric}" in m]
                if values:
                    record.global_metrics[f"before_{prefix}{metric}"] = float(np.mean(values))


def _subsample(examples: Examples, k: int, seed: int) -> Examples:
    """A fixed random subset of ``k`` examples (all when k is 0 or too large), the same before and after."""
    if k <= 0 or k >= len(examples):
        return examples
    idx = sorted(random.Random(seed).sample(range(len(examples)), k))
    return Examples.of([examples.texts[i] for i in idx], [examples.labels[i] for i in idx])
