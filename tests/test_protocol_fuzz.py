"""Fuzzing the protocol's parsers with hypothesis: any RecordDict, random or nearly valid, either parses to a valid
value or raises ProtocolError — never another exception, never a value that breaks the parser's own promise."""

from __future__ import annotations

import inspect
import math
import uuid

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedbridge import protocol as p
from fedbridge.tasks import Examples

NUM_LABELS = 3
LIKE = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32)), "b": Array(np.zeros(2, np.float32))})
SIZE_CAP = 4000  # a little above the valid message below: mutations land on both sides

# ------------------------------------------------------------------ strategies

TEXT = st.text(max_size=12)
INTS = st.integers(min_value=-(2**63), max_value=2**63 - 1)  # what Flower can serialise, so what can arrive
SMALL_INTS = st.integers(-2, 5)
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
NUMBERS = st.one_of(SMALL_INTS, st.floats(0, 1), FLOATS, INTS)


def nonempty_lists(elements: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(elements, min_size=1, max_size=6)  # Flower's records cannot hold an empty list


ANY_CONFIG_VALUE = st.one_of(TEXT, INTS, FLOATS, st.booleans(), st.binary(max_size=8), nonempty_lists(TEXT),
                             nonempty_lists(SMALL_INTS), nonempty_lists(INTS), nonempty_lists(FLOATS),
                             nonempty_lists(st.booleans()))
ANY_METRIC_VALUE = st.one_of(INTS, FLOATS, SMALL_INTS, st.floats(0, 1), nonempty_lists(INTS), nonempty_lists(FLOATS),
                             nonempty_lists(st.floats(0, 1)))
# values close to valid for the fields the parsers read, so that fuzzing gets past their first check
PLAUSIBLE_CONFIG = {
    "protocol": st.sampled_from([p.PROTOCOL_VERSION, "1.9", "2.0", "", "one"]),
    "texts": nonempty_lists(st.text(max_size=30)),
    "labels": nonempty_lists(SMALL_INTS),
    "values": nonempty_lists(st.one_of(st.floats(0, 1), FLOATS)),
    "probs": st.sampled_from([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5], [math.nan] * 3]),
    "num-labels": SMALL_INTS,
    "mode": st.sampled_from([*p.SOCIAL_MODES, "votes"]),
    "epochs": NUMBERS,
    p.EXPERIMENT: st.one_of(st.just(uuid.uuid4().hex), st.sampled_from(["../etc", "a/b", "-x", "ok_1"]), TEXT),
    "mechanism": st.one_of(st.just("dp-fewshot"), TEXT),
    "epsilon": NUMBERS, "epsilon-total": NUMBERS, "budget": NUMBERS, "delta": NUMBERS, "noise-multiplier": NUMBERS,
    "steps": NUMBERS, "private": st.booleans(),
}
METRIC_KEYS = ["partition-id", "num-train", "num-test", "num-examples", "silo-test.accuracy", "silo-test.n",
               "global-test.macro_f1", "global-test.n", "train.loss", "values"]


@st.composite
def config_records(draw) -> ConfigRecord:
    keys = draw(st.sets(st.one_of(st.sampled_from(sorted(PLAUSIBLE_CONFIG)), TEXT), max_size=9))
    fields = {k: draw(PLAUSIBLE_CONFIG[k] if k in PLAUSIBLE_CONFIG and draw(st.booleans()) else ANY_CONFIG_VALUE)
              for k in keys}
    try:
        return ConfigRecord(fields)
    except (TypeError, ValueError, IndexError):
        assume(False)


@st.composite
def metric_records(draw) -> MetricRecord:
    keys = draw(st.sets(st.one_of(st.sampled_from(METRIC_KEYS), TEXT), max_size=8))
    try:
        return MetricRecord({k: draw(ANY_METRIC_VALUE) for k in keys})
    except (TypeError, ValueError):
        assume(False)


@st.composite
def arrays(draw) -> Array:
    kind = draw(st.sampled_from(["float32", "float64", "int64", "bool", "str", "garbage"]))
    if kind == "garbage":  # bytes that claim to be an array
        return Array(dtype=draw(st.sampled_from(["float32", "<U1", "object"])), shape=(2,), stype="numpy.ndarray",
                     data=draw(st.binary(max_size=40)))
    shape = draw(st.sampled_from([(), (2,), (2, 2), (3, 1)]))
    if kind == "str":
        return Array(np.full(shape, "a"))
    return Array(draw(hnp.arrays(np.dtype(kind), shape)))


@st.composite
def array_records(draw) -> ArrayRecord:
    return ArrayRecord({name: draw(arrays()) for name in draw(st.sets(st.sampled_from(["w", "b", "x"]), max_size=3))})


def valid_content() -> RecordDict:
    """One message that every parser accepts: the starting point of the mutations below."""
    return RecordDict({
        p.CONFIG: ConfigRecord({"protocol": p.PROTOCOL_VERSION, "epochs": 2, "values": [0.1, 0.5, 1.0],
                                p.EXPERIMENT: uuid.uuid4().hex, "mode": p.SOCIAL_MODES[0], "epsilon": 4.0,
                                "releases": 2, "k": 4}),
        p.EXAMPLES: ConfigRecord({"texts": ["good", "bad"], "labels": [2, 0]}),
        p.GLOBAL_TEST: ConfigRecord({"texts": ["fine"], "labels": [1]}),
        p.METRICS: MetricRecord({"partition-id": 1, "num-train": 10, "num-test": 3, "silo-test.accuracy": 0.5,
                                 "silo-test.n": 3, "train.loss": 0.7}),
        p.PRIVACY: ConfigRecord({"mechanism": "dp-fewshot", "epsilon": 1.0, "epsilon-total": 1.5, "budget": 2.0,
                                 "delta": 1e-5, "noise-multiplier": 1.1, "steps": 12, "private": True}),
        p.SLM_PRIVACY: ConfigRecord({"mechanism": "dp-sgd SLM head", "epsilon": 0.5, "epsilon-total": 1.0,
                                     "budget": 1.0, "delta": 1e-5, "noise-multiplier": 2.0, "steps": 30,
                                     "private": True}),
        p.ARRAYS: ArrayRecord({"w": Array(np.ones((2, 2), np.float32)), "b": Array(np.zeros(2, np.float32))}),
        p.SCORES: ConfigRecord({"probs": [0.2, 0.3, 0.5], "num-labels": NUM_LABELS}),
        p.HISTOGRAM: ConfigRecord({"counts": [1.5, -0.3, 2.0], "num-labels": NUM_LABELS}),
        p.INSTRUCTIONS: ConfigRecord({"texts": ["Read the review, then answer."]}),
        p.PROVENANCE: ConfigRecord({"mode": "examples", "shots": 2}),
    })


@st.composite
def mutated_valid_contents(draw) -> RecordDict:
    """The valid message with one to three records or fields dropped or replaced by anything."""
    content = valid_content()
    for _ in range(draw(st.integers(1, 3))):
        if not content:
            break
        key = draw(st.sampled_from(sorted(content.keys())))
        action = draw(st.sampled_from(["drop-record", "replace-record", "drop-field", "replace-field"]))
        record = content[key]
        if action == "drop-record":
            del content[key]
        elif action == "replace-record":
            content[key] = draw(st.one_of(config_records(), metric_records(), array_records()))
        elif action == "drop-field" and len(record) > 1:
            del record[draw(st.sampled_from(sorted(record.keys())))]
        elif action == "replace-field" and record:
            field = draw(st.sampled_from(sorted(record.keys())))
            values = (arrays() if isinstance(record, ArrayRecord) else ANY_METRIC_VALUE
                      if isinstance(record, MetricRecord) else st.one_of(ANY_CONFIG_VALUE, *PLAUSIBLE_CONFIG.values()))
            value = draw(values)
            try:
                record[field] = value
            except (TypeError, ValueError, IndexError):
                assume(False)
    return content


RECORD_KEYS = st.one_of(st.sampled_from([p.CONFIG, p.EXAMPLES, p.GLOBAL_TEST, p.METRICS, p.PRIVACY, p.SLM_PRIVACY,
                                         p.ARRAYS, p.SCORES, p.INSTRUCTIONS, p.PROVENANCE]), TEXT.filter(bool))
CONTENTS = st.one_of(st.dictionaries(RECORD_KEYS, st.one_of(config_records(), metric_records(), array_records()),
                                     max_size=5).map(RecordDict),
                     mutated_valid_contents())


# ------------------------------------------------------------------ each parser and what its value promises

def _finite_or_empty_split_nan(metrics: dict, key: str, value: float) -> bool:
    split, _, name = key.rpartition(".")
    return math.isfinite(value) or (math.isnan(value) and name in p.UNIT_METRICS and metrics.get(f"{split}.n") == 0)


def check_metrics(metrics, content) -> None:
    assert isinstance(metrics, dict)
    for key, value in metrics.items():
        for v in value if isinstance(value, list) else [value]:
            assert isinstance(v, (int, float)) and not isinstance(v, bool)
            assert _finite_or_empty_split_nan(metrics, key, v)
            if key.rpartition(".")[2] in p.UNIT_METRICS and math.isfinite(v):
                assert 0 <= v <= 1


def check_examples(examples, content) -> None:
    assert isinstance(examples, Examples) and len(examples.texts) == len(examples.labels) <= p.MAX_EXAMPLES
    assert all(isinstance(t, str) and len(t) <= p.MAX_TEXT_CHARS for t in examples.texts)
    assert all(0 <= y < NUM_LABELS for y in examples.labels)


def check_privacy(privacy, content) -> None:
    assert set(privacy) == set(p.PRIVACY_FIELDS) and isinstance(privacy["mechanism"], str)
    assert 0 <= privacy["epsilon"] <= privacy["epsilon-total"] * (1 + 1e-9)
    assert privacy["private"] is math.isfinite(privacy["epsilon"])
    assert 0 <= privacy["delta"] < 1 and privacy["budget"] > 0 and isinstance(privacy["steps"], int)
    assert math.isfinite(privacy["noise-multiplier"]) and privacy["noise-multiplier"] >= 0


def check_arrays(record, content, like=None) -> None:
    assert isinstance(record, ArrayRecord)
    for name, array in record.items():
        values = array.numpy()
        assert values.dtype.kind in "biuf" and (values.dtype.kind != "f" or np.isfinite(values).all())
        if like is not None:
            assert values.shape == like[name].shape and str(values.dtype) == like[name].dtype
    if like is not None:
        assert set(record) == set(like)


def check_experiment(value, content) -> None:
    assert value == "" or (value[0].isascii() and value[0].isalnum() and "/" not in value and ".." not in value
                           and len(value) <= 64)


PARSERS = {  # name -> (call on the content, check of its value)
    "check_version": (p.check_version,
                      lambda v, c: isinstance(v, ConfigRecord) and str(v["protocol"]).split(".")[0] == "1"),
    "check_size": (lambda c: p.check_size(c, SIZE_CAP), lambda v, c: v <= SIZE_CAP),
    "read_examples": (lambda c: p.read_examples(c, p.EXAMPLES, NUM_LABELS), check_examples),
    "read_global_test": (lambda c: p.read_global_test(c, NUM_LABELS),
                         lambda v, c: v is None and p.GLOBAL_TEST not in c or check_examples(v, c) is None),
    "read_number": (lambda c: p.read_number(c.get(p.CONFIG) or {}, "epochs", low=0, high=100, integer=True),
                    lambda v, c: isinstance(v, int) and 0 <= v <= 100),
    "read_floats": (lambda c: p.read_floats(c, p.CONFIG, "values", 3, low=0.0, high=1.0),
                    lambda v, c: len(v) == 3 and all(isinstance(x, float) and 0 <= x <= 1 for x in v)),
    "read_metrics": (p.read_metrics, check_metrics),
    "read_reply": (p.read_reply, lambda v, c: v is c),
    "read_info": (p.read_info, lambda v, c: check_metrics(v, c) is None and all(
        isinstance(v[k], int) and v[k] >= 0 for k in ("partition-id", "num-train", "num-test"))),
    "read_privacy": (p.read_privacy, check_privacy),
    "read_slm_privacy": (p.read_slm_privacy,
                         lambda v, c: v is None and p.SLM_PRIVACY not in c or check_privacy(v, c) is None),
    "read_arrays": (p.read_arrays, check_arrays),
    "read_arrays(like)": (lambda c: p.read_arrays(c, like=LIKE), lambda v, c: check_arrays(v, c, LIKE)),
    "read_experiment": (lambda c: p.read_experiment(c.get(p.CONFIG) or {}), check_experiment),
    "read_probabilities": (lambda c: p.read_probabilities(c, p.SCORES, 1, NUM_LABELS),
                           lambda v, c: v.shape == (1, NUM_LABELS) and np.allclose(v.sum(axis=1), 1, atol=1e-3)),
    "read_histogram": (lambda c: p.read_histogram(c, 1, NUM_LABELS),
                       lambda v, c: v.shape == (1, NUM_LABELS) and np.isfinite(v).all()),
    "read_vote_request": (lambda c: p.read_vote_request(c.get(p.CONFIG) or {}), lambda v, c: (
        v[0] > 0 and 1 <= v[1] <= 10_000 and 1 <= v[2] <= p.MAX_VOTE_K and -1 <= v[3] and all(
            isinstance(x, int) for x in v[1:]))),
    "read_texts": (lambda c: p.read_texts(c, p.INSTRUCTIONS),
                   lambda v, c: all(isinstance(t, str) and len(t) <= p.MAX_TEXT_CHARS for t in v)),
    "read_mode": (lambda c: p.read_mode(c.get(p.CONFIG) or {}), lambda v, c: v in p.SOCIAL_MODES),
    "read_provenance": (p.read_provenance, lambda v, c: isinstance(v, dict) and len(v) <= 64),
}


def test_every_parser_in_the_protocol_is_fuzzed():
    public = {name for name, fn in inspect.getmembers(p, inspect.isfunction)
              if fn.__module__ == p.__name__ and name.startswith(("read_", "check_"))}
    assert public <= {name.split("(")[0] for name in PARSERS}, sorted(public - set(PARSERS))


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_the_valid_message_parses(name):
    parse, check = PARSERS[name]
    content = valid_content()
    assert check(parse(content), content) is not False


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(content=CONTENTS)
def test_parser_returns_a_valid_value_or_raises_protocol_error(name, content):
    parse, check = PARSERS[name]
    try:
        value = parse(content)
    except p.ProtocolError:
        return
    assert check(value, content) is not False, f"{name} returned an invalid value: {value!r:.200}"


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(texts=nonempty_lists(st.text(max_size=20)), labels=nonempty_lists(st.integers(-1, NUM_LABELS)))
def test_examples_parse_exactly_when_they_are_valid(texts, labels):
    content = RecordDict({p.EXAMPLES: ConfigRecord({"texts": texts, "labels": labels})})
    valid = len(texts) == len(labels) and all(0 <= y < NUM_LABELS for y in labels)
    if valid:
        assert p.read_examples(content, p.EXAMPLES, NUM_LABELS) == Examples.of(texts, labels)
    else:
        with pytest.raises(p.ProtocolError):
            p.read_examples(content, p.EXAMPLES, NUM_LABELS)


@given(value=st.one_of(INTS, FLOATS))
def test_a_score_parses_exactly_when_it_is_a_finite_number_in_the_unit_interval(value):
    content = RecordDict({p.METRICS: MetricRecord({"silo-test.accuracy": value, "silo-test.n": 5})})
    if math.isfinite(value) and 0 <= value <= 1:
        assert p.read_metrics(content)["silo-test.accuracy"] == value
    else:
        with pytest.raises(p.ProtocolError, match="silo-test.accuracy"):
            p.read_metrics(content)
