"""The server <-> silo protocol: message types, record keys, and (de)serialisation of what crosses the wire.

Every message carries ``config["protocol"] = PROTOCOL_VERSION``; a silo refuses a message of another major version.

Message types (Flower ``<category>.<action>``), request -> reply:

``query.info``     {}                                        -> metrics: partition-id, num-train, num-test
``train.local``    config, global-test                       -> metrics: silo-test.*, global-test.*, train.*
``train``          arrays (SLM weights), config              -> arrays, metrics: num-examples, train.*   (FedAvg)
``evaluate``       arrays, global-test (optional)            -> metrics: silo-test.*, global-test.*
``evaluate.llm``   config                                    -> metrics: silo-test.*  (the public LLM on the silo's test split)
``query.synthesize`` config                                  -> examples (DP synthetic), privacy, metrics: synth.*  (FDKT)
``train.augmented``  config (synthetic-weight), examples, global-test -> metrics: silo-test.*, global-test.*, train.*

Records:
  ``config``       ConfigRecord: protocol (str), round (int), and per-type options (e.g. epochs)
  ``global-test``  ConfigRecord: texts (list[str]), labels (list[int]) — the server's public held-out set
  ``arrays``       ArrayRecord: a torch state dict
  ``metrics``      MetricRecord: floats/ints; keys ``<split>.<metric>`` (e.g. ``global-test.accuracy``)
  ``examples``     ConfigRecord: texts (list[str]), labels (list[int]) — synthetic/augmented labelled examples
  ``privacy``      ConfigRecord: mechanism (str), epsilon, epsilon-total, delta, budget, noise-multiplier (float),
                   steps (int) — the cost of what a silo released (epsilon inf = non-private)
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedbridge.errors import FedbridgeError
from fedbridge.tasks.task import Examples

PROTOCOL_VERSION = "1.0"

INFO = "query.info"
TRAIN_LOCAL = "train.local"
TRAIN_FEDAVG = "train"
EVALUATE = "evaluate"
EVALUATE_LLM = "evaluate.llm"
SYNTHESIZE = "query.synthesize"
TRAIN_AUGMENTED = "train.augmented"

CONFIG, GLOBAL_TEST, ARRAYS, METRICS = "config", "global-test", "arrays", "metrics"
EXAMPLES, PRIVACY = "examples", "privacy"
MAX_EXAMPLES = 100_000  # a larger examples record is refused: a broken or hostile peer, not a real set


class ProtocolError(FedbridgeError):
    """A message that does not follow this protocol (wrong version, missing or malformed record)."""


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
