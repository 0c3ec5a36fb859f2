"""The pipeline fedbridge was designed for: DP demonstrations → LLM writing seeded by them → silo SLM scores →
filtered examples (and the LLM's update under the KL leash) → each silo's enhanced SLM, asynchronously.

It chains FDKT's first half and CrossLM's second, per silo:
  1. ``query.synthesize`` (FDKT's silo side, ``fdkt.*``): the silo releases DP few-shot (or DP-SGD)
     demonstrations with their ε; then ``train.private``: it trains its SLM on its private data.
  2. Batch b is written when the first silo needs it, from every demonstration received by then: the LLM filters
     them per label and writes ``crosslm.per-label`` new examples per label, each prompt seeded by 1-2 kept
     demonstrations (FDKT's augmentation, ``fedbridge.methods.seeding``), length-filtered and deduplicated.
  3. From here it is CrossLM's loop (``crosslm.*``): silos score the batch (only probabilities leave), the combined
     rewards update the LLM under the KL leash and select the examples that enhance each silo's SLM, and a silo's
     next round starts as soon as its enhancement is back, whatever the others do.
The demonstrations are accounted (ε per silo); the scores are not DP, so every record labels them ε = ∞ beside
the demonstrations' ε. Resume: demonstrations are checkpointed as they arrive and never asked for again; the rest
is CrossLM's checkpoint.
"""

from __future__ import annotations

import random

from flwr.app import RecordDict

from fedbridge import protocol as p
from fedbridge.config import ExperimentConfig, from_flat
from fedbridge.methods.base import Session
from fedbridge.methods.crosslm.config import CrossLMConfig
from fedbridge.methods.crosslm.server import CrossLM, _Pending, _Run
from fedbridge.methods.crosslm.state import Generated
from fedbridge.methods.fdkt.config import FDKTConfig
from fedbridge.methods.fdkt.messages import SYNTHESIZE
from fedbridge.methods.seeding import filter_demonstrations, keep_demonstrations, read_demonstrations, seeded_prompts
from fedbridge.tasks import Examples


class Pipeline(CrossLM):
    name = "pipeline"
    description = "Pipeline: DP demonstrations seed the LLM's writing; silo SLMs score it; enhanced SLMs, async"
    sections = ("fdkt", "crosslm")
    dp_slm = False
    note = ("pipeline: crosslm.scores=slm: silo scores of server-written text leave the silos without DP noise; only "
            "the demonstrations carry an ε")

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__(cfg)
        self.fdkt = from_flat(FDKTConfig, cfg.method_options, "fdkt")
        self.note = Pipeline.note if self.options.scores == "slm" else None

    def run(self, session: Session) -> None:
        _PipelineRun(self.cfg, self.options, self.fdkt, session).run()


class _PipelineRun(_Run):
    def __init__(self, cfg: ExperimentConfig, opts: CrossLMConfig, fdkt: FDKTConfig, session: Session) -> None:
        super().__init__(cfg, opts, session)
        self.fdkt = fdkt
        ckpt = session.checkpoint
        self.demos = {step.split("/", 1)[1]: ckpt.load_examples(step) for step in ckpt.steps("demonstrations/")}

    def start_silos(self) -> None:
        for node in sorted(self.live):
            silo = self.session.silo_name(node)
            if silo not in self.demos:
                self.push(node, SYNTHESIZE, 0, p.request())
            elif silo not in self.state.progress:
                self.train_private(node)

    def on_demonstrations(self, pend: _Pending, content: RecordDict) -> None:
        """A silo's DP demonstrations: kept (checkpointed, never asked for again), then its SLM's training."""
        try:
            examples, privacy, metrics = read_demonstrations(content, self.num_labels)
        except p.ProtocolError as err:
            self.drop(pend, f"rejected: {err}")
            return
        self.demos[self.session.silo_name(pend.node)] = examples
        keep_demonstrations(self.session, pend.node, 0, examples, privacy, metrics)
        self.session.event(pend.node, "processed", SYNTHESIZE, 0)
        self.train_private(pend.node)

    def on_reply(self, pend: _Pending, content: RecordDict) -> None:
        if pend.message_type == SYNTHESIZE:
            self.on_demonstrations(pend, content)
        else:
            super().on_reply(pend, content)

    def on_setup(self, pend: _Pending, content: RecordDict) -> None:
        if pend.message_type == SYNTHESIZE:
            self.on_demonstrations(pend, content)
        else:
            super().on_setup(pend, content)

    def write_batch(self, index: int) -> list[Generated]:
        """Batch ``index``: the current LLM filters every demonstration received so far and writes new examples
        seeded by the kept ones."""
        seed = self.cfg.seed * 1000 + index
        sources = sorted(self.demos)
        pool = Examples.of([t for s in sources for t in self.demos[s].texts],
                           [y for s in sources for y in self.demos[s].labels])
        state = self.state
        # the LLM CrossLM trains, as it is now: through the interface over the trained model (ServerLLM.interface)
        kept = filter_demonstrations(self.llm.interface, self.task, pool, self.fdkt.llm_filter, seed, state.stats,
                                     state.counts)
        prompts, labels = seeded_prompts(self.task, kept, self.opts.per_label, self.fdkt.demos_per_prompt,
                                         random.Random(seed))
        state.counts["seeded-batches"] += 1
        return self.llm.write(prompts, labels, state.history, seed, state.stats, state.counts)
