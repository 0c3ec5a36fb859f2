"""The server <-> silo protocol: message types, record keys, and (de)serialisation of what crosses the wire.

Every message carries ``config["protocol"] = PROTOCOL_VERSION``; a silo refuses a message of another major version.

Message types (Flower ``<category>.<action>``), request -> reply:

``query.info``     {}                                        -> metrics: partition-id, num-train, num-test
``train.local``    config, global-test                       -> metrics: silo-test.*, global-test.*, train.*
``train``          arrays (SLM weights), config              -> arrays, metrics: num-examples, train.*   (FedAvg)
``evaluate``       arrays, global-test (optional)            -> metrics: silo-test.*, global-test.*
``evaluate.llm``   config                                    -> metrics: silo-test.*  (the public LLM on the silo's test split)

Records:
  ``config``       ConfigRecord: protocol (str), round (int), and per-type options (e.g. epochs)
  ``global-test``  ConfigRecord: texts (list[str]), labels (list[int]) — the server's public held-out set
  ``arrays``       ArrayRecord: a torch state dict
  ``metrics``      MetricRecord: floats/ints; keys ``<split>.<metric>`` (e.g. ``global-test.accuracy``)
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

CONFIG, GLOBAL_TEST, ARRAYS, METRICS = "config", "global-test", "arrays", "metrics"


class ProtocolError(FedbridgeError):
    """A message that does not follow this protocol (wrong version, missing or malformed record)."""


def request(config: Mapping[str, int | float | str | bool] | None = None, global_test: Examples | None = None,
            **records) -> RecordDict:
    content = RecordDict({CONFIG: ConfigRecord({"protocol": PROTOCOL_VERSION, **(config or {})})})
    if global_test is not None:
        content[GLOBAL_TEST] = ConfigRecord({"texts": list(global_test.texts), "labels": list(global_test.labels)})
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


def read_global_test(content: RecordDict, num_labels: int) -> Examples | None:
    record = content.get(GLOBAL_TEST)
    if record is None:
        return None
    texts, labels = list(record["texts"]), [int(y) for y in record["labels"]]
    if len(texts) != len(labels) or any(not 0 <= y < num_labels for y in labels):
        raise ProtocolError(f"Malformed global-test record: {len(texts)} texts, {len(labels)} labels "
                            f"(labels must lie in 0..{num_labels - 1}).")
    return Examples.of(texts, labels)


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
