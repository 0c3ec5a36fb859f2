"""The server <-> silo protocol: message types, record keys, and (de)serialisation of what crosses the wire.

Every message carries ``config["protocol"] = PROTOCOL_VERSION``; a silo refuses a message of another major version.

Message types (Flower ``<category>.<action>``): the core's are declared here, with their entry of the catalogue
(``CORE_CATALOGUE``: ``query.info`` for discovery, and ``train.local``, ``evaluate``, ``train.augmented``,
``query.dp_vote``, which several methods send); each method declares its own in its folder's ``messages.py``
(``fedbridge/methods/<name>/messages.py``: the constants and a ``CATALOGUE`` entry each, request -> reply).
``catalogue()`` assembles them all, and docs/architecture.md#protocol shows them (written by
``python -m fedbridge.config_reference``; a test keeps it current).

Option channels, one rule. A silo reads from the run config only what holds for the whole run and what it applies on
its own: its data and split, its models, fault injection, and the options of a mechanism it runs on its private data
by itself (FDKT's demonstrations, Social Learning's teaching): the keys ``strategies.base.SILO_KEYS`` and
``SILO_SECTIONS`` name (a method's ``messages.py`` names its section in ``SILO_SECTIONS``), which a strategy cannot
change in Python. Whatever the server decides about one request travels in that request's ``config``: round,
experiment, final, the candidates, epochs, a loss weight (``synthetic-weight``), a vote's epsilon, releases, k and
noise seed, a mode, a count. A handler never reads a request option from the run config: a message several methods
send (``train.augmented`` from FDKT and Private Evolution, ``query.dp_vote``) could not tell whose section to read,
since a ServerApp of one's own may run several methods on one run config (docs/strategies.md). So ``fdkt.epsilon``
(the silo's own DP demonstrations) is read by the silo from the run config, and ``fdkt.synthetic-weight`` or
``pe.synthetic-weight`` (how the server wants its examples weighed in the training it asks for) travels in
``train.augmented``. ``SILO_SECTIONS`` names whole sections: the keys of ``fdkt.*`` and ``social.*`` that only the
server reads and sends (``fdkt.synthetic-weight``, ``fdkt.vote-*``, ``social.mode``...) are in it too, so a strategy
refuses a Python change of them as well (stricter than needed, never a split between the two sides).

Records:
  ``config``       ConfigRecord: protocol (str), round (int), and per-type options (e.g. epochs)
  ``global-test``  ConfigRecord: texts (list[str]), labels (list[int]) — the server's public held-out set
  ``arrays``       ArrayRecord: a torch state dict
  ``metrics``      MetricRecord: floats/ints; keys ``<split>.<metric>`` (e.g. ``global-test.accuracy``)
  ``examples``     ConfigRecord: texts (list[str]), labels (list[int]) — synthetic/augmented labelled examples
  ``privacy``      ConfigRecord: mechanism (str), epsilon, epsilon-total, delta, budget, noise-multiplier (float),
                   steps (int) — the cost of what a silo released (epsilon inf = non-private)
  ``scores``, ``targets``  ConfigRecord: probs (list[float], row-major n x num-labels), num-labels (int) — class
                   probabilities (a silo's SLM on the server's examples; soft labels for distillation)
  ``slm``          ConfigRecord: spec (str) — the SLM spec uploaded weights belong to (``query.upload``)
  ``instructions`` ConfigRecord: texts (list[str]) — unlabelled texts: a teacher's task instructions
  ``provenance``   ConfigRecord: how a teacher made its contribution (mode, teacher model, shots, samples, top-k,
                   temperature, conditioning, verbatim-filter, perplexities (list[float]) ...); informational
  ``votes``        ConfigRecord: scores (list[float]) — one length-normalised log-likelihood per candidate
  ``histogram``    ConfigRecord: counts (list[float], row-major candidates x num-labels), num-labels (int) — a DP vote
                   histogram (noisy: any finite value)
  ``config["experiment"]``  the server's experiment id (stable across a resumed run): a silo keys its persistent
                   state (the privacy ledger) on it, so a restarted server cannot spend the same budget twice

Validation: whatever arrives is read through a ``read_*`` function below before use. Each returns a valid value or
raises ``ProtocolError`` naming what is wrong — never another exception, never a half-valid value (the fuzz tests
hold them to that). The server turns a reply that fails them into a recorded failure of that silo
(``Session.replies(parse=...)``); a silo turns a request that fails them into an error reply.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedbridge.errors import FedbridgeError
from fedbridge.tasks.task import Examples

PROTOCOL_VERSION = "1.0"

# the core's message types (several methods send each; a method's own are in its folder's messages.py)
INFO = "query.info"
TRAIN_LOCAL = "train.local"
EVALUATE = "evaluate"
TRAIN_AUGMENTED = "train.augmented"
DP_VOTE = "query.dp_vote"  # Private Evolution and every DP-scored method
CORE_CATALOGUE: dict[str, str] = {  # message type -> request -> reply (what the silo does)
    INFO: "{} -> metrics: partition-id, num-train, num-test (discovery: every method)",
    TRAIN_LOCAL: "config, global-test -> metrics: silo-test.*, global-test.*, train.* (a fresh SLM on the private "
                 "split only)",
    EVALUATE: "arrays, global-test (optional) -> metrics: silo-test.*, global-test.* (the server's SLM weights)",
    TRAIN_AUGMENTED: "config (synthetic-weight), examples, global-test -> metrics: silo-test.*, global-test.*, "
                     "train.* (a fresh SLM on the private split + the server's examples)",
    DP_VOTE: "config (epsilon, releases, k, noise-seed), examples (the candidates; labels are the ones the LLM was "
             "asked for, which the silo ignores) -> histogram, privacy, metrics: vote.* (the silo's DP "
             "nearest-neighbour vote histogram, candidates x labels)",
}

CONFIG, GLOBAL_TEST, ARRAYS, METRICS = "config", "global-test", "arrays", "metrics"
EXAMPLES, PRIVACY = "examples", "privacy"
SLM_PRIVACY = "slm-privacy"  # the privacy record of a DP-trained SLM (slm.dp-epsilon), in any reply that has one
SCORES, TARGETS, SLM = "scores", "targets", "slm"  # CrossLM
INSTRUCTIONS, PROVENANCE, VOTES = "instructions", "provenance", "votes"  # Social Learning
SOCIAL_MODES = ("examples", "instructions")
HISTOGRAM = "histogram"
MAX_VOTE_K = 64  # nearest candidates one private record votes for
MAX_EXAMPLES = 100_000  # a larger examples record is refused: a broken or hostile peer, not a real set
MAX_TEXT_CHARS = 100_000  # one longer text is refused: a whole book, not an example
MAX_REPLY_BYTES = 1 << 30  # default cap on one reply's serialised size (Session.replies); methods pass tighter ones
MAX_EXAMPLES_REPLY_BYTES = 64 << 20  # cap for replies that carry examples but no weights
EXPERIMENT = "experiment"
_EXPERIMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # it names a directory on the silo: no '/', no '..'
UNIT_METRICS = ("accuracy", "macro_f1")  # a metric named <split>.<one of these> must lie in [0, 1]


class ProtocolError(FedbridgeError):
    """A message that does not follow this protocol (wrong version, missing or malformed record)."""


def _method_messages() -> dict[str, Any]:
    """Each registered method's ``messages`` module (None where it adds no message type), by method name."""
    from fedbridge import methods  # a registry of package names that imports nothing: the silo side may read it

    return {name: methods.method_module(name, "messages") for name in methods.PACKAGES}


def catalogue() -> dict[str, tuple[str, str]]:
    """Every message type -> (who declares it: 'core' or a method's name, its entry: request -> reply): the core's,
    then each method's ``messages.CATALOGUE`` in the registry's order. A type declared twice is an error."""
    out = {t: ("core", entry) for t, entry in CORE_CATALOGUE.items()}
    for name, module in _method_messages().items():
        for message_type, entry in getattr(module, "CATALOGUE", {}).items():
            if message_type in out:
                raise ValueError(f"message type '{message_type}' of method '{name}' is {out[message_type][0]}'s "
                                 "already")
            out[message_type] = (name, " ".join(entry.split()))
    return out


def catalogue_markdown() -> str:
    """The catalogue as a Markdown table (docs/architecture.md#protocol)."""
    def cell(text: str) -> str:  # | would end the cell, * start an emphasis
        return text.replace("|", "\\|").replace("*", "\\*")

    rows = "".join(f"| `{t}` | {owner} | {cell(entry)} |\n" for t, (owner, entry) in catalogue().items())
    return "| message type | declared by | request -> reply |\n|---|---|---|\n" + rows


def request(config: Mapping[str, int | float | str | bool] | None = None, global_test: Examples | None = None,
            **records) -> RecordDict:
    content = RecordDict({CONFIG: ConfigRecord({"protocol": PROTOCOL_VERSION, **(config or {})})})
    if global_test is not None:
        content[GLOBAL_TEST] = examples_record(global_test)
    for key, record in records.items():
        content[key.replace("_", "-")] = record
    return content


def check_version(content: RecordDict) -> ConfigRecord:
    config = content.get(CONFIG)
    if not isinstance(config, ConfigRecord) or "protocol" not in config:
        raise ProtocolError("Message has no 'config' record with a 'protocol' version.")
    if str(config["protocol"]).split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        raise ProtocolError(f"Protocol {config['protocol']} is not compatible with this silo's {PROTOCOL_VERSION}. "
                            "Run the same fedbridge version on the server and the silos.")
    return config


def examples_record(examples: Examples) -> ConfigRecord:
    return ConfigRecord({"texts": list(examples.texts), "labels": list(examples.labels)})


def read_examples(content: RecordDict, key: str, num_labels: int) -> Examples:
    """Validated labelled examples from a record: a malformed one raises ProtocolError, never half-used."""
    record = content.get(key)
    if not isinstance(record, ConfigRecord) or "texts" not in record or "labels" not in record:
        raise ProtocolError(f"Message has no '{key}' record with 'texts' and 'labels'.")
    texts, labels = record["texts"], record["labels"]
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        raise ProtocolError(f"Malformed '{key}' record: texts and labels must be lists of equal length.")
    if len(texts) > MAX_EXAMPLES:
        raise ProtocolError(f"'{key}' record holds {len(texts)} examples, over the limit of {MAX_EXAMPLES}.")
    if not all(isinstance(t, str) for t in texts) or not all(isinstance(y, int) and not isinstance(y, bool)
                                                             and 0 <= y < num_labels for y in labels):
        raise ProtocolError(f"Malformed '{key}' record: texts must be strings and labels ints in 0..{num_labels - 1}.")
    if any(len(t) > MAX_TEXT_CHARS for t in texts):
        raise ProtocolError(f"'{key}' record has a text of more than {MAX_TEXT_CHARS} characters.")
    return Examples.of(texts, labels)


def read_global_test(content: RecordDict, num_labels: int) -> Examples | None:
    return read_examples(content, GLOBAL_TEST, num_labels) if GLOBAL_TEST in content else None


def metrics_reply(metrics: Mapping[str, float | int], **records) -> RecordDict:
    content = RecordDict({METRICS: MetricRecord(dict(metrics))})
    for key, record in records.items():
        content[key.replace("_", "-")] = record
    return content


def payload_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it (records, arrays and chunks; no transport framing)."""
    total, stack = 0, [content]
    while stack:
        obj = stack.pop()
        total += len(obj.deflate())
        stack.extend((obj.children or {}).values())
    return total


# ------------------------------------------------------------------ validators (see the module docstring)

def check_size(content: RecordDict, max_bytes: int, size: int | None = None) -> int:
    """The message's serialised size (``size`` if the caller measured it already); ProtocolError over ``max_bytes``."""
    size = payload_bytes(content) if size is None else size
    if size > max_bytes:
        raise ProtocolError(f"Message is {_bytes(size)}, over the {_bytes(max_bytes)} limit for this message type.")
    return size


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _number(value: Any, what: str, low: float = -math.inf, high: float = math.inf, integer: bool = False,
            allow_inf: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{what} must be a number, not {type(value).__name__}.")
    try:
        as_float = float(value)
    except OverflowError:
        raise ProtocolError(f"{what} is too large.") from None
    if math.isnan(as_float) or (math.isinf(as_float) and not allow_inf):
        raise ProtocolError(f"{what} must be finite, got {value}.")
    if integer and not as_float.is_integer():
        raise ProtocolError(f"{what} must be a whole number, got {value}.")
    if not low <= as_float <= high:
        raise ProtocolError(f"{what} = {value} is outside [{low:g}, {high:g}].")
    return int(value) if integer else as_float


def read_number(record: Mapping[str, Any], key: str, default: float | None = None, *, low: float = -math.inf,
                high: float = math.inf, integer: bool = False) -> float | int:
    """A finite number ``record[key]`` in [low, high] (an int if ``integer``); ``default`` when absent (None:
    the key is required). For the options a request carries, e.g. epochs or a loss weight."""
    if key not in record:
        if default is None:
            raise ProtocolError(f"Record has no '{key}'.")
        return default
    return _number(record[key], f"'{key}'", low, high, integer)


def read_floats(content: RecordDict, key: str, field: str, length: int | None = None, *, low: float = -math.inf,
                high: float = math.inf) -> list[float]:
    """The list ``content[key][field]`` of finite numbers in [low, high] (e.g. a silo's scores in [0, 1] of the
    server's examples), of exactly ``length`` items if given."""
    record = content.get(key)
    if not isinstance(record, (ConfigRecord, MetricRecord)) or field not in record:
        raise ProtocolError(f"Message has no '{key}' record with '{field}'.")
    values = record[field]
    if not isinstance(values, list):
        raise ProtocolError(f"'{key}.{field}' must be a list of numbers.")
    if length is not None and len(values) != length:
        raise ProtocolError(f"'{key}.{field}' has {len(values)} values; {length} were asked for.")
    return [float(_number(v, f"'{key}.{field}' item", low, high)) for v in values]


def _reply_record(content: RecordDict, key: str, kind: type, required: Iterable[str] = ()):
    """The reply's ``key`` record, of type ``kind`` and holding every ``required`` key."""
    record = content.get(key)
    if not isinstance(record, kind):
        raise ProtocolError(f"Reply has no '{key}' record.")
    missing = [k for k in required if k not in record]
    if missing:
        raise ProtocolError(f"'{key}' record lacks {', '.join(missing)}.")
    return record


def read_metrics(content: RecordDict, required: Iterable[str] = ()) -> dict[str, float | int | list]:
    """A reply's metrics: every value a finite number (or a list of them), every score ``<split>.accuracy`` /
    ``<split>.macro_f1`` in [0, 1], every count (``num-*``, ``<split>.n``) >= 0, and the ``required`` keys there.
    NaN passes only as the score of an empty split (``<split>.n == 0``), which has none."""
    record = _reply_record(content, METRICS, MetricRecord, required)
    out: dict[str, float | int | list] = {}
    for key, value in record.items():
        split, _, name = key.rpartition(".")
        if (name in UNIT_METRICS and isinstance(value, float) and math.isnan(value)
                and record.get(f"{split}.n") == 0):
            out[key] = value
            continue
        low = 0.0 if name in UNIT_METRICS or name == "n" or key.startswith("num-") else -math.inf
        high = 1.0 if name in UNIT_METRICS else math.inf
        what = f"metric '{key}'"
        out[key] = ([_number(v, what, low, high, integer=isinstance(v, int)) for v in value]
                    if isinstance(value, list) else _number(value, what, low, high, integer=isinstance(value, int)))
    return out


def read_reply(content: RecordDict) -> RecordDict:
    """The default reply check (``Session.replies``): a valid metrics record; returns the reply itself."""
    read_metrics(content)
    return content


def read_info(content: RecordDict) -> dict[str, float | int | list]:
    """A ``query.info`` reply: its metrics, with whole non-negative partition-id, num-train and num-test."""
    metrics = read_metrics(content, required=("partition-id", "num-train", "num-test"))
    for key in ("partition-id", "num-train", "num-test"):
        metrics[key] = read_number(metrics, key, low=0, integer=True)
    return metrics


PRIVACY_FIELDS = ("mechanism", "epsilon", "epsilon-total", "delta", "budget", "noise-multiplier", "steps", "private")


def read_privacy(content: RecordDict, key: str = PRIVACY) -> dict[str, Any]:
    """A silo's report of what its release cost (the documented fields only): ε's >= 0 (inf = non-private),
    this release within the silo's total, the total within the budget, δ in [0, 1), σ >= 0, whole steps, and
    ``private`` true exactly when ε is finite."""
    record = _reply_record(content, key, ConfigRecord, PRIVACY_FIELDS)
    mechanism, private = record["mechanism"], record["private"]
    if not isinstance(mechanism, str) or not 0 < len(mechanism) <= 100:
        raise ProtocolError("privacy 'mechanism' must be a name of 1-100 characters.")
    epsilon = _number(record["epsilon"], "privacy 'epsilon'", low=0.0, allow_inf=True)
    total = _number(record["epsilon-total"], "privacy 'epsilon-total'", low=0.0, allow_inf=True)
    budget = _number(record["budget"], "privacy 'budget'", low=0.0, allow_inf=True)
    out = {"mechanism": mechanism, "epsilon": epsilon, "epsilon-total": total,
           "delta": _number(record["delta"], "privacy 'delta'", low=0.0, high=1.0), "budget": budget,
           "noise-multiplier": _number(record["noise-multiplier"], "privacy 'noise-multiplier'", low=0.0),
           "steps": _number(record["steps"], "privacy 'steps'", low=0, integer=True), "private": private}
    if out["delta"] >= 1.0 or budget <= 0.0:
        raise ProtocolError("privacy 'delta' must be below 1 and 'budget' above 0.")
    if not isinstance(private, bool) or private != math.isfinite(epsilon):
        raise ProtocolError("privacy 'private' must be true exactly when 'epsilon' is finite.")
    if epsilon > total * (1 + 1e-9) or total > budget * (1 + 1e-9):
        raise ProtocolError(f"privacy report is inconsistent: epsilon {epsilon:g}, total {total:g}, "
                            f"budget {budget:g} (each must be at most the next).")
    return out


def read_slm_privacy(content: RecordDict) -> dict[str, Any] | None:
    """A DP-trained SLM's privacy report, where the reply carries one (``SLM_PRIVACY``)."""
    return read_privacy(content, SLM_PRIVACY) if SLM_PRIVACY in content else None


def read_arrays(content: RecordDict, key: str = ARRAYS, like: ArrayRecord | None = None) -> ArrayRecord:
    """Model weights: an ArrayRecord of numeric arrays with no NaN or infinity; given ``like`` (e.g. the global
    model), exactly its keys, shapes and dtypes."""
    record = content.get(key)
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"Message has no '{key}' ArrayRecord.")
    if like is not None and set(record) != set(like):
        missing, extra = sorted(set(like) - set(record)), sorted(set(record) - set(like))
        raise ProtocolError(f"'{key}' does not match the model: {len(missing)} arrays missing {missing[:3]}, "
                            f"{len(extra)} unexpected {extra[:3]}.")
    for name, array in record.items():
        try:
            values = array.numpy()
        except Exception as err:  # noqa: BLE001 - whatever the bytes hold, they are not an array
            raise ProtocolError(f"'{key}' array '{name}' cannot be decoded ({type(err).__name__}).") from None
        if values.dtype.kind not in "biuf":
            raise ProtocolError(f"'{key}' array '{name}' has dtype {values.dtype}; weights are numbers.")
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ProtocolError(f"'{key}' array '{name}' holds NaN or infinite values.")
        expected = like[name] if like is not None else None
        if expected is not None and (values.shape != tuple(expected.shape) or str(values.dtype) != expected.dtype):
            raise ProtocolError(f"'{key}' array '{name}' is {values.dtype}{list(values.shape)}; the model's is "
                                f"{expected.dtype}{list(expected.shape)}.")
    return record


def read_experiment(config: Mapping[str, Any]) -> str:
    """The experiment id a request carries ('' when the server sent none); it names a directory on the silo."""
    value = config.get(EXPERIMENT, "")
    if value == "":
        return ""
    if not isinstance(value, str) or not _EXPERIMENT_ID.fullmatch(value):
        raise ProtocolError(f"config '{EXPERIMENT}' must be 1-64 letters, digits, '-' or '_', got {value!r:.80}.")
    return value


def probabilities_record(probs: np.ndarray) -> ConfigRecord:
    """Class probabilities (n, num_labels) as a ``scores``/``targets`` record."""
    probs = np.asarray(probs, dtype=float)
    return ConfigRecord({"probs": [float(v) for v in probs.reshape(-1)], "num-labels": int(probs.shape[1])})


def read_probabilities(content: RecordDict, key: str, n: int, num_labels: int) -> np.ndarray:
    """Class probabilities (n, num_labels) from a ``scores``/``targets`` record: values in [0, 1], rows summing to 1."""
    record = content.get(key)
    if not isinstance(record, ConfigRecord) or record.get("num-labels") != num_labels:
        raise ProtocolError(f"Message has no '{key}' record of probabilities over {num_labels} labels.")
    probs = np.array(read_floats(content, key, "probs", n * num_labels, low=0.0, high=1.0)).reshape(n, num_labels)
    if n and not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
        raise ProtocolError(f"'{key}' rows must each sum to 1 (class probabilities).")
    return probs


def histogram_record(histogram: np.ndarray) -> ConfigRecord:
    """A (candidates, labels) vote histogram as a ``histogram`` record."""
    histogram = np.asarray(histogram, dtype=float)
    return ConfigRecord({"counts": [float(v) for v in histogram.reshape(-1)], "num-labels": int(histogram.shape[1])})


def read_histogram(content: RecordDict, n: int, num_labels: int) -> np.ndarray:
    """A DP vote histogram (n candidates, num_labels): finite numbers (noise makes any value possible)."""
    record = content.get(HISTOGRAM)
    if not isinstance(record, ConfigRecord) or record.get("num-labels") != num_labels:
        raise ProtocolError(f"Message has no '{HISTOGRAM}' record of votes over {num_labels} labels.")
    return np.array(read_floats(content, HISTOGRAM, "counts", n * num_labels)).reshape(n, num_labels)


def read_vote_request(config: Mapping[str, Any]) -> tuple[float, int, int, int]:
    """A ``query.dp_vote`` request's (epsilon, releases, k, noise-seed): ε > 0 (inf = non-private, which the silo's
    policy must allow), the releases the run plans (σ is calibrated for all of them), k nearest candidates."""
    epsilon = _number(config.get("epsilon"), "config 'epsilon'", low=0.0, allow_inf=True)
    if not epsilon > 0:
        raise ProtocolError("config 'epsilon' must be > 0 (inf = non-private).")
    return (epsilon, int(read_number(config, "releases", low=1, high=10_000, integer=True)),
            int(read_number(config, "k", 1, low=1, high=MAX_VOTE_K, integer=True)),
            int(read_number(config, "noise-seed", -1, low=-1, high=2**62, integer=True)))


# ------------------------------------------------------------------ Social Learning


def texts_record(texts: Iterable[str]) -> ConfigRecord:
    return ConfigRecord({"texts": list(texts)})


def read_texts(content: RecordDict, key: str) -> list[str]:
    """Unlabelled texts (e.g. instructions): a list of at most MAX_EXAMPLES strings of at most MAX_TEXT_CHARS."""
    record = content.get(key)
    if not isinstance(record, ConfigRecord) or "texts" not in record:
        raise ProtocolError(f"Message has no '{key}' record with 'texts'.")
    texts = record["texts"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ProtocolError(f"Malformed '{key}' record: texts must be a list of strings.")
    if len(texts) > MAX_EXAMPLES or any(len(t) > MAX_TEXT_CHARS for t in texts):
        raise ProtocolError(f"'{key}' record is too large: at most {MAX_EXAMPLES} texts of {MAX_TEXT_CHARS} "
                            "characters.")
    return texts


def read_mode(config: Mapping[str, Any]) -> str:
    """A Social Learning request's ``mode``."""
    mode = config.get("mode")
    if mode not in SOCIAL_MODES:
        raise ProtocolError(f"config 'mode' must be one of {', '.join(SOCIAL_MODES)}, got {mode!r:.40}.")
    return mode


def read_provenance(content: RecordDict) -> dict[str, Any]:
    """How a teacher made its contribution: a flat record of names, numbers, flags and lists of numbers (kept for
    the audit, never acted on)."""
    record = content.get(PROVENANCE)
    if not isinstance(record, ConfigRecord) or len(record) > 64:
        raise ProtocolError(f"Reply has no '{PROVENANCE}' record of at most 64 fields.")
    for key, value in record.items():
        if isinstance(value, str) and len(value) > 1000 or isinstance(value, list) and len(value) > MAX_EXAMPLES:
            raise ProtocolError(f"'{PROVENANCE}' field '{key}' is too long.")
    return dict(record)
