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
counters and the LoRA step log. A restarted server reloads them and sends each silo its next request; silos keep their
SLM of the latest round on their own disk (``keep_slm`` in ``crosslm/silo.py``) and answer a request they already
finished with its stored metrics, so no round is trained twice and no LLM update is lost or repeated.

This module is the scheduler (``_Run``: who gets which request when, and what a reply changes); what it knows is plain
data in ``state.py`` (its checkpoint is that data as JSON), and what the LLM does is ``llm.py``.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.errors import ConfigError
from fedbridge.methods.base import POLL_SECONDS, AggregatorAxis, Method, RejectedReply, Session, mean_over_silos
from fedbridge.methods.crosslm.config import CHECKPOINT_STEP, SERVER_ENHANCE_EPOCHS, CrossLMConfig
from fedbridge.methods.crosslm.llm import ServerLLM, crosslm_prompts
from fedbridge.methods.crosslm.messages import ENHANCE, SCORE, TRAIN_PRIVATE, UPLOAD
from fedbridge.methods.crosslm.state import Batch, CrossLMState, Generated, Progress
from fedbridge.methods.selection import select_balanced
from fedbridge.methods.votes import compose_privacy
from fedbridge.models.embedding import embed
from fedbridge.models.loading import ModelSpecError, load_slm
from fedbridge.models.reward import AGGREGATIONS, aggregate_probabilities
from fedbridge.models.slm import SLM, predict_proba, train_classifier
from fedbridge.tasks import Examples

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ selection


def select_examples(labels: list[int] | tuple[int, ...], rewards: np.ndarray, max_examples: int, min_reward: float,
                    embeddings: np.ndarray | None = None, diversity: float = 0.0) -> list[int]:
    """Up to ``max_examples`` indices with reward above ``min_reward``, label-balanced and diverse by cosine
    similarity of their embeddings (``select_balanced``: high reward first, but not the same thing twice)."""
    similarity = None if embeddings is None else (
        lambda i, chosen: float(np.max(embeddings[chosen] @ embeddings[i])))
    return select_balanced(labels, rewards, max_examples, eligible=np.flatnonzero(rewards > min_reward).tolist(),
                           similarity=similarity, diversity=diversity)


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
    note = ("crosslm: crosslm.scores=slm: silo scores of server-written text leave the silos without DP noise (no "
            "formal privacy guarantee)")

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.options = from_flat(CrossLMConfig, cfg.method_options, "crosslm")  # bad crosslm.* keys fail up front
        if cfg.slm.private and self.options.with_private and self.options.score_on == "silo":
            raise ConfigError("slm.dp-epsilon with crosslm.with-private=true would fine-tune each silo's DP SLM on its "
                              "private data again every round. Set crosslm.with-private=false.")
        if cfg.slm.private and self.options.scores == "dp-votes":
            raise ConfigError("slm.dp-epsilon makes the SLM's scores DP already: set crosslm.scores=slm with it "
                              "(crosslm.scores=dp-votes releases votes of the private data instead).")
        if cfg.slm.private or self.options.scores == "dp-votes":
            self.note = None  # DP votes, or post-processing of DP SLMs: the record's privacy field has their ε

    def non_private(self) -> tuple[str, ...]:
        if self.cfg.slm.private or self.options.scores == "dp-votes":  # (dp-votes needs score-on=silo: config)
            return ()
        return ("SLM scores", *(("SLM weights",) if self.options.score_on == "server" else ()))

    def run(self, session: Session) -> None:
        _Run(self.cfg, self.options, session).run()


class _Run:
    """One CrossLM run's scheduler: the push/pull loop and the per-silo steps. What it knows is ``self.state``
    (plain data, checkpointed as JSON), what the LLM does is ``self.llm``."""

    def __init__(self, cfg: ExperimentConfig, opts: CrossLMConfig, session: Session) -> None:
        self.cfg, self.opts, self.session, self.record, self.task = cfg, opts, session, session.record, session.task
        self.num_labels = len(self.task.labels)
        self.ttl = opts.ttl or cfg.timeout
        self.pending: dict[str, _Pending] = {}
        self.live: set[int] = set(session.silos)
        self.server_slms: dict[int, SLM] = {}  # score-on=server: the server's copies of the silos' SLMs
        self.steps_path = Path(cfg.results_dir) / f"{self.record.run_name}.crosslm-steps.jsonl"
        self.saved = session.checkpoint.done(CHECKPOINT_STEP)  # the earlier attempt's state, when resuming
        self.state = CrossLMState() if self.saved is None else CrossLMState.from_json(self.saved)
        self.llm: ServerLLM | None = None

    # -------------------------------------------------------------- run

    def run(self) -> None:
        session, opts = self.session, self.opts
        if opts.score_on == "server":
            self.record.notes.append("crosslm: score-on=server: silos uploaded their SLM weights to the server "
                                     "(weaker privacy than score-on=silo, where only probabilities leave a silo)")
        if self.saved is None:
            self.steps_path.unlink(missing_ok=True)  # an earlier attempt's steps are not this run's
        self.start_silos()  # silos work while the server loads and evaluates its LLM
        with session.phase("server-llm-load"):
            self.llm = ServerLLM(self.cfg, opts, self.task, self.steps_path, session.device)
            eval_set, passages = self.llm.evaluation_data(session.global_test)
        if self.saved is None:
            with session.phase("llm-eval-before"):
                self.state.before = self.llm.evaluate(eval_set, passages)
        else:
            self.restore(self.saved)
        with session.phase("crosslm-rounds"):
            self.run_async() if opts.mode == "async" else self.run_sync()
        if not any("global-test.accuracy" in m for m in self.record.silo_metrics.values()):
            raise self.session.no_silo_completed("a CrossLM round")
        with session.phase("llm-eval-after"):
            after = self.llm.evaluate(eval_set, passages)
        self.finish(self.state.before, after)

    def start_silos(self) -> None:
        """The first request to every silo not trained yet: train its SLM on its private data."""
        for node in sorted(self.live):
            if self.session.silo_name(node) not in self.state.progress:
                self.train_private(node)

    def train_private(self, node: int) -> None:
        self.push(node, TRAIN_PRIVATE, 0, p.request({"round": 0}, global_test=self.session.global_test))

    def progress(self, node: int) -> Progress:
        return self.state.progress[self.session.silo_name(node)]

    def run_async(self) -> None:
        for node in sorted(self.live):  # a resumed run: trained silos go on where they were
            if self.session.silo_name(node) in self.state.progress:
                self.advance(node, "resume")
        for pend, content in self.replies():
            self.on_reply(pend, content)

    def on_reply(self, pend: _Pending, content: RecordDict) -> None:
        """Async: one silo's reply, and that silo's next request."""
        node, r = pend.node, pend.round
        if pend.message_type == TRAIN_PRIVATE:
            self.on_trained(node, content)
            self.advance(node, TRAIN_PRIVATE)
        elif pend.message_type == UPLOAD:
            if self.on_uploaded(pend, content):
                self.advance(node, UPLOAD)
        elif pend.message_type == SCORE:
            if (probs := self.read_scores(pend, content)) is not None:
                self.process(node, r, probs, SCORE)
        elif pend.message_type == ENHANCE:
            self.on_enhanced(node, r, content)
            self.advance(node, ENHANCE)

    def advance(self, node: int, trigger: str) -> None:
        """Async: send a silo its next request, from its progress (fresh, or restored from the checkpoint)."""
        prog = self.progress(node)
        if self.opts.score_on == "server" and node not in self.server_slms:
            self.push(node, UPLOAD, prog.enhanced, p.request({"round": prog.enhanced}))
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
                enhanced = self.progress(node).enhanced
                self.push(node, UPLOAD, enhanced, p.request({"round": enhanced}))
            for pend, content in self.replies():
                self.on_uploaded(pend, content)
        for r in range(1, self.opts.rounds + 1):
            todo = [node for node in sorted(self.live) if self.progress(node).enhanced < r]
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
                self.progress(node).scored = r
            self.save()
            for node in ready:
                self.session.event(node, "processed", SCORE, r)
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
                cap = p.MAX_REPLY_BYTES if pend.message_type == UPLOAD else p.MAX_EXAMPLES_REPLY_BYTES
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
        self.state.progress[self.session.silo_name(node)] = Progress()
        self.session.event(node, "processed", TRAIN_PRIVATE, 0)
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
                             options=self.cfg.slm, device=self.session.device)
        except (p.ProtocolError, ModelSpecError, RuntimeError) as err:
            self.drop(pend, f"rejected: unusable SLM upload: {err}")
            return False
        self.server_slms[pend.node] = model
        self.state.slm_specs[self.session.silo_name(pend.node)] = spec
        self.session.checkpoint.save_arrays(f"slm/{self.session.silo_name(pend.node)}", model.trainable_state())
        self.session.save_contribution(pend.node, "slm-upload", 0, spec=spec, bytes=p.payload_bytes(content))
        self.session.event(pend.node, "processed", UPLOAD, 0)
        return True

    def read_scores(self, pend: _Pending, content: RecordDict) -> np.ndarray | None:
        """A silo's scores of a batch (with scores=dp-votes, also what the release cost, kept in the record)."""
        try:
            probs = p.read_probabilities(content, p.SCORES, len(self.state.batches[pend.round - 1].examples),
                                         self.num_labels)
            privacy = p.read_privacy(content) if self.opts.scores == "dp-votes" else None
        except p.ProtocolError as err:
            self.drop(pend, f"rejected: {err}")
            return None
        if privacy is not None:
            self.keep_score_privacy(pend.node, privacy)
        return probs

    def keep_score_privacy(self, node: int, privacy: dict) -> None:
        """The silo's privacy entry after a DP score release, composed with the pipeline's DP demonstrations."""
        silo = self.session.silo_name(node)
        self.record.privacy = self.record.privacy or {}
        self.record.privacy[silo] = compose_privacy(self.record.privacy.get(silo), privacy)

    def server_scores(self, node: int, round_: int) -> np.ndarray:
        return predict_proba(self.server_slms[node], self.batch(round_).texts)

    def score_request(self, batch: Batch) -> RecordDict:
        votes = ({"epsilon": self.opts.epsilon, "releases": self.opts.rounds, "k": self.opts.vote_k,
                  "noise-seed": self.opts.noise_seed}
                 if self.opts.scores == "dp-votes" else {})
        return p.request({"round": batch.index, **votes},
                         examples=p.examples_record(Examples.of(batch.texts, batch.labels)))

    def request_scores(self, node: int, round_: int) -> None:
        self.push(node, SCORE, round_, self.score_request(self.batch(round_)))

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
        self.progress(node).scored = round_
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
        self.progress(node).enhanced = round_
        if node in self.server_slms:  # score-on=server: the server's copy, as of the round the silo confirmed
            self.session.checkpoint.save_arrays(f"slm/{self.session.silo_name(node)}",
                                                self.server_slms[node].trainable_state())
        self.session.event(node, "processed", ENHANCE, round_)
        self.save()

    # -------------------------------------------------------------- server work

    def batch(self, round_: int) -> Batch:
        """Batch ``round_``, written by the current LLM the first time a silo needs it."""
        state = self.state
        while len(state.batches) < round_:
            index = len(state.batches) + 1
            with self.session.phase("server-generate"):
                examples = self.write_batch(index)
            state.batches.append(Batch(index, state.version, examples))
            log.info("crosslm: batch %d written by LLM version %d: %d examples", index, state.version, len(examples))
        return state.batches[round_ - 1]

    def write_batch(self, index: int) -> list[Generated]:
        """Batch ``index``, written by the current LLM from CrossLM's own prompts."""
        seed = self.cfg.seed * 1000 + index
        prompts, labels = crosslm_prompts(self.task, self.opts.per_label, random.Random(seed))
        return self.llm.write(prompts, labels, self.state.history, seed, self.state.stats, self.state.counts)

    def learn(self, batch: Batch, rewards: np.ndarray, silo: str, steps: int) -> None:
        """Update the LLM on the batch's combined rewards, unless too few silos scored it or it is too stale."""
        state = self.state
        needed = min(self.opts.min_scorers, max(1, len(self.live)))
        if len(batch.scores) < needed:
            state.counts["waiting-for-scorers"] += 1
            return
        staleness = state.version - batch.version
        if staleness > self.opts.max_staleness:
            state.counts["stale-contributions"] += 1
            log.info("crosslm: %s's rewards on batch %d are %d LLM updates stale (max %d): not used for the LLM",
                     silo, batch.index, staleness, self.opts.max_staleness)
            return
        with self.session.phase("server-llm-update"):
            updated = self.llm.update(batch, rewards, silo, steps, state.version)
        if updated:
            state.version += 1
            state.counts["llm-updates"] += 1
            self.record.artifacts["crosslm-steps"] = str(self.steps_path)

    def send_enhancement(self, node: int, batch: Batch, rewards: np.ndarray) -> None:
        """Select this silo's examples from the batch and send them (or, score-on=server, the weights enhanced on
        them). A resumed run may send a silo's round again: counted once, by (silo, round)."""
        opts = self.opts
        if opts.diversity and batch.embeddings is None and batch.examples:
            batch.embeddings = embed(batch.texts, device=self.session.device)
        chosen = select_examples(batch.labels, rewards, opts.select_max, opts.min_reward, batch.embeddings,
                                 opts.diversity)
        self.state.selected[f"{self.session.silo_name(node)}/{batch.index}"] = len(chosen)
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
        self.push(node, ENHANCE, batch.index, content)

    # -------------------------------------------------------------- checkpoint

    def save(self) -> None:
        """Checkpoint the run: the LLM side (its adapter and optimizer once per version), then the state as the
        step's JSON."""
        ckpt, version = self.session.checkpoint, self.state.version
        ckpt.complete(CHECKPOINT_STEP, **self.llm.save(ckpt, version), **self.state.to_json())
        self.llm.saved(ckpt, version)

    def restore(self, saved: dict) -> None:
        """Go on from the earlier attempt's checkpoint: the LLM as it was (the state was read at the start), and the
        server's copies of uploaded SLMs as of each silo's last round."""
        ckpt = self.session.checkpoint
        self.llm.restore(ckpt, saved)
        for node, silo in self.session.silos.items():
            if silo in self.state.slm_specs and (arrays := ckpt.load_arrays(f"slm/{silo}")) is not None:
                self.server_slms[node] = load_slm(self.state.slm_specs[silo], self.num_labels, self.cfg.seed, arrays,
                                                  self.cfg.slm, self.session.device)
        log.info("crosslm: resumed at LLM version %d with %d batches; silo progress %s", self.state.version,
                 len(self.state.batches), self.state.to_json()["progress"])

    # -------------------------------------------------------------- the record

    def silo_metrics(self, node: int) -> dict[str, float]:
        return self.record.silo_metrics.setdefault(self.session.silo_name(node), {})

    def finish(self, before: dict[str, float], after: dict[str, float]) -> None:
        record, server, state, steps = self.record, self.record.server_metrics, self.state, self.llm.trainer.log
        server.update({f"crosslm.llm-before.{k}": v for k, v in before.items()})
        server.update({f"crosslm.llm-after.{k}": v for k, v in after.items()})
        server.update({f"crosslm.{k}": v for k, v in sorted(state.counts.items())})
        server["crosslm.selected"] = sum(state.selected.values())
        server["crosslm.llm-version"] = state.version
        server["crosslm.llm-steps"] = len(steps)
        server["crosslm.batches"] = len(state.batches)
        for key in ("loss", "quality", "task", "kl", "seconds"):
            values = [s[key] for s in steps if key in s]
            if values:
                server.update({f"crosslm.step-first.{key}": values[0], f"crosslm.step-last.{key}": values[-1],
                               f"crosslm.step-mean.{key}": float(np.mean(values))})
        rewards = [batch.rewards(self.opts.aggregate, self.opts.trim) for batch in state.batches if batch.scores]
        if rewards and (flat := np.concatenate(rewards)).size:
            server["crosslm.mean-reward"] = float(flat.mean())
            server["crosslm.positive-reward-share"] = float((flat > 0).mean())
        record.tokens["prompt"] += state.stats.prompt_tokens
        record.tokens["generated"] += state.stats.generated_tokens
        mean_over_silos(record)
        for split, prefix in (("global-test", ""), ("silo-test", "silo_test_")):
            for metric in ("accuracy", "macro_f1"):
                values = [m[f"before.{split}.{metric}"] for m in record.silo_metrics.values()
                          if f"before.{split}.{metric}" in m]
                if values:
                    record.global_metrics[f"before_{prefix}{metric}"] = float(np.mean(values))
