"""Tasks: built-in datasets, local files, partitioning into silos, metrics, and the errors bad input gives."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SMS_SPAM, toy_frame

from fedbridge.config import PartitionConfig, TaskConfig
from fedbridge.errors import ConfigError, DataError
from fedbridge.tasks import SiloFile, classification_metrics, load_federation, load_task, partition, silo_from_file
from fedbridge.tasks.task import _read_file

ENTITY = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")


def all_texts(fed) -> list[str]:
    return [t for s in fed.silos for t in (*s.train.texts, *s.test.texts)]


# ---------------------------------------------------------------- built-in tasks


def test_drug_reviews_builtin():
    task = load_task(TaskConfig(name="drug-reviews"))
    assert task.name == "drug-reviews"
    assert task.labels == ("negative", "neutral", "positive")
    assert len(task.data) == 979
    assert {"text", "label", "condition"} <= set(task.data.column_names)
    assert set(task.data["label"]) == {0, 1, 2}
    texts = task.data["text"]
    assert not [t for t in texts if ENTITY.search(t)], "HTML entities left in review text"
    assert any("'" in t for t in texts)  # &#039; became an apostrophe
    assert all(t == t.strip() and not t.startswith('"') for t in texts)
    assert task.description == "drug review" and "drug review" in task.instruction
    assert len(task.examples) == 979 and task.examples.labels == tuple(task.data["label"])


def test_drug_reviews_rejects_other_labels():
    with pytest.raises(DataError, match="task.labels must be empty or equal"):
        load_task(TaskConfig(name="drug-reviews", labels=("good", "bad")))


def test_drug_reviews_max_examples_is_a_seeded_sample():
    a = load_task(TaskConfig(name="drug-reviews", max_examples=50), 0)
    b = load_task(TaskConfig(name="drug-reviews", max_examples=50), 1)
    assert len(a.data) == len(b.data) == 50
    assert a.data["text"] != b.data["text"]
    assert load_task.__wrapped__(TaskConfig(name="drug-reviews", max_examples=50), 0).data["text"] == a.data["text"]


def test_tweets_builtin_is_capped():
    task = load_task(TaskConfig(name="tweets"))
    assert len(task.data) == 4000
    assert task.labels == ("negative", "neutral", "positive")
    assert set(task.data["label"]) == {0, 1, 2}
    assert all(t.strip() for t in task.data["text"])
    assert len(load_task(TaskConfig(name="tweets", max_examples=300)).data) == 300


# ---------------------------------------------------------------- local files


def _write(frame: pd.DataFrame, path: Path) -> Path:
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_local_files_with_named_columns(tmp_path, suffix):
    frame = toy_frame(40, labels=("pos", "neg", "mixed"))
    path = _write(frame, tmp_path / f"reviews{suffix}")
    task = load_task(TaskConfig(name=str(path), text_column="review", label_column="sentiment"))
    assert task.name == "reviews"
    assert task.labels == ("mixed", "neg", "pos")  # every distinct value, sorted
    assert len(task.data) == 40
    assert list(task.data["text"]) == list(frame["review"])
    assert [task.labels[y] for y in task.data["label"]] == list(frame["sentiment"])
    assert {"site", "extra"} <= set(task.data.column_names)  # extra columns survive (for natural partitions)
    assert task.description == "text"


def test_configured_labels_fix_the_label_order(tmp_path):
    path = _write(toy_frame(20), tmp_path / "t.csv")
    task = load_task(TaskConfig(name=str(path), text_column="review", label_column="sentiment",
                                labels=("pos", "neg")))
    assert task.labels == ("pos", "neg")
    assert [task.labels[y] for y in task.data["label"]] == list(toy_frame(20)["sentiment"])


def test_default_columns_are_text_and_label(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": ["a b", "c d", "e f", "g h"], "label": [1, 0, 1, 0]}).to_csv(path, index=False)
    task = load_task(TaskConfig(name=str(path)))
    assert task.labels == ("0", "1")  # numeric labels become strings
    assert list(task.data["label"]) == [1, 0, 1, 0]


def test_rows_with_empty_text_are_dropped(tmp_path):
    path = tmp_path / "e.csv"
    pd.DataFrame({"text": ["a", "", "  ", "b", "c"], "label": ["x", "y", "x", "y", "x"]}).to_csv(path, index=False)
    task = load_task(TaskConfig(name=str(path)))
    assert list(task.data["text"]) == ["a", "b", "c"]


@pytest.mark.skipif(not SMS_SPAM.is_file(), reason="shared SMS spam data not present")
def test_sms_spam_tsv():
    task = load_task(TaskConfig(name=str(SMS_SPAM), text_column="SMS", label_column="Label"))
    assert task.labels == ("ham", "spam")
    assert len(task.data) > 5000
    counts = np.bincount(task.data["label"])
    assert counts[0] > counts[1] > 500  # mostly ham, some spam


def test_encoding_option_reads_latin1(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9 ok,a\nna\xefve,b\n".encode("latin-1"))
    task = load_task(TaskConfig(name=str(path), encoding="latin-1"))
    assert list(task.data["text"]) == ["café ok", "naïve"]


# ---------------------------------------------------------------- bad input


def test_missing_text_column_lists_the_columns(toy_csv):
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name=str(toy_csv), text_column="body", label_column="sentiment"))
    msg = str(info.value)
    assert "no text column 'body'" in msg
    assert "review, sentiment, site, extra" in msg
    assert "task.text-column" in msg


def test_missing_label_column_lists_the_columns(toy_csv):
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name=str(toy_csv), text_column="review"))  # label column defaults to 'label'
    msg = str(info.value)
    assert "no label column 'label'" in msg and "review, sentiment" in msg and "task.label-column" in msg


def test_unknown_label_against_configured_labels(toy_csv):
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name=str(toy_csv), text_column="review", label_column="sentiment",
                             labels=("pos", "neutral")))
    msg = str(info.value)
    assert "unknown label 'neg'" in msg and "pos, neutral" in msg and "task.labels" in msg


def test_single_label_is_refused(tmp_path):
    path = tmp_path / "one.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["x", "x"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match="needs two or more"):
        load_task(TaskConfig(name=str(path)))


def test_missing_labels_are_refused(tmp_path):
    path = tmp_path / "nolabel.csv"
    path.write_text("text,label\na,x\nb,\nc,y\n")
    with pytest.raises(DataError, match="1 rows have no label"):
        load_task(TaskConfig(name=str(path)))


def test_non_utf8_bytes_name_encoding_line_and_fix(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"text,label\nfine,a\ncaf\xe9,b\n")
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name=str(path)))
    msg = str(info.value)
    assert "utf-8" in msg and "line 3" in msg and "0xe9" in msg and "task.encoding" in msg


def test_unknown_encoding(tmp_path, toy_csv):
    with pytest.raises(DataError, match="Unknown encoding task.encoding='klingon'"):
        load_task(TaskConfig(name=str(toy_csv), encoding="klingon"))


def test_missing_file(tmp_path):
    missing = tmp_path / "nope" / "data.csv"
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name=str(missing)))
    assert str(missing) in str(info.value) and "does not exist" in str(info.value) and "task.name" in str(info.value)


def test_directory_with_data_suffix_is_not_a_file(tmp_path):
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="does not exist \\(or is not a file\\)"):
        load_task(TaskConfig(name=str(folder)))


def test_unknown_file_type(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("text,label\na,b\n")
    with pytest.raises(DataError, match=r"unknown file type '\.txt'.*\.csv"):
        load_task(TaskConfig(name=str(path)))


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="Cannot read .* as Parquet"):
        load_task(TaskConfig(name=str(path)))


def test_malformed_jsonl(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "label": "x"}\n{not json\n')
    with pytest.raises(DataError, match="Cannot parse .* as JSONL"):
        load_task(TaskConfig(name=str(path)))


def test_unreadable_file_chmod(tmp_path, toy_csv):
    os.chmod(toy_csv, 0)
    try:
        if os.access(toy_csv, os.R_OK):
            pytest.skip("running as a user (root) that can read a chmod 000 file")
        with pytest.raises(DataError, match="is not readable.*permissions"):
            load_task(TaskConfig(name=str(toy_csv), text_column="review", label_column="sentiment"))
    finally:
        os.chmod(toy_csv, 0o644)


def test_unreadable_file_permission_error_is_mapped(toy_csv, monkeypatch):
    """The same path as the chmod test, forced, so it runs as root too."""
    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError) as info:
        load_task(TaskConfig(name=str(toy_csv), text_column="review", label_column="sentiment", max_examples=7))
    assert "is not readable: Permission denied" in str(info.value) and "permissions" in str(info.value)


def test_read_file_direct_suffix_check(tmp_path):
    path = tmp_path / "x.xlsx"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="unknown file type"):
        _read_file(path, "utf-8")


# ---------------------------------------------------------------- partitioning


def _toy_task(tmp_path, n=120, labels=("neg", "pos"), groups=6, name="toy"):
    path = _write(toy_frame(n, labels, groups), tmp_path / f"{name}.csv")
    return load_task(TaskConfig(name=str(path), text_column="review", label_column="sentiment"))


def _split_signature(fed) -> tuple:
    return (fed.global_test.texts, tuple((s.train.texts, s.test.texts) for s in fed.silos))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "natural"])
def test_partition_is_seeded_disjoint_and_complete(tmp_path, kind):
    task = _toy_task(tmp_path, n=240, labels=("a", "b", "c"))
    cfg = PartitionConfig(kind=kind, num_silos=3, column="site", alpha=1.0)
    fed = partition(task, cfg, 0.2, 0.25, seed=0)
    again = partition(task, cfg, 0.2, 0.25, seed=0)
    other = partition(task, cfg, 0.2, 0.25, seed=1)
    assert _split_signature(fed) == _split_signature(again)
    assert _split_signature(fed) != _split_signature(other)

    assert len(fed.silos) == 3
    silo_sets = []
    for silo in fed.silos:
        assert len(silo.train) > 0 and len(silo.test) > 0
        assert not set(silo.train.texts) & set(silo.test.texts)
        assert len(silo.train.labels) == len(silo.train.texts)
        silo_sets.append(set(silo.train.texts) | set(silo.test.texts))
    for i in range(3):
        for j in range(i + 1, 3):
            assert not silo_sets[i] & silo_sets[j], f"silos {i} and {j} share examples"
    pooled = set().union(*silo_sets)
    assert not pooled & set(fed.global_test.texts), "global test set overlaps silo data"
    # nothing lost, nothing duplicated
    assert len(pooled) + len(fed.global_test) == len(task.data) == len(all_texts(fed)) + len(fed.global_test)
    assert len(fed.global_test) == pytest.approx(0.2 * len(task.data), abs=1)
    # labels travel with their texts
    truth = dict(zip(task.data["text"], task.data["label"]))
    for silo in fed.silos:
        assert all(truth[t] == y for t, y in zip(silo.train.texts, silo.train.labels))
    assert all(truth[t] == y for t, y in zip(fed.global_test.texts, fed.global_test.labels))


def test_natural_partition_keeps_each_group_in_one_silo(tmp_path):
    task = _toy_task(tmp_path, n=240, groups=7)
    fed = partition(task, PartitionConfig(kind="natural", num_silos=3, column="site"), 0.2, 0.2, seed=0)
    site = dict(zip(task.data["text"], task.data["site"]))
    owners = defaultdict(set)
    for i, silo in enumerate(fed.silos):
        for t in (*silo.train.texts, *silo.test.texts):
            owners[site[t]].add(i)
    assert len(owners) == 7
    assert all(len(v) == 1 for v in owners.values()), dict(owners)


def test_natural_partition_of_drug_reviews_by_condition():
    fed = load_federation(TaskConfig(name="drug-reviews"), PartitionConfig(kind="natural", num_silos=4), 0)
    task = fed.task
    conditions = defaultdict(set)
    for text, cond in zip(task.data["text"], task.data["condition"]):
        conditions[text].add(cond)
    owners = defaultdict(set)
    for i, silo in enumerate(fed.silos):
        assert len(silo.train) > 0 and len(silo.test) > 0
        for t in (*silo.train.texts, *silo.test.texts):
            if len(conditions[t]) == 1:  # one review text appears twice in the data
                owners[next(iter(conditions[t]))].add(i)
    assert len(owners) > 4
    split = {c: s for c, s in owners.items() if len(s) > 1}
    assert not split, f"conditions spread over several silos: {split}"
    assert not set(all_texts(fed)) & set(fed.global_test.texts)


def test_dirichlet_small_alpha_skews_labels(tmp_path):
    task = _toy_task(tmp_path, n=600, labels=("a", "b", "c"))
    fed = partition(task, PartitionConfig(kind="dirichlet", num_silos=3, alpha=0.1), 0.2, 0.2, seed=0)
    iid = partition(task, PartitionConfig(kind="iid", num_silos=3), 0.2, 0.2, seed=0)

    def max_share(f):
        return max(np.bincount(s.train.labels, minlength=3).max() / len(s.train) for s in f.silos)

    assert max_share(fed) > max_share(iid) + 0.15


def test_too_many_silos_is_an_empty_silo_error(tmp_path):
    task = _toy_task(tmp_path, n=30)
    with pytest.raises(DataError) as info:
        partition(task, PartitionConfig(kind="iid", num_silos=20), 0.2, 0.2, seed=0)
    assert "gets" in str(info.value) and "fewer silos" in str(info.value)


def test_natural_partition_with_fewer_groups_than_silos(tmp_path):
    task = _toy_task(tmp_path, n=60, groups=2)
    with pytest.raises(DataError, match=r"Silo 2 gets 0 examples.*Use fewer silos"):
        partition(task, PartitionConfig(kind="natural", num_silos=3, column="site"), 0.2, 0.2, seed=0)


def test_natural_partition_missing_column(tmp_path):
    task = _toy_task(tmp_path, n=60)
    with pytest.raises(DataError) as info:
        partition(task, PartitionConfig(kind="natural", num_silos=2, column="hospital"), 0.2, 0.2, seed=0)
    msg = str(info.value)
    assert "'hospital'" in msg and "site" in msg and "partition.column" in msg


def test_unknown_partition_kind(tmp_path):
    task = _toy_task(tmp_path, n=60)
    with pytest.raises(ConfigError, match="Unknown partition.kind 'random'. Use one of: iid, dirichlet, natural"):
        partition(task, PartitionConfig(kind="random", num_silos=2), 0.2, 0.2, seed=0)
    with pytest.raises(ConfigError, match="at least 1"):
        partition(task, PartitionConfig(kind="iid", num_silos=0), 0.2, 0.2, seed=0)


def test_load_federation_is_shared_per_config(tmp_path):
    path = _write(toy_frame(80), tmp_path / "fed.csv")
    tcfg = TaskConfig(name=str(path), text_column="review", label_column="sentiment")
    pcfg = PartitionConfig(kind="iid", num_silos=2)
    assert load_federation(tcfg, pcfg, 0) is load_federation(tcfg, pcfg, 0)


def test_silo_from_file_checks_the_federation_labels(tmp_path):
    own = _write(toy_frame(30), tmp_path / "own.csv")
    file = SiloFile(str(own), text_column="review", label_column="sentiment", test_fraction=0.2)
    data, source = silo_from_file(file, ("neg", "pos"))
    assert len(data.train) + len(data.test) == 30 and len(data.test) == 6
    # the source's identity: every row, whatever the label order, the sampling or the split
    assert silo_from_file(replace(file, max_examples=20, split_seed=3, test_fraction=0.5), ("pos", "neg"))[1] == source
    with pytest.raises(DataError, match="unknown label"):
        silo_from_file(file, ("neg", "other"))


# ---------------------------------------------------------------- metrics


def _onehot(pred, k=3):
    return np.eye(k)[pred]


def test_metrics_hand_computed():
    y_true = [0, 0, 1, 1, 2]
    y_pred = [0, 1, 1, 1, 0]
    m = classification_metrics(y_true, _onehot(y_pred))
    assert m["accuracy"] == pytest.approx(3 / 5)
    # F1: class 0 = 0.5 (P 1/2, R 1/2); class 1 = 0.8 (P 2/3, R 1); class 2 = 0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert m["n"] == 5


def test_metrics_use_argmax_of_probabilities():
    probs = np.array([[0.6, 0.4], [0.45, 0.55], [0.2, 0.8], [0.9, 0.1]])
    m = classification_metrics([0, 0, 1, 1], probs)
    assert m["accuracy"] == pytest.approx(0.5)
    # predictions 0,1,1,0: each class P = R = 1/2
    assert m["macro_f1"] == pytest.approx(0.5)


def test_metrics_perfect_and_absent_classes():
    m = classification_metrics([0, 0, 1], _onehot([0, 0, 1]))  # class 2 absent in truth and predictions
    assert m == {"accuracy": 1.0, "macro_f1": 1.0, "n": 3}
    m = classification_metrics([1, 1, 1, 1], _onehot([0, 0, 0, 0]))
    assert m["accuracy"] == 0.0 and m["macro_f1"] == 0.0


def test_metrics_empty():
    m = classification_metrics([], np.zeros((0, 3)))
    assert m["n"] == 0 and np.isnan(m["accuracy"]) and np.isnan(m["macro_f1"])


def test_hugging_face_dataset_ids_use_load_dataset(monkeypatch):
    """An id that is neither built in nor a file goes to datasets.load_dataset; ClassLabel ids become names."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["world", "sports"])})
    fake = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": [f"story {i}" for i in range(20)], "label": [i % 2 for i in range(20)]},
                                            features=features),
        "test": datasets.Dataset.from_dict({"text": ["late story"], "label": [1]}, features=features)})
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: calls.append(name) or fake)
    task = load_task(TaskConfig(name="someone/news-topics"))
    assert calls == ["someone/news-topics"]
    assert task.labels == ("sports", "world") and len(task.data) == 21
    assert task.data["label"][task.data["text"].index("late story")] == task.labels.index("sports")


def test_an_unreachable_hub_dataset_is_a_clear_error(monkeypatch):
    import datasets

    def offline(name):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="as a local file or a Hugging Face dataset.*no route to host"):
        load_task(TaskConfig(name="someone/unreachable"))


def test_a_chosen_label_column_beside_a_column_named_label_is_read(tmp_path):
    frame = toy_frame(20).rename(columns={"review": "text", "sentiment": "stars"})
    frame["label"] = "unrelated"
    path = _write(frame, tmp_path / "both.csv")
    task = load_task(TaskConfig(name=str(path), label_column="stars"))
    assert set(task.labels) == {"neg", "pos"} and len(task.data) == 20
