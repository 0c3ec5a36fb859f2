"""The server as an adversary of a strict deployed silo (issue 24's audit): one test per finding, each against a silo
built exactly as a SuperNode builds it (``Silo.from_context`` from a run config and a node config with
``data-path``). The server controls the run config and every message; the silo's node config alone defines its
data, its ledger and what leaves it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config
from flwr.app import Message

from fedbridge import protocol as p
from fedbridge.client_app import app as client_app
from fedbridge.errors import ConfigError, PrivacyBudgetExceeded
from fedbridge.methods.crosslm.messages import SCORE, TRAIN_PRIVATE, UPLOAD
from fedbridge.privacy import PrivacyEvent
from fedbridge.privacy.policy import SiloLedger
from fedbridge.silo import Silo, _silo
from fedbridge.simulations.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = "neg,pos"
SECRETS = ("Patient-1000 HIV+", "hunter2", "s3cret!")


@pytest.fixture
def silo_file(tmp_path) -> Path:
    """The silo's own file: a text, a label, and a column the server must never see."""
    rows = [{"text": f"review {i} is {'good' if i % 2 else 'bad'} {'good' if i % 2 else 'bad'}",
             "label": "pos" if i % 2 else "neg", "secret": SECRETS[i % 3]} for i in range(60)]
    path = tmp_path / "own.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def node(silo_file: Path, tmp_path: Path, **extra) -> dict:
    return {"partition-id": 0, "data-path": str(silo_file), "state-dir": str(tmp_path / "state"), **extra}


def deployed(tmp_path: Path, node_config: dict, **run) -> Silo:
    """The silo a SuperNode builds for this run config (any keys the server chooses) and node config."""
    cfg = tiny_config(tmp_path, **{"task.labels": LABELS, **run})
    return Silo.from_context(SimpleNamespace(run_config=cfg.to_run_config(), node_config=node_config))


# ------------------------------------------------------------------ 1. the ledger does not reset


RESHAPING = [{"seed": 1}, {"task.max-examples": 11}, {"task.max-examples": 12}, {"task.silo-test-fraction": 0.5},
             {"task.labels": "pos,neg"}, {"canaries.enabled": True}, {"task.encoding": "latin-1"},
             {"task.text-column": "secret"}, {"task.label-column": "secret"}]


def test_no_run_config_change_gives_a_strict_silo_a_fresh_ledger_or_other_data(silo_file, tmp_path):
    base = deployed(tmp_path, node(silo_file, tmp_path))
    ledger = SiloLedger(base.state_dir / "privacy" / f"{base.data_id}.json", base.policy)
    ledger.charge([PrivacyEvent(0.7, 1.0, 1, "spent")], "earlier-run", 8.0)
    spent = ledger.spent()
    assert spent > 1
    for change in RESHAPING:
        silo = deployed(tmp_path, node(silo_file, tmp_path), **change)
        assert silo.data_id == base.data_id, change  # the same lifetime ledger ...
        assert silo.run_ledger(8.0, "new-run").ledger.spent() == pytest.approx(spent), change
        assert set(silo.data.train.texts) == set(base.data.train.texts), change  # ... and the same data
        assert set(silo.labels) == {"neg", "pos"}


def test_every_subset_a_node_config_takes_of_its_file_charges_the_same_ledger(silo_file, tmp_path):
    ids = {deployed(tmp_path, node(silo_file, tmp_path, **extra)).data_id
           for extra in ({}, {"max-examples": 30}, {"max-examples": 31}, {"split-seed": 4}, {"test-fraction": 0.5})}
    assert len(ids) == 1


# ------------------------------------------------------------------ 2. errors carry no data


def test_errors_that_cross_the_wire_carry_no_private_values_or_paths(silo_file, tmp_path):
    # the silo's file holds a label outside the run's label set: the detail names a private value
    cfg = tiny_config(tmp_path, method="local", **{"task.labels": "neg,other", "task.name": str(silo_file),
                                                   "task.label-column": "secret"})
    grid = InProcessGrid(client_app, cfg.to_run_config(), [node(silo_file, tmp_path)])
    try:
        [reply] = grid.send_and_receive([Message(p.request(), dst_node_id=1000, message_type=p.INFO,
                                                 group_id="0")], timeout=60)
    finally:
        grid.close()
    assert reply.has_error()
    reason = reply.error.reason
    assert not any(secret in reason for secret in (*SECRETS, "pos", str(silo_file), "row")), reason
    assert "silo's own log" in reason


# ------------------------------------------------------------------ 3. labels are never read from the data


def test_a_strict_silo_never_takes_its_label_set_from_a_column_the_server_names(silo_file, tmp_path):
    with pytest.raises(ConfigError, match="does not know its label set"):
        deployed(tmp_path, node(silo_file, tmp_path), **{"task.labels": "", "task.name": str(silo_file),
                                                         "task.label-column": "secret"})
    # with its own label list in the node config, the server's list must match it
    with pytest.raises(ConfigError, match="differs from this silo's node config"):
        deployed(tmp_path, node(silo_file, tmp_path, labels="neg,pos"), **{"task.labels": ",".join(SECRETS[1:])})


# ------------------------------------------------------------------ 6. canaries only where the silo opts in


def test_the_run_config_plants_no_canary_unless_the_node_config_allows_it_and_caps_its_copies(silo_file, tmp_path):
    plain = deployed(tmp_path, node(silo_file, tmp_path))
    asked = {"canaries.enabled": True, "canaries.copies": 50}
    assert deployed(tmp_path, node(silo_file, tmp_path), **asked).data == plain.data
    allowed = deployed(tmp_path, node(silo_file, tmp_path, canaries="allow", **{"canary-copies": 2}), **asked)
    planted = [t for t in allowed.data.train.texts if t not in plain.data.train.texts]
    assert len(planted) == 2 and len(set(planted)) == 1  # the cap, not the server's 50


# ------------------------------------------------------------------ 7. a seeded silo's noise is fresh every release


def test_a_node_noise_seed_gives_every_release_fresh_noise(silo_file, tmp_path):
    silo = deployed(tmp_path, node(silo_file, tmp_path, **{"noise-seed": 7}))
    candidates = ["one candidate", "another candidate", "a third"]
    first, _ = silo.dp_vote(candidates, 4.0, 2, 2, -1, "exp-1")
    second, _ = silo.dp_vote(candidates, 4.0, 2, 2, -1, "exp-2")  # the same noiseless histogram, another release
    assert not np.allclose(first, second)  # otherwise their difference would cancel the noise
    again = deployed(tmp_path / "other", node(silo_file, tmp_path / "other", **{"noise-seed": 7}))
    assert np.allclose(again.dp_vote(candidates, 4.0, 2, 2, -1, "exp-1")[0], first)  # still reproducible


def test_a_repeated_query_gets_the_same_answer_and_charges_nothing(silo_file, tmp_path):
    silo = deployed(tmp_path, node(silo_file, tmp_path))
    candidates = ["one candidate", "another candidate", "a third"]
    first, privacy = silo.dp_vote(candidates, 4.0, 2, 2, -1, "exp")
    ledger = SiloLedger(silo.state_dir / "privacy" / f"{silo.data_id}.json", silo.policy)
    spent = ledger.spent()
    for _ in range(3):  # averaging repeated answers would shrink the noise: the silo answers once
        again, privacy_again = silo.dp_vote(candidates, 4.0, 2, 2, -1, "exp")
        assert np.array_equal(again, first) and privacy_again == privacy
    assert ledger.spent() == spent and ledger.charges() == 1


# ------------------------------------------------------------------ 9. refusals quote nothing about other runs


def test_a_refusal_quotes_neither_the_lifetime_epsilon_spent_nor_how_many_runs_spent_it(silo_file, tmp_path):
    silo = deployed(tmp_path, node(silo_file, tmp_path, **{"epsilon-budget": 2.5}))
    ledger = SiloLedger(silo.state_dir / "privacy" / f"{silo.data_id}.json", silo.policy)
    for run in ("federation-a", "federation-b"):
        ledger.charge([PrivacyEvent(3.0, 1.0, 1, "votes")], run, 8.0)
    spent = f"{ledger.spent():.4g}"
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        silo.dp_vote(["a", "b"], 2.0, 1, 1, -1, "federation-c")
    message = str(refused.value)
    assert "epsilon-budget" in message and spent not in message and "2 runs" not in message and "over" not in message


def test_reshaping_keys_do_not_even_reach_the_silos_data_loader(silo_file, tmp_path):
    """Finding 1's root: a run-config key that used to reshape the data now leaves the cached silo unchanged."""
    cfg = tiny_config(tmp_path, **{"task.labels": LABELS})
    nodes = tuple(sorted(node(silo_file, tmp_path).items()))
    first = _silo(tuple(sorted(cfg.to_run_config().items())), nodes)
    other = dataclasses.replace(cfg, seed=3, task=dataclasses.replace(cfg.task, silo_test_fraction=0.6))
    second = _silo(tuple(sorted(other.to_run_config().items())), nodes)
    assert (first.data, first.data_id) == (second.data, second.data_id)


# ------------------------------------------------------------------ 5. a kept non-DP model never leaves as DP


def test_a_kept_non_dp_crosslm_model_is_not_released_under_a_later_runs_dp_label(silo_file, tmp_path):
    """Run A trains and keeps a non-DP SLM; run B, same experiment, says slm.dp-epsilon=4 and asks for the kept
    model's weights and scores: what leaves depends on how the kept model was trained, so a strict silo refuses."""
    run_a = tiny_config(tmp_path, method="crosslm", **{"task.labels": LABELS, "crosslm.scores": "slm"})
    run_b = tiny_config(tmp_path, method="crosslm", **{"task.labels": LABELS, "crosslm.scores": "slm",
                                                       "slm.dp-epsilon": 4.0, "crosslm.with-private": False})
    grid = InProcessGrid(client_app, run_a.to_run_config(), [node(silo_file, tmp_path)])
    config = {p.EXPERIMENT: "exp", "round": 1}
    try:
        [trained] = grid.send_and_receive([Message(p.request(config), dst_node_id=1000, message_type=TRAIN_PRIVATE,
                                                   group_id="0")], timeout=120)
        assert not trained.has_error()
        grid.contexts[1000].run_config = dict(run_b.to_run_config())  # the server changes its story
        examples = p.examples_record(SimpleNamespace(texts=["fine", "bad"], labels=[0, 1]))
        for message_type, content in ((UPLOAD, p.request(config)), (SCORE, p.request(config, examples=examples))):
            [reply] = grid.send_and_receive([Message(content, dst_node_id=1000, message_type=message_type,
                                                     group_id="1")], timeout=120)
            assert reply.has_error() and "allow-non-private=false" in reply.error.reason, message_type
            assert p.ARRAYS not in (reply.content if reply.has_content() else {})
    finally:
        grid.close()


# ------------------------------------------------------------------ 8. the server does not choose what the silo runs


@pytest.mark.parametrize("run, node_key", [
    ({"slm.model": "/etc"}, "allowed-models"), ({"llm.model": "some-org/any-hub-model"}, "allowed-models"),
    ({"fdkt.generator": "/home/someone/model"}, "allowed-models"), ({"slm.epochs": 100000}, "max-epochs"),
    ({"fdkt.max-tokens": 100000}, "max-tokens"), ({"llm.max-length": 100000}, "max-tokens")])
def test_a_strict_silo_loads_no_model_and_runs_no_size_its_node_config_does_not_allow(silo_file, tmp_path, run,
                                                                                      node_key):
    with pytest.raises(ConfigError, match=node_key):
        deployed(tmp_path, node(silo_file, tmp_path), method="fdkt", **run)
    extra = {"allowed-models": next(iter(run.values()))} if node_key == "allowed-models" else {node_key: 10**6}
    if node_key != "allowed-models":  # the silo's operator may raise its own caps
        assert deployed(tmp_path, node(silo_file, tmp_path, **extra), method="fdkt", **run).data


def test_a_strict_silo_refuses_a_message_with_more_texts_or_bytes_than_its_node_config_allows(silo_file, tmp_path):
    cfg = tiny_config(tmp_path, method="pe", **{"task.labels": LABELS})
    grid = InProcessGrid(client_app, cfg.to_run_config(), [node(silo_file, tmp_path, **{"max-request-texts": 5})])
    many = p.examples_record(SimpleNamespace(texts=[f"candidate {i}" for i in range(6)], labels=[0] * 6))
    try:
        [reply] = grid.send_and_receive([Message(p.request({"epsilon": 4.0, "releases": 1}, examples=many),
                                                 dst_node_id=1000, message_type=p.DP_VOTE, group_id="1")], timeout=60)
    finally:
        grid.close()
    assert reply.has_error() and "max-request-texts=5" in reply.error.reason
    assert not (tmp_path / "state" / "privacy").exists() or not any((tmp_path / "state" / "privacy").iterdir())


def test_fault_orders_in_the_run_config_do_not_reach_a_deployed_silo(silo_file, tmp_path):
    cfg = tiny_config(tmp_path, method="local", **{"task.labels": LABELS, "faults.crash-silos": "0",
                                                   "faults.crash-probability": 1.0})
    grid = InProcessGrid(client_app, cfg.to_run_config(), [node(silo_file, tmp_path)])
    try:
        [reply] = grid.send_and_receive([Message(p.request(), dst_node_id=1000, message_type=p.INFO, group_id="0")],
                                        timeout=60)
    finally:
        grid.close()
    assert not reply.has_error()


# ------------------------------------------------------------------ 4. no unlimited queries of the private data


def test_scores_on_the_private_test_split_leave_only_within_the_node_configs_budget(silo_file, tmp_path):
    """Each reply with test scores is a query (7/12 then 5/12 gave exact test counts; repeated global-test texts
    decoded a non-DP model's predictions): a strict silo answers a budgeted number of them, then withholds the
    scores; the epoch it chose on private data never leaves."""
    cfg = tiny_config(tmp_path, method="local", **{"task.labels": LABELS})
    grid = InProcessGrid(client_app, cfg.to_run_config(), [node(silo_file, tmp_path, **{"metrics-budget": 2})])
    global_test = SimpleNamespace(texts=["fine fine"] * 8 + ["bad bad"], labels=[1] * 8 + [0])
    try:
        replies = [grid.send_and_receive([Message(p.request(global_test=global_test), dst_node_id=1000,
                                                  message_type=p.TRAIN_LOCAL, group_id=str(i))], timeout=120)[0]
                   for i in range(3)]
    finally:
        grid.close()
    metrics = [dict(r.content[p.METRICS]) for r in replies]
    assert all("silo-test.accuracy" in m and "global-test.accuracy" in m for m in metrics[:2])
    assert not any("test." in k for k in metrics[2]) and metrics[2]["metrics-withheld"] == 1
    assert not any("epoch" in k or "seconds" in k or "examples" in k for m in metrics for k in m)


# ------------------------------------------------------------------ the whole of it, deployed


@pytest.mark.slow
def test_a_hostile_run_config_gets_only_refusals_from_strict_silos_over_a_real_deployment(silo_file, tmp_path):
    """Two strict SuperNodes on their own files behind TLS and node authentication; the server runs (1) a config
    that names a directory as its SLM, a private column as the label and plants canaries, (2) FedAvg without DP.
    Every silo refuses, with a reason that names the node-config key and quotes nothing of its data."""
    from fedbridge.deploy import LoopbackDeployment, silo_node_configs
    from fedbridge.results import RunRecord
    from fedbridge.simulations.runner import RunFailed

    second = tmp_path / "second.csv"
    pd.read_csv(silo_file).to_csv(second, index=False)
    server = tmp_path / "server.csv"  # the server's own public task: its global test set, the same two labels
    pd.DataFrame({"text": [f"public {w} text {i}" for i, w in enumerate(["good", "bad"] * 20)],
                  "label": ["pos", "neg"] * 20, "secret": ["pos", "neg"] * 20}).to_csv(server, index=False)
    common = {"task.name": str(server), "task.labels": LABELS, "timeout": 120.0, "partition.num-silos": 2}
    hostile = {**common, "slm.model": "/etc", "task.label-column": "secret", "canaries.enabled": True}
    runs = {"hostile-config": tiny_config(tmp_path, method="local", run_name="hostile-config", **hostile),
            "fedavg-no-dp": tiny_config(tmp_path, method="fedavg", run_name="fedavg-no-dp", **common)}
    with LoopbackDeployment(tmp_path / "federation", silo_node_configs([silo_file, second])) as deployment:
        for name, cfg in runs.items():
            with pytest.raises(RunFailed):
                deployment.run(cfg)
            record = RunRecord.read(tmp_path / f"{name}.json")
            reasons = [f["reason"] for f in record.failures] + [record.error or ""]
            assert record.failures, name
            assert all("allowed-models" in r or "allow-non-private=false" in r for r in reasons[:-1]), reasons
            assert not any(secret in r for r in reasons for secret in (*SECRETS, str(silo_file))), reasons
            assert all(m.get("num-train", 0) == 0 for m in record.silo_metrics.values())  # not even its size
