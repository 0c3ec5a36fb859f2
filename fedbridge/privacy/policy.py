"""What a silo lets leave, decided by the silo: its privacy policy (node config) and its lifetime ledger (its disk).

The server is the party a silo must not have to trust, so nothing here comes from the run config. A silo's node
config holds:

  ``privacy``            ``strict`` or ``permissive``; default ``strict`` for a silo that reads its own file
                         (``data-path``: a deployment), ``permissive`` for a simulation partition
  ``epsilon-budget``     lifetime ε for this data, every run and every method composed (strict: 8, permissive: inf)
  ``delta``              the δ every ε of this data is stated at (1e-5)
  ``allow-non-private``  whether anything private-data-derived may leave without DP: an ε = inf release, raw
                         examples, SLM weights, scores or votes of a non-DP model, a server-chosen noise seed, exact
                         example counts (strict: false, permissive: true)
  ``verbatim-filter``    drop teaching text that copies private text before it leaves (strict: true; permissive:
                         unset, which follows the run's social.verbatim-filter; false needs allow-non-private)
  ``noise-seed``         the silo's own seed for the mechanisms' secret draws (reproducible research); default: OS
                         entropy. A seed the *server* sends would let it replay the noise: without allow-non-private
                         that request is refused, with it the release is labelled non-private
  ``metrics-budget``     how many replies, in this data's lifetime, may carry scores of a model on the silo's test split
                         or on the server's texts (accuracy and F1 are counts in disguise: each reply is a query of
                         the private data or of a non-DP model). Past it they are withheld (strict: 20; permissive:
                         unlimited); a strict silo never reports the epoch it chose on private data
  ``count-bound``        a public lower bound on the silo's examples per label, which sets the DP few-shot sampling
                         rate q = M·N / bound instead of the private counts (0: the exact counts, which then leave
                         as a non-private detail; under strict without a bound, q = 1)

A deployed silo's node config also limits what the server may ask it to *run* (``SiloLimits``):

  ``allowed-models``     model specs or directories it loads besides the embedded ones (comma list; default none)
  ``max-epochs``         cap on any SLM epochs a run asks for (default 100)
  ``max-tokens``         cap on any token count a run asks for: generated, read or trained on (default 512)
  ``max-request-texts``  cap on the texts one message may ask it to read (candidates, examples; default 10,000)
  ``max-request-bytes``  cap on one message's size (default 64 MiB)

The ledger (``SiloLedger``) is one file per *data identity*, a content hash of the silo's examples, under the
silo's state dir: it composes every release of that data across runs, experiments and methods, survives restarts,
and charges under a file lock with a fresh read, so concurrent requests (threads or processes) lose no charge. A
run's view (``RunLedger``) also keeps the run within the ε the server asked for.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbridge.checkpoint import atomic_write
from fedbridge.errors import ConfigError, PolicyRefusal, PrivacyBudgetExceeded
from fedbridge.privacy.accounting import PrivacyEvent, PrivacyLedger, compute_epsilon
from fedbridge.protocol import payload_bytes

POLICIES = ("strict", "permissive")
STRICT_BUDGET = 8.0
STRICT_METRICS_BUDGET = 20  # replies with scores on the silo's test split or on the server's texts, per data source
MIN_RELEASE_EPSILON = 0.01  # a remainder this small counts as spent: noise calibration stops up to 0.01 below target


@dataclass(frozen=True)
class SiloPolicy:
    """A silo's own privacy settings (its node config; see the module docstring)."""

    name: str = "permissive"
    epsilon_budget: float = math.inf
    delta: float = 1e-5
    allow_non_private: bool = True
    verbatim_filter: bool | None = None  # None: the run's request (social.verbatim-filter); strict: always True
    noise_seed: int | None = None
    count_bound: int = 0
    metrics_budget: int | None = None  # replies carrying test scores this data may give (None: unlimited)

    def __post_init__(self) -> None:
        if self.verbatim_filter is False and not self.allow_non_private:
            raise ConfigError("Node config verbatim-filter=false needs allow-non-private=true: teaching text that may "
                              "copy private text is a non-private release.")
        if self.name not in POLICIES:
            raise ConfigError(f"Node config privacy='{self.name}': use one of {', '.join(POLICIES)}.")
        if not self.epsilon_budget > 0 or not 0 < self.delta < 1 or self.count_bound < 0:
            raise ConfigError("Node config: epsilon-budget must be > 0 (inf = unlimited), delta in (0, 1), "
                              "count-bound >= 0.")

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> SiloPolicy:
        name = str(node.get("privacy", "strict" if "data-path" in node else "permissive"))
        strict = name == "strict"
        seed = int(node.get("noise-seed", -1))
        return cls(name=name,
                   epsilon_budget=float(node.get("epsilon-budget", STRICT_BUDGET if strict else math.inf)),
                   delta=float(node.get("delta", 1e-5)),
                   allow_non_private=_flag(node, "allow-non-private", not strict),
                   verbatim_filter=_flag(node, "verbatim-filter", True) if strict or "verbatim-filter" in node else None,
                   noise_seed=None if seed < 0 else seed, count_bound=int(node.get("count-bound", 0)),
                   metrics_budget=int(node["metrics-budget"]) if "metrics-budget" in node else
                   STRICT_METRICS_BUDGET if strict else None)

    def require_non_private(self, silo: str, what: str) -> None:
        """Refuse a release without DP unless this silo allows them (the message names the node-config key)."""
        if not self.allow_non_private:
            raise PolicyRefusal(
                f"{silo} refuses {what}: its node config does not allow non-private releases (privacy={self.name}, "
                "allow-non-private=false). Ask for a DP release instead, or set allow-non-private=true in this "
                "silo's node config.")

    def verbatim(self, requested: bool) -> bool:
        """Whether teaching text is filtered for copies of private text: the silo's setting, else the run's."""
        return requested if self.verbatim_filter is None else self.verbatim_filter

    def noise_seed_for(self, silo: str, requested: int) -> tuple[int | None, bool]:
        """(the seed for the mechanism's secret draws, whether the release stays private). A server-chosen seed
        (``requested`` >= 0) lets the server replay the noise: refused, or (allow-non-private) labelled non-private."""
        if requested < 0:
            return self.noise_seed, True
        self.require_non_private(silo, "a noise seed chosen by the server (the server could replay the noise)")
        return requested, False


BUILTIN_MODELS = frozenset({"embedded", "smollm2-135m", "minilm", "tiny-llama", "tiny-bert",
                            *(f"minilm-l{k}" for k in range(1, 7))})
MODEL_KEYS = ("slm.model", "llm.model", "fdkt.generator", "social.teacher")
EPOCH_KEYS = ("slm.epochs", "fedavg.local-epochs", "fdkt.sgd-epochs")
TOKEN_KEYS = ("llm.max-length", "slm.max-length", "fdkt.max-tokens", "fdkt.sgd-max-length", "fdkt.max-new-tokens",
              "social.max-new-tokens", "social.instruction-tokens", "crosslm.max-new-tokens", "pe.max-new-tokens")


@dataclass(frozen=True)
class SiloLimits:
    """What a deployed silo lets the server make it run (node config; see the module docstring): a hostile run
    config must not load arbitrary models or directories on the silo's host, nor size its work without bound."""

    allowed_models: frozenset[str] | None = BUILTIN_MODELS  # None: any
    max_epochs: int = 100
    max_tokens: int = 512
    max_request_texts: int | None = 10_000  # None: no cap (a simulated silo)
    max_request_bytes: int | None = 64 << 20

    @classmethod
    def from_node_config(cls, node: Mapping[str, Any]) -> SiloLimits:
        extra = {s.strip() for s in str(node.get("allowed-models", "")).split(",") if s.strip()}
        try:
            return cls(BUILTIN_MODELS | extra, int(node.get("max-epochs", 100)), int(node.get("max-tokens", 512)),
                       int(node.get("max-request-texts", 10_000)), int(node.get("max-request-bytes", 64 << 20)))
        except ValueError:
            raise ConfigError("Node config max-epochs, max-tokens, max-request-texts and max-request-bytes must be "
                              "whole numbers.") from None

    @classmethod
    def unlimited(cls) -> SiloLimits:
        """A simulated silo's: the run's own partition of public data, on the experimenter's machine."""
        return cls(None, max_epochs=2**62, max_tokens=2**62, max_request_texts=None, max_request_bytes=None)

    def check_request(self, content: Any) -> None:
        """Refuse one message that asks the silo to read more texts, or is larger, than its caps."""
        texts = sum(len(record["texts"]) for record in content.config_records.values()
                    if isinstance(record.get("texts"), list))
        if self.max_request_texts is not None and texts > self.max_request_texts:
            raise ConfigError(f"This silo reads at most max-request-texts={self.max_request_texts} texts per message "
                              f"({texts} sent). Send fewer, or ask the silo's operator to raise it in its node config.")
        # serialising a message to measure it costs a pass over every array: only where a cap can refuse it
        if self.max_request_bytes is not None and (size := payload_bytes(content)) > self.max_request_bytes:
            raise ConfigError(f"This silo takes messages of at most max-request-bytes={self.max_request_bytes} "
                              f"({size} sent). Send less, or ask the silo's operator to raise it.")

    def check(self, run_config: Mapping[str, Any]) -> None:
        """Refuse a run config that asks for more than these limits, naming the run key and the node-config key."""
        for key in MODEL_KEYS:
            for spec in (s.strip() for s in str(run_config.get(key, "")).split(",") if s.strip()):
                if self.allowed_models is not None and spec not in self.allowed_models:
                    raise ConfigError(f"This silo does not load {key}='{spec}': not an embedded model nor one its "
                                      "node config lists in allowed-models. Use an embedded model, or ask the silo's "
                                      "operator to allow it.")
        for keys, cap, node_key in ((EPOCH_KEYS, self.max_epochs, "max-epochs"),
                                    (TOKEN_KEYS, self.max_tokens, "max-tokens")):
            for key in keys:
                value = run_config.get(key, 0)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
                    raise ConfigError(f"This silo runs at most {node_key}={cap} ({key}={value:g} asked). Ask for "
                                      f"less, or ask the silo's operator to raise {node_key} in its node config.")


def _flag(node: Mapping[str, Any], key: str, default: bool) -> bool:
    value = node.get(key, default)
    if isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"Node config {key}={value!r}: use true or false.")
        return value.lower() == "true"
    return bool(value)


def data_identity(texts: Iterable[str], labels: Iterable[int]) -> str:
    """A content hash of a silo's labelled examples: its ledger's name, whichever run, experiment or method asks."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels):
        digest.update(json.dumps([text, int(label)], ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:32]


_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive access to ``path`` for this thread and this process against all others (an flock on a side file)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(path, threading.Lock())
    path.parent.mkdir(parents=True, exist_ok=True)
    with lock, open(path.with_name(path.name + ".lock"), "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MetricsBudget:
    """The count of replies with test scores a silo's data has given, on the silo's disk, against its policy's cap;
    taken under the ledger's lock, so concurrent replies cannot overrun it."""

    def __init__(self, path: Path, limit: int | None) -> None:
        self.path, self.limit = Path(path), limit

    def used(self) -> int:
        return int(json.loads(self.path.read_text())["replies"]) if self.path.exists() else 0

    def take(self) -> bool:
        """Count one more reply with scores, or refuse (False) when the cap is reached."""
        if self.limit is None:
            return True
        with _locked(self.path):
            used = self.used()
            if used >= self.limit:
                return False
            atomic_write(self.path, json.dumps({"version": 1, "replies": used + 1}))
            return True


class SiloLedger:
    """The lifetime ledger of one silo's data: every charge of every run, composed against the silo's budget."""

    def __init__(self, path: Path, policy: SiloPolicy) -> None:
        self.path, self.policy = Path(path), policy

    def _events(self) -> list[tuple[str, PrivacyEvent]]:
        if not self.path.exists():
            return []
        state = json.loads(self.path.read_text())
        return [(entry.get("run", ""), PrivacyEvent(**entry["event"])) for entry in state["charges"]]

    def _write(self, charges: list[tuple[str, PrivacyEvent]]) -> None:
        atomic_write(self.path, json.dumps({"version": 1, "charges": [
            {"run": run, "event": {"noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate,
                                   "steps": e.steps, "mechanism": e.mechanism}} for run, e in charges]}))

    def charges(self) -> int:
        """How many charges this data has had, every run together."""
        return len(self._events())

    def spent(self, run: str | None = None) -> float:
        """ε spent on this data in all (or one run's) releases."""
        return compute_epsilon([e for r, e in self._events() if run is None or r == run], self.policy.delta)

    def remaining(self) -> float:
        """What is left of the lifetime budget (an unlimited budget is not composed at all)."""
        return math.inf if math.isinf(self.policy.epsilon_budget) else self.policy.epsilon_budget - self.spent()

    def charge(self, events: Iterable[PrivacyEvent], run: str, run_budget: float) -> float:
        """Record ``events`` for ``run``, or raise and record nothing: the lock, a fresh read, then both checks (the
        silo's lifetime budget, and the run's own cap, what the server asked for). Returns the lifetime ε after (nan where the budget is unlimited)."""
        events = tuple(events)
        with _locked(self.path):
            charges = self._events()
            lifetime = (compute_epsilon([*(e for _, e in charges), *events], self.policy.delta)
                        if math.isfinite(self.policy.epsilon_budget) else math.nan)  # unlimited: nothing to check
            in_run = compute_epsilon([*(e for r, e in charges if r == run), *events], self.policy.delta)
            names = ", ".join(sorted({e.mechanism for e in events}))
            if lifetime > self.policy.epsilon_budget:  # what was spent, and by how many runs, stays on the silo
                raise PrivacyBudgetExceeded(
                    f"Refused {names}: this silo's lifetime privacy budget for its data (node config epsilon-budget "
                    f"{self.policy.epsilon_budget:g}) does not allow it. Nothing was released.")
            if in_run > run_budget:
                raise PrivacyBudgetExceeded(
                    f"Refused {names}: this run's epsilon on this silo would reach {in_run:.4g} > the {run_budget:.4g} "
                    "the run asked for. Nothing was released.")
            self._write([*charges, *((run, e) for e in events)])
            return lifetime


class RunLedger(PrivacyLedger):
    """One run's view of a silo's lifetime ledger, in the interface the mechanisms charge: ``spent`` and
    ``remaining`` are the run's (what the server asked for, which the mechanisms calibrate to); ``charge`` checks
    the run's cap and the exact lifetime composition, and records in the lifetime file or refuses before any data
    is read."""

    def __init__(self, ledger: SiloLedger, run: str, run_budget: float) -> None:
        super().__init__(run_budget, ledger.policy.delta)
        self.ledger, self.run = ledger, run or f"call-{uuid.uuid4().hex}"  # no experiment id: a run of its own
        self._events = [e for r, e in ledger._events() if r == self.run]

    def charge(self, events: PrivacyEvent | Iterable[PrivacyEvent]) -> float:
        events = (events,) if isinstance(events, PrivacyEvent) else tuple(events)
        self.ledger.charge(events, self.run, self.epsilon_budget)
        self._events.extend(events)
        return self.spent()

    def check_can_release(self, silo: str) -> None:
        """Refuse before any work when (next to) nothing is left, naming which budget is spent."""
        lifetime = self.ledger.remaining() <= MIN_RELEASE_EPSILON
        if lifetime or self.remaining() <= MIN_RELEASE_EPSILON:
            which = (f"its lifetime budget (node config epsilon-budget={self.ledger.policy.epsilon_budget:g}) is "
                     "spent" if lifetime else
                     f"this run's epsilon {self.spent():.4g} of the {self.epsilon_budget:g} it asked for is spent")
            raise PrivacyBudgetExceeded(f"{silo}: {which}, delta {self.delta:g}; this silo releases nothing more "
                                        "of this data in this run.")

    def record(self, mechanism: str, epsilon: float, noise_multiplier: float, steps: int, private: bool) -> dict:
        """The privacy record of one release as it leaves the silo (``protocol.PRIVACY_FIELDS``): this release's ε,
        the run's total on this silo, the run's budget; all ∞ for a release labelled non-private."""
        private = bool(private and math.isfinite(epsilon))
        return {"mechanism": mechanism, "epsilon": epsilon if private else math.inf,
                "epsilon-total": self.spent() if private else math.inf, "delta": self.delta,
                "budget": self.epsilon_budget if private else math.inf, "noise-multiplier": noise_multiplier,
                "steps": steps, "private": private}

