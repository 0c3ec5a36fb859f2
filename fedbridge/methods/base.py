"""What every fedbridge method shares on the server: the run session, metered messaging, and the run record.

A method is a class with a ``run(session)``; the session gives it the silos, the global test set, a
timeout-aware ``exchange`` with error handling, phase timing, and the record it fills in.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedbridge import protocol as p
from fedbridge.checkpoint import Checkpoint
from fedbridge.config import ExperimentConfig
from fedbridge.errors import ConfigError, SiloFailure
from fedbridge.results import RunRecord, contributions_path
from fedbridge.tasks import Examples, Task, load_federation, load_task

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2


class MeteredGrid(Grid):
    """A Grid that counts the serialised bytes of every message, by round (group id) and message type."""

    def __init__(self, inner: Grid, record: RunRecord) -> None:
        self.inner, self.record = inner, record
        self.received_bytes: dict[str, int] = {}  # message id -> size of each received message, until a reader takes it

    def _meter(self, messages: Iterable[Message], direction: str) -> list[Message]:
        messages = list(messages)
        comm = self.record.communication
        for msg in messages:
            if not msg.has_content():
                continue
            n = p.payload_bytes(msg.content)
            if direction == "received":
                self.received_bytes[msg.metadata.message_id] = n
            comm[f"bytes_{direction}"] += n
            rnd = comm["by_round"].setdefault(msg.metadata.group_id or "0", {"sent": 0, "received": 0})
            rnd[direction] += n
            kind = comm["by_message_type"].setdefault(msg.metadata.message_type, {"sent": 0, "received": 0})
            kind[direction] += n
        return messages

    def set_run(self, run_id: int) -> None:
        self.inner.set_run(run_id)

    @property
    def run(self):  # noqa: ANN201 - mirrors Grid.run
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(self._meter(messages, "sent"))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._meter(self.inner.pull_messages(message_ids), "received")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._meter(self.inner.send_and_receive(self._meter(messages, "sent"), timeout=timeout), "received")


class RejectedReply(Exception):
    """A reply a method must not use: an error reply, or one over its size cap or that its parser refuses."""


@dataclass
class Session:
    """One run on the server: the silos, the global test set, metered messaging, phase timing, the record it
    fills in, and the checkpoint a restarted run resumes from.

    Every reply is validated before a method sees it. ``replies``, ``iter_replies``, ``exchange`` and ``broadcast``
    take ``parse``, a function of the reply content that returns what the method needs or raises
    ``ProtocolError`` (default ``p.read_reply``: the content, once its metrics record is valid), and ``max_bytes``
    (default ``p.MAX_REPLY_BYTES``). A reply over the size cap or failing ``parse`` is recorded as a failure of
    its silo (reason ``rejected: ...``, logged and kept in ``record.failures``) and skipped, like an error reply or
    a timeout, so one broken or hostile silo neither aborts the run nor reaches the other silos' results::

        parse = lambda c: (p.read_examples(c, p.EXAMPLES, len(labels)), p.read_privacy(c))
        for node, (examples, privacy) in session.iter_replies("query.synthesize", requests, round_=1, parse=parse):
            ...

    ``checkpoint`` (``fedbridge.checkpoint.Checkpoint``) keeps completed steps for ``resume=true``; every request
    carries its experiment id as ``config["experiment"]``, which silos key their persistent state on.
    """

    grid: MeteredGrid
    cfg: ExperimentConfig
    record: RunRecord
    task: Task
    global_test: Examples
    checkpoint: Checkpoint
    silos: dict[int, str] = field(default_factory=dict)  # node id -> silo name
    started: float = field(default_factory=time.monotonic)

    @functools.cached_property
    def device(self) -> torch.device:
        """Where the server's models run (``device.server``, resolved on this machine)."""
        return self.cfg.device.for_server()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.record.seconds[name] = self.record.seconds.get(name, 0.0) + time.perf_counter() - t0

    def silo_name(self, node_id: int) -> str:
        return self.silos.get(node_id, f"node-{node_id}")

    def event(self, node_id: int, event: str, message_type: str, round_: int) -> None:
        """Append to the silo's timeline (sent / received / failed are logged by push and replies; methods add
        'processed' when they have used a reply)."""
        self.record.timelines.setdefault(self.silo_name(node_id), []).append(
            {"event": event, "message_type": message_type, "round": round_,
             "t": round(time.monotonic() - self.started, 3)})

    def fail(self, node_id: int, message_type: str, round_: int, reason: str) -> None:
        silo = self.silo_name(node_id)
        log.warning("%s failed %s (round %d): %s", silo, message_type, round_, reason)
        self.record.failures.append({"silo": silo, "message_type": message_type, "round": round_, "reason": reason})
        self.event(node_id, "failed", message_type, round_)

    def save_contribution(self, node_id: int | None, kind: str, round_: int, examples: Examples | None = None,
                          **extra: Any) -> None:
        """Keep what a silo sent (synthetic examples, instructions, ...) beside the run record, one JSON line each,
        written as it arrives so a crash loses nothing; ``fedbridge audit`` reads it back. ``node_id=None``: what
        the server made and sent (e.g. FDKT's augmented sets), as ``"silo": "server"``, which the audit skips."""
        path = contributions_path(self.cfg.results_dir, self.record.run_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        line = {"silo": "server" if node_id is None else self.silo_name(node_id), "kind": kind, "round": round_,
                **extra}
        if examples is not None:
            line |= {"texts": list(examples.texts), "labels": list(examples.labels)}
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.record.artifacts["contributions"] = str(path)

    def discover(self) -> dict[int, str]:
        """Wait for the silos' nodes to connect, then ask each for its partition id and data sizes."""
        want, deadline = self.cfg.partition.num_silos, time.monotonic() + min(self.cfg.timeout, 300.0)
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(self.grid.get_node_ids())
        if not nodes:
            raise RuntimeError("No silo connected before the timeout. Start the SuperNodes, or raise 'timeout'.")
        if len(nodes) < want:
            self.record.notes.append(f"only {len(nodes)} of {want} silos connected")
        replies = self.exchange(p.INFO, {n: p.request() for n in nodes}, by_node=True, parse=p.read_info)
        self.silos = {}
        for node, info in replies.items():
            name = f"silo-{info['partition-id']}"
            if name in self.silos.values():  # two nodes cannot hold one partition: keep the first to answer
                self.fail(node, p.INFO, 0, f"rejected: partition-id {info['partition-id']} is another node's")
                continue
            self.silos[node] = name
            self.record.silo_metrics.setdefault(name, {}).update(
                {k: v for k, v in info.items() if k.startswith("num-")})
            # its info exchange was logged under the node id: it belongs at the end of the silo's timeline
            self.record.timelines.setdefault(name, []).extend(self.record.timelines.pop(f"node-{node}", []))
        if not self.silos:
            raise RuntimeError("Every silo failed its info query; see the failures in the run record.")
        if withheld := sorted(s for s in self.silos.values() if not self.record.silo_metrics[s].get("num-train")):
            self.record.notes.append(f"{', '.join(withheld)}: num-train and num-test 0 mean withheld, not empty: a "
                                     "silo whose policy allows no non-private release (strict) sends no exact example "
                                     "counts (they grow with its private data)")
        return self.silos

    def push(self, message_type: str, contents: Mapping[int, RecordDict], round_: int = 0,
             timeout: float | None = None) -> dict[str, int]:
        """Send one message per node without waiting; returns {message id: node id} for ``replies``."""
        ttl = self.cfg.timeout if timeout is None else timeout
        for content in contents.values():
            if p.CONFIG in content:
                content[p.CONFIG][p.EXPERIMENT] = self.checkpoint.experiment
        msgs = [Message(content, dst_node_id=node, message_type=message_type, group_id=str(round_), ttl=ttl)
                for node, content in contents.items()]
        ids = dict(zip(self.grid.push_messages(msgs), contents))
        for node in contents:
            self.event(node, "sent", message_type, round_)
        return ids

    def replies(self, pending: dict[str, int], message_type: str, round_: int = 0, timeout: float | None = None,
                parse: Callable[[RecordDict], Any] = p.read_reply,
                max_bytes: int = p.MAX_REPLY_BYTES) -> Iterator[tuple[int, Any]]:
        """Yield (node id, ``parse(reply content)``) as replies arrive, in arrival order.

        Error replies, silos that do not answer within the timeout, and replies over ``max_bytes`` or that ``parse``
        rejects (ProtocolError) are recorded as failures and skipped.
        """
        for batch in self.reply_batches(pending, message_type, round_, timeout, parse, max_bytes):
            yield from batch

    def reply_batches(self, pending: dict[str, int], message_type: str, round_: int = 0,
                      timeout: float | None = None, parse: Callable[[RecordDict], Any] = p.read_reply,
                      max_bytes: int = p.MAX_REPLY_BYTES) -> Iterator[list[tuple[int, Any]]]:
        """``replies``, grouped: every valid reply that had arrived when the server looked, together. A server that
        is busy while several silos answer then handles them in one pass (FDKT's LLM batches across them)."""
        pending, timeout = dict(pending), self.cfg.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            batch = []
            for reply in self.grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                try:
                    batch.append((node, self.accept(node, reply, message_type, round_, parse, max_bytes)))
                except RejectedReply as rejected:
                    self.fail(node, message_type, round_, str(rejected))
            if batch:
                yield batch
            if pending:
                time.sleep(POLL_SECONDS)
        for node in pending.values():
            self.fail(node, message_type, round_, f"no reply within {timeout:.0f} s")

    def iter_replies(self, message_type: str, contents: Mapping[int, RecordDict], round_: int = 0,
                     timeout: float | None = None, parse: Callable[[RecordDict], Any] = p.read_reply,
                     max_bytes: int = p.MAX_REPLY_BYTES) -> Iterator[tuple[int, Any]]:
        return self.replies(self.push(message_type, contents, round_, timeout), message_type, round_, timeout,
                            parse, max_bytes)

    def exchange(self, message_type: str, contents: Mapping[int, RecordDict], round_: int = 0,
                 by_node: bool = False, parse: Callable[[RecordDict], Any] = p.read_reply,
                 max_bytes: int = p.MAX_REPLY_BYTES) -> dict:
        """Send and wait for every (valid) reply; keyed by silo name (or node id with ``by_node``)."""
        replies = dict(self.iter_replies(message_type, contents, round_, parse=parse, max_bytes=max_bytes))
        return replies if by_node else {self.silos[n]: r for n, r in replies.items()}

    def broadcast(self, message_type: str, content: RecordDict, round_: int = 0,
                  parse: Callable[[RecordDict], Any] = p.read_reply, max_bytes: int = p.MAX_REPLY_BYTES) -> dict:
        return self.exchange(message_type, {n: content for n in self.silos}, round_, parse=parse, max_bytes=max_bytes)

    def accept(self, node_id: int, reply: Message, message_type: str, round_: int,
               parse: Callable[[RecordDict], Any] = p.read_reply, max_bytes: int = p.MAX_REPLY_BYTES) -> Any:
        """The one check every reply passes before a method uses it (``replies``, FedAvg's rounds, CrossLM's loop):
        not an error reply, within ``max_bytes``, accepted by ``parse``; a DP SLM's privacy report it carries
        becomes the silo's privacy entry (its ε is the run's total for SLM training on that silo, the latest
        report's). Returns ``parse(content)``, or raises ``RejectedReply`` with the reason to record."""
        size = self.grid.received_bytes.pop(reply.metadata.message_id, None)
        if reply.has_error():
            raise RejectedReply(reply.error.reason)
        try:
            p.check_size(reply.content, max_bytes, size)
            parsed = parse(reply.content)
            dp_slm = p.read_slm_privacy(reply.content)
        except p.ProtocolError as err:
            raise RejectedReply(f"rejected: {err}") from None
        if dp_slm:
            self.record.privacy = self.record.privacy or {}
            self.record.privacy[self.silo_name(node_id)] = {**dp_slm, "epsilon": dp_slm["epsilon-total"]}
        self.event(node_id, "received", message_type, round_)
        return parsed

    def no_silo_completed(self, step: str) -> SiloFailure:
        """The error that ends a run when no silo completed ``step``, with their reason when they share one (a model
        or data file every silo fails to load; reasons that differ only in a silo's name or numbers count as one),
        so the user reads the cause, not a count. Refusals (a silo's policy or privacy budget) read as refusals.
        Where the run's checkpoint is kept, the message says whether to resume from it or delete it."""
        reasons = [f["reason"] for f in self.record.failures]
        refusals = [refusal_reason(r) for r in reasons]
        if reasons and all(refusals):
            others = len({_shape(r) for r in refusals}) - 1
            cause = f": every silo refused: {refusals[0]}" + (
                f" (and {others} other reason{'s' * (others > 1)}: see the record's failures)" if others else "")
        elif reasons and len({_shape(r) for r in reasons}) == 1:
            cause = f": every silo failed with {reasons[0]}"
        else:
            cause = "; every one failed or timed out (see the record's failures)"
        note = _checkpoint_note(getattr(self, "checkpoint", None))
        return SiloFailure(f"No silo completed {step}{cause}".rstrip(".") + note if note else
                           f"No silo completed {step}{cause}")

    def record_silo_metrics(self, replies: Mapping[str, RecordDict]) -> None:
        """Store each silo's reported metrics; a step that no silo completed fails the run (never an empty 'ok')."""
        if not replies:
            raise self.no_silo_completed("this step")
        for silo, reply in replies.items():
            metrics = {k: v for k, v in reply[p.METRICS].items() if k != "partition-id"}
            self.record.silo_metrics.setdefault(silo, {}).update(metrics)


REFUSALS = ("SiloRefusal", "PolicyRefusal", "PrivacyBudgetExceeded")  # fedbridge.errors: a silo's deliberate "no"
_ERROR_REASON = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>:<'(.*)'>|(\w+): (.*)", re.S)


def refusal_reason(reason: str) -> str | None:
    """The silo's own words where a failure's ``reason`` is a refusal, in either form the server receives it:
    fedbridge's (``PolicyRefusal: ...``) or Flower's runtime's (``<class '...PolicyRefusal'>:<'...'>``); else None."""
    match = _ERROR_REASON.fullmatch(reason)
    if not match:
        return None
    name, text = (match[1], match[2]) if match[1] else (match[3], match[4])
    return text if name in REFUSALS else None


def _shape(reason: str) -> str:
    """A reason without what differs between silos alike: silo names and numbers."""
    return re.sub(r"silo-\d+|\d+(?:\.\d+)?(?:e[-+]?\d+)?", "#", reason)


def _checkpoint_note(checkpoint: Checkpoint | None) -> str:
    """What the operator may do with the checkpoint a failed run leaves beside its record (kept for resume=true)."""
    if checkpoint is None or not checkpoint.directory.exists():
        return ""
    steps, name = len(checkpoint.steps()), checkpoint.record.run_name
    if not steps:
        return (f". Its checkpoint {checkpoint.directory} holds no completed step: safe to delete (a rerun without "
                "resume=true replaces it)")
    return (f". Its checkpoint {checkpoint.directory} keeps {steps} completed steps: rerun with resume=true "
            f"run-name={name} to continue from them, or delete it to start over")


@dataclass(frozen=True)
class AggregatorAxis:
    """The config key of the rule by which a method combines its silos' contributions, and the rule's choices: one
    axis of comparison (``fedbridge compare --sweep aggregator=...``)."""

    key: str
    choices: tuple[str, ...]
    one_run: bool = False  # the key takes a comma list: one run evaluates every listed aggregator on the same data


class Method(ABC):
    """A fedbridge method: what the server does in one run. Subclasses set ``name`` and ``description``."""

    name: ClassVar[str]
    description: ClassVar[str]
    note: ClassVar[str | None] = None  # a caveat every record of this method carries
    sections: ClassVar[tuple[str, ...]] = ()  # the config sections it reads besides its own (``fdkt`` for a method
    # built on FDKT's demonstrations)
    aggregator: ClassVar[AggregatorAxis | None] = None  # how it combines silos' contributions, where it has a choice
    dp_slm: ClassVar[bool] = False  # whether its silos can train a DP SLM (slm.dp-epsilon): what it shares is the
    # SLM or its outputs, or (local) the SLM alone, to measure what DP costs

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        if cfg.slm.private and not self.dp_slm:
            usable = ", ".join(sorted(m.name for m in Method.__subclasses__() if m.dp_slm))
            raise ConfigError(f"slm.dp-epsilon={cfg.slm.dp_epsilon:g} applies to methods that share the SLM or its "
                              f"outputs ({usable}); '{self.name}' releases other things, accounted by its own "
                              "options. Set slm.dp-epsilon=inf.")

    def non_private(self) -> tuple[str, ...]:
        """What this method has silos release without DP (for example its SLM weights), labelled ε = ∞ in every
        record and table. The silo-test metrics every method reports are the harness's measurement, not counted
        here: the comparison table's legend says so."""
        return ()

    @abstractmethod
    def run(self, session: Session) -> None:
        """Run the method, filling ``session.record``'s metrics."""


def label_non_private(record: RunRecord, kinds: tuple[str, ...]) -> None:
    """Mark every silo's privacy entry ε = ∞ where the method released ``kinds`` without DP: a DP release beside
    a non-private one of the same data keeps no finite guarantee, and the record says which parts were which."""
    if not kinds:
        return
    record.privacy = record.privacy or {}
    what = ", ".join(kinds)
    for silo in sorted(set(record.silo_metrics) | set(record.privacy)) or ["every silo"]:
        dp = record.privacy.get(silo) or {}
        if "non-private" in dp:  # labelled already (a resumed run's record)
            continue
        mechanism = " + ".join(m for m in (dp.get("mechanism"), f"{what} (non-private)") if m)
        record.privacy[silo] = {**dp, "mechanism": mechanism, "epsilon": math.inf, "epsilon-total": math.inf,
                                "budget": math.inf, "private": False, "non-private": what,
                                **({"epsilon-dp": dp["epsilon"]} if "epsilon" in dp else {})}


def mean_over_silos(record: RunRecord) -> None:
    """Means over silos: of each silo model's global-test scores (methods with one model per silo), and of
    every silo's own-test scores (all methods)."""
    for split, prefix in (("global-test", ""), ("silo-test", "silo_test_")):
        for metric in ("accuracy", "macro_f1"):
            values = [m[f"{split}.{metric}"] for m in record.silo_metrics.values() if f"{split}.{metric}" in m]
            if values:
                record.global_metrics[f"{prefix}{metric}"] = float(np.mean(values))
    sizes = [m["global-test.n"] for m in record.silo_metrics.values() if "global-test.n" in m]
    if sizes:
        record.global_metrics["n"] = sizes[0]


def default_run_name(cfg: ExperimentConfig) -> str:
    task = cfg.task.name.rsplit("/", 1)[-1].split(".")[0]
    return cfg.run_name or f"{cfg.method}-{task}-s{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"


def server_task(cfg: ExperimentConfig) -> tuple[Task, Examples]:
    """The task and the server's global held-out test set (the same split simulation silos exclude)."""
    return load_task(cfg.task, cfg.seed), load_federation(cfg.task, cfg.partition, cfg.seed).global_test
