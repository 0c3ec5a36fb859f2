"""Checkpoint and resume: a ServerApp that dies mid-run resumes without losing or redoing finished work (FDKT's
demonstrations and augmented sets, FedAvg's rounds and weights, CrossLM's LLM adapter, batches, scores and per-silo
rounds, Social Learning's lessons, votes and student results, the run record), and a silo's spent privacy budget survives the restart: a resumed run cannot spend it
again."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from flwr.app import Message, RecordDict
from peft import LoraConfig, get_peft_model
from test_crosslm import FAST as FAST_CROSSLM
from test_social import FAST as FAST_SOCIAL

import fedbridge.methods.fdkt.server as fdkt
from fedbridge import protocol as p
from fedbridge.checkpoint import STATE_FILE, Checkpoint, checkpoint_dir
from fedbridge.client_app import app as client_app
from fedbridge.config import RENAMED, ExperimentConfig
from fedbridge.errors import ConfigError, PrivacyBudgetExceeded
from fedbridge.methods.crosslm import silo as crosslm_silo
from fedbridge.methods.crosslm.messages import ENHANCE, SCORE, TRAIN_PRIVATE, UPLOAD
from fedbridge.methods.fdkt.messages import SYNTHESIZE
from fedbridge.methods.fedavg.messages import TRAIN_FEDAVG
from fedbridge.methods.social.messages import SHARE_RAW, TEACH, VOTE
from fedbridge.models.loading import tiny_llm
from fedbridge.privacy import PrivacyEvent
from fedbridge.privacy.policy import SiloLedger, SiloPolicy
from fedbridge.results import RunRecord
from fedbridge.server_app import run_experiment
from fedbridge.silo import Silo
from fedbridge.simulations.inprocess import InProcessGrid
from fedbridge.simulations.runner import prepare
from fedbridge.tasks import Examples

pytestmark = pytest.mark.usefixtures("one_thread")
NODES = (1000, 1001)
FAST_FDKT = {"fdkt.generator": "tiny-llama", "fdkt.num-per-label": 2, "fdkt.max-tokens": 6,
             "fdkt.augment-per-label": 2, "fdkt.min-words": 1, "fdkt.max-new-tokens": 12,
             "fdkt.llm-filter": False, "fdkt.epsilon": 1.0}


class ServerKilled(Exception):
    """Stands for the ServerApp process dying at this point."""


class CrashingGrid(InProcessGrid):
    """An InProcessGrid whose server dies when it is about to push a matching message or has pulled a matching reply
    (the silo did the work; the server never saw it)."""

    def __init__(self, *args, die_on_push=None, die_on_reply=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.die_on_push, self.die_on_reply, self.dying = die_on_push, die_on_reply, False

    def push_messages(self, messages):
        messages = list(messages)
        if self.die_on_push and any(self.die_on_push(m) for m in messages):
            raise ServerKilled("server killed before sending")
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        """Replies before the matching one in a pull are handed over (the server handles a pull in order); the
        server dies on the next pull, so the outcome does not depend on how many replies one poll happens to see."""
        if self.dying:
            raise ServerKilled("server killed after a reply arrived")
        replies = list(super().pull_messages(message_ids))
        fatal = [i for i, r in enumerate(replies) if self.die_on_reply and self.die_on_reply(r)]
        if fatal:
            self.dying = True
            return replies[:fatal[0]] or self.pull_messages(message_ids)
        return replies


def is_(message_type: str, node: int | None = None, round_: str | None = None):
    def match(msg: Message) -> bool:
        node_of = msg.metadata.src_node_id if msg.metadata.reply_to_message_id else msg.metadata.dst_node_id
        return (msg.metadata.message_type == message_type and (node is None or node_of == node)
                and (round_ is None or msg.metadata.group_id == round_))
    return match


def attempt(tmp_path: Path, name: str, resume: bool = False, crosslm_options: dict | None = None,
            **grid_kwargs) -> tuple[RunRecord | None, CrashingGrid]:
    """One attempt of run ``name`` on silos whose state lives in tmp_path/silos (their own disks, across attempts);
    each attempt is a new Flower run: fresh node contexts, fresh node ids seen by the server."""
    method = name.split("-")[0]
    options = {"fdkt": FAST_FDKT, "fedavg": {"rounds": 3, "task.max-examples": 60}, "crosslm": FAST_CROSSLM,
               "social": SOCIAL_RESUMED, "pipeline": {**FAST_FDKT, **FAST_CROSSLM}}[method]
    options = {**options, **(crosslm_options or {})}
    cfg = prepare(tiny_config(tmp_path, method=method, run_name=name, resume=resume, **options))
    silos = [{"partition-id": i, "num-partitions": 2, "state-dir": str(tmp_path / "silos"), "noise-seed": 0}
             for i in range(2)]
    grid = CrashingGrid(client_app, cfg.to_run_config(), silos, **grid_kwargs)
    try:
        return run_experiment(grid, cfg), grid
    except ServerKilled:
        return None, grid
    finally:
        grid.close()


def sent(grid: InProcessGrid, message_type: str) -> list[tuple[int, str]]:
    return sorted((m.metadata.dst_node_id, m.metadata.group_id) for m in grid.sent
                  if m.metadata.message_type == message_type)


def without_timings(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def ledger_file(tmp_path: Path, silo: str) -> Path:
    """The lifetime privacy ledger of ``silo``'s data, in its state dir (one file per data identity)."""
    cfg = tiny_config(tmp_path, method="fdkt", **FAST_FDKT)
    index = int(silo.removeprefix("silo-"))
    node = {"partition-id": index, "num-partitions": 2, "state-dir": str(tmp_path / "silos")}
    silo = Silo.from_context(SimpleNamespace(run_config=cfg.to_run_config(), node_config=node))
    return silo.state_dir / "privacy" / f"{silo.data_id}.json"


def run_spent(path: Path, experiment: str) -> float:
    return SiloLedger(path, SiloPolicy()).spent(experiment)


# ------------------------------------------------------------------ the Checkpoint itself


def run_record(cfg: ExperimentConfig) -> RunRecord:
    return RunRecord(run_name=cfg.run_name, method=cfg.method, seed=cfg.seed, config=cfg.to_run_config())


def test_steps_data_and_the_record_survive_a_restart(tmp_path):
    cfg = tiny_config(tmp_path, run_name="unit")
    record = run_record(cfg)
    ckpt = Checkpoint.for_run(cfg, record)
    examples = Examples.of(["naïve text", "b"], [2, 0])
    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.int64)}
    ckpt.save_examples("demonstrations/silo-0", examples)
    ckpt.save_arrays("global-round-1", weights)
    record.failures.append({"silo": "silo-1", "message_type": "x", "round": 1, "reason": "down"})
    record.server_metrics["fdkt.generated"] = 4
    ckpt.complete("demonstrations/silo-0", sources=["silo-0"])
    record.server_metrics["fdkt.generated"] = 99  # after the last step: not part of the checkpoint

    resumed_record = run_record(cfg)
    resumed = Checkpoint.for_run(tiny_config(tmp_path, run_name="unit", resume=True, timeout=5.0), resumed_record)
    assert resumed.experiment == ckpt.experiment and resumed.attempt == 2
    assert resumed.done("demonstrations/silo-0") == {"sources": ["silo-0"]} and resumed.done("trained/silo-0") is None
    assert list(resumed.steps("demonstrations/")) == ["demonstrations/silo-0"]
    assert resumed.load_examples("demonstrations/silo-0") == examples
    assert all(torch.equal(resumed.load_arrays("global-round-1")[k], v) for k, v in weights.items())
    assert resumed.load_examples("demonstrations/silo-1") is None and resumed.load_arrays("nothing") is None
    assert resumed_record.failures == record.failures and resumed_record.server_metrics == {"fdkt.generated": 4}
    assert any("resumed from" in n and "1 completed steps" in n for n in resumed_record.notes)
    assert 0 < resumed.prior_elapsed < 60
    resumed.delete("global-round-1")
    assert resumed.load_arrays("global-round-1") is None
    resumed.remove()
    assert not checkpoint_dir(tmp_path, "unit").exists()


def test_a_new_run_replaces_an_old_checkpoint_and_resume_checks_the_config(tmp_path):
    cfg = tiny_config(tmp_path, run_name="again")
    first = Checkpoint.for_run(cfg, run_record(cfg))
    first.complete("round-1")
    with pytest.raises(ConfigError, match=r"differs .* seed: 0 -> 1"):
        Checkpoint.for_run(tiny_config(tmp_path, run_name="again", seed=1, resume=True), run_record(cfg))
    record = run_record(cfg)
    fresh = Checkpoint.for_run(cfg, record)  # resume=false: a new experiment
    assert fresh.experiment != first.experiment and fresh.steps() == {}
    assert any("discarded" in n for n in record.notes)
    with pytest.raises(ConfigError, match="needs the run-name"):
        Checkpoint.for_run(tiny_config(tmp_path, resume=True), run_record(cfg))
    never_ran = tiny_config(tmp_path, run_name="never-ran", resume=True)
    missing = run_record(never_ran)
    assert Checkpoint.for_run(never_ran, missing).steps() == {}
    assert any("no checkpoint" in n and "from the beginning" in n for n in missing.notes)
    (checkpoint_dir(tmp_path, "again") / STATE_FILE).write_text("{half a fi")
    with pytest.raises(ConfigError, match="unreadable"):
        Checkpoint.for_run(tiny_config(tmp_path, run_name="again", resume=True), run_record(cfg))


def test_a_checkpoint_older_than_a_config_key_resumes_while_the_key_is_at_its_default(tmp_path):
    cfg = tiny_config(tmp_path, run_name="older")
    Checkpoint.for_run(cfg, run_record(cfg)).complete("round-1")
    state_path = checkpoint_dir(tmp_path, "older") / STATE_FILE
    state = json.loads(state_path.read_text())
    del state["config"]["slm.class-balanced"]  # as written by a fedbridge without the key
    state_path.write_text(json.dumps(state))
    resumed = Checkpoint.for_run(tiny_config(tmp_path, run_name="older", resume=True), run_record(cfg))
    assert resumed.done("round-1") == {}
    changed = tiny_config(tmp_path, run_name="older", resume=True, **{"slm.class-balanced": False})  # not the default
    with pytest.raises(ConfigError, match=r"slm.class-balanced: '\(absent\)' -> False"):
        Checkpoint.for_run(changed, run_record(cfg))


def test_a_checkpoint_written_under_moved_key_names_resumes(tmp_path):
    """canaries.* was social.canary-* before it became its own section: such a checkpoint still resumes."""
    cfg = tiny_config(tmp_path, run_name="moved", **{"canaries.enabled": True})
    Checkpoint.for_run(cfg, run_record(cfg)).complete("round-1")
    state_path = checkpoint_dir(tmp_path, "moved") / STATE_FILE
    state = json.loads(state_path.read_text())
    for old, new in RENAMED.items():
        state["config"][old] = state["config"].pop(new)
    state_path.write_text(json.dumps(state))
    again = tiny_config(tmp_path, run_name="moved", resume=True, **{"canaries.enabled": True})
    assert Checkpoint.for_run(again, run_record(cfg)).done("round-1") == {}
    with pytest.raises(ConfigError, match=r"canaries.enabled: True -> False"):
        Checkpoint.for_run(tiny_config(tmp_path, run_name="moved", resume=True), run_record(cfg))


def test_names_cannot_leave_the_checkpoint_directory(tmp_path):
    cfg = tiny_config(tmp_path, run_name="names")
    ckpt = Checkpoint.for_run(cfg, run_record(cfg))
    for bad in ("../escape", "/abs", "a//b", ""):
        with pytest.raises(ValueError, match="checkpoint name"):
            ckpt.save_examples(bad, Examples.of([], []))


def test_adapter_state_round_trips_into_a_fresh_peft_model(tmp_path):
    def lora_model():
        model, _ = tiny_llm(seed=0)
        return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))

    cfg = tiny_config(tmp_path, run_name="adapter")
    ckpt = Checkpoint.for_run(cfg, run_record(cfg))
    tuned = lora_model()
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)  # lora_B starts at zero: make the adapter do something
    ckpt.save_adapter("llm-adapter", tuned)
    fresh = lora_model()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert not torch.allclose(fresh(input_ids=ids).logits, tuned(input_ids=ids).logits)
    assert ckpt.load_adapter("llm-adapter", fresh) is True
    assert torch.allclose(fresh(input_ids=ids).logits, tuned(input_ids=ids).logits)
    assert ckpt.load_adapter("no-such-adapter", fresh) is False
    saved = ckpt.load_arrays("llm-adapter")
    assert saved and all("lora_" in k for k in saved)  # the adapter only, not the frozen base


# ------------------------------------------------------------------ the silo's persistent ledger


def test_the_lifetime_ledger_keeps_every_charge_of_every_run(tmp_path):
    path = tmp_path / "privacy" / "data.json"
    event = PrivacyEvent(noise_multiplier=2.0, sample_rate=0.05, steps=100, mechanism="dp-fewshot")  # eps 1.11
    ledger = SiloLedger(path, SiloPolicy(epsilon_budget=1.5, allow_non_private=False))  # twice: 1.57
    one = ledger.charge([event], "run-1", run_budget=5.0)
    assert SiloLedger(path, SiloPolicy()).spent("run-1") == pytest.approx(one)  # written at the charge
    before = path.read_text()
    with pytest.raises(PrivacyBudgetExceeded, match="epsilon-budget 1.5"):  # a new run cannot get more
        SiloLedger(path, SiloPolicy(epsilon_budget=1.5, allow_non_private=False)).charge([event], "run-2", 5.0)
    assert path.read_text() == before


# ------------------------------------------------------------------ FDKT: kill the server, resume


@pytest.fixture(scope="module")
def fdkt_uninterrupted(tmp_path_factory) -> RunRecord:
    record, _ = attempt(tmp_path_factory.mktemp("reference"), "fdkt-resume")
    assert record.status == "ok" and record.failures == []
    return record


def test_fdkt_resumes_without_asking_or_augmenting_again(tmp_path, monkeypatch, fdkt_uninterrupted):
    # attempt 1 dies when it is about to send silo 1 its augmented set: both silos' demonstrations, the augmented
    # sets and the silos' votes on them are checkpointed, no silo has trained yet
    first, _ = attempt(tmp_path, "fdkt-resume", die_on_push=is_(p.TRAIN_AUGMENTED, NODES[1]))
    assert first is None
    failed = RunRecord.read(tmp_path / "fdkt-resume.json")
    assert failed.status == "failed" and "ServerKilled" in failed.error
    assert any("resume=true run-name=fdkt-resume" in n for n in failed.notes)
    directory = checkpoint_dir(tmp_path, "fdkt-resume")
    state = json.loads((directory / STATE_FILE).read_text())
    assert sorted(state["steps"]) == ["augmented/silo-0", "augmented/silo-1", "demonstrations/silo-0",
                                      "demonstrations/silo-1", "votes"]
    made = {line["set"]: {"texts": line["texts"], "labels": line["labels"]}  # the voted sets attempt 1 made
            for line in map(json.loads, (tmp_path / "fdkt-resume.contributions.jsonl").read_text().splitlines())
            if line["kind"] == "synthetic"}
    ledgers = {s: ledger_file(tmp_path, s).read_text() for s in ("silo-0", "silo-1")}

    augmented = []
    monkeypatch.setattr(fdkt, "augment", lambda *args, **kwargs: augmented.append(1))
    resumed, grid = attempt(tmp_path, "fdkt-resume", resume=True)
    assert resumed.status == "ok" and resumed.failures == [] and augmented == []
    assert sent(grid, SYNTHESIZE) == [] == sent(grid, p.DP_VOTE)
    assert sent(grid, p.TRAIN_AUGMENTED) == [(NODES[0], "2"), (NODES[1], "2")]
    requests = {m.metadata.dst_node_id: m for m in grid.sent if m.metadata.message_type == p.TRAIN_AUGMENTED}
    for node, silo in zip(NODES, ("silo-0", "silo-1")):  # each silo trains on exactly the set attempt 1 made
        assert dict(requests[node].content[p.EXAMPLES]) == made[silo]
        assert resumed.silo_metrics[silo]["train.synthetic"] == len(made[silo]["texts"])
    assert {s: ledger_file(tmp_path, s).read_text() for s in ledgers} == ledgers  # no new spend
    # what attempt 1 measured is carried over, not measured again; and the record is as complete as an
    # uninterrupted run's
    snapshot, reference = state["record"], fdkt_uninterrupted
    assert resumed.privacy == snapshot["privacy"] == reference.privacy  # the DP noise has a fixed seed here
    assert resumed.tokens == snapshot["tokens"]
    assert without_timings(resumed.server_metrics) == without_timings(snapshot["server_metrics"])
    assert set(resumed.server_metrics) == set(reference.server_metrics)
    assert {s: set(m) for s, m in resumed.silo_metrics.items()} == {
        s: set(m) for s, m in reference.silo_metrics.items()}
    assert set(resumed.global_metrics) == set(reference.global_metrics)
    assert any("resumed from" in n for n in resumed.notes)
    assert not directory.exists()  # done: the record is the result
    lines = [json.loads(x) for x in (tmp_path / "fdkt-resume.contributions.jsonl").read_text().splitlines()]
    contributions = [line for line in lines if line["silo"] != "server"]
    assert len(contributions) == 2  # each silo's demonstrations were received once
    assert sorted((line["kind"], line["set"]) for line in lines if line["silo"] == "server") == [
        ("augmented", "silo-0"), ("augmented", "silo-1"), ("synthetic", "silo-0"), ("synthetic", "silo-1")]  # once


def test_a_resumed_run_cannot_spend_a_silos_budget_again(tmp_path, fdkt_uninterrupted):
    # attempt 1 dies right after silo 1 released its demonstrations: silo 1 has spent its budget, the server
    # never saw the release
    first, _ = attempt(tmp_path, "fdkt-resume", die_on_reply=is_(SYNTHESIZE, NODES[1]))
    assert first is None
    state = json.loads((checkpoint_dir(tmp_path, "fdkt-resume") / STATE_FILE).read_text())
    assert "demonstrations/silo-0" in state["steps"] and "demonstrations/silo-1" not in state["steps"]
    path = ledger_file(tmp_path, "silo-1")
    assert run_spent(path, state["experiment"]) == pytest.approx(1.0, abs=0.011)
    on_disk = path.read_text()

    resumed, grid = attempt(tmp_path, "fdkt-resume", resume=True)  # a new Flower run: fresh node state
    assert resumed.status == "ok"
    assert sent(grid, SYNTHESIZE) == [(NODES[1], "1")]  # silo 0's demonstrations came from the checkpoint
    [failure] = resumed.failures
    assert failure["silo"] == "silo-1" and "PrivacyBudgetExceeded" in failure["reason"]
    assert "is spent" in failure["reason"] and "of the 1 it asked for" in failure["reason"]
    before, after = json.loads(on_disk), json.loads(path.read_text())  # refused: nothing charged, nothing released
    [key] = [k for k, v in before.items() if isinstance(v, list)]
    new = after[key][len(before[key]):]
    assert after[key][:len(before[key])] == before[key]
    assert [e["event"]["mechanism"] for e in new] == ["dp-nn-votes"]  # but it voted on silo 0's set
    assert "train.synthetic" not in resumed.silo_metrics.get("silo-1", {})
    assert resumed.privacy["silo-1"]["mechanism"] == "dp-nn-votes"  # it still voted on silo 0's set
    assert resumed.privacy["silo-0"] == fdkt_uninterrupted.privacy["silo-0"]
    assert set(resumed.silo_metrics["silo-0"]) == set(fdkt_uninterrupted.silo_metrics["silo-0"])


# ------------------------------------------------------------------ FedAvg: kill the server in round 3, resume


def test_fedavg_resumes_at_the_round_it_lost(tmp_path):
    reference, _ = attempt(tmp_path / "reference", "fedavg-resume")
    # three rounds of weights are one non-private release of each silo's data in its lifetime ledger, not three
    ledgers = sorted((tmp_path / "reference" / "silos" / "privacy").glob("*.json"))
    assert len(ledgers) == 2 and all([c["event"]["mechanism"] for c in json.loads(path.read_text())["charges"]] ==
                                     ["SLM weights"] for path in ledgers)
    first, _ = attempt(tmp_path, "fedavg-resume", die_on_push=is_(TRAIN_FEDAVG, round_="3"))
    assert first is None
    state = json.loads((checkpoint_dir(tmp_path, "fedavg-resume") / STATE_FILE).read_text())
    assert list(state["steps"]) == ["round-1", "round-2"]
    files = sorted(f.name for f in checkpoint_dir(tmp_path, "fedavg-resume").iterdir())
    assert files == ["global-round-2.safetensors", STATE_FILE]  # only the latest weights are kept

    resumed, grid = attempt(tmp_path, "fedavg-resume", resume=True)
    assert resumed.status == "ok" and resumed.failures == []
    assert sent(grid, TRAIN_FEDAVG) == [(NODES[0], "3"), (NODES[1], "3")]  # rounds 1-2 are not redone
    losses = {k: v for k, v in resumed.server_metrics.items() if k.startswith("round-")}
    assert losses == {k: v for k, v in reference.server_metrics.items() if k.startswith("round-")}
    assert set(losses) == {f"round-{r}.{m}" for r in (1, 2, 3) for m in ("train-loss", "silos")}
    assert resumed.global_metrics == reference.global_metrics
    by_round = resumed.communication["by_round"]
    assert set(by_round) == {"0", "1", "2", "3", "4"}  # both attempts' traffic, by round
    times = [e["t"] for e in resumed.timelines["silo-0"]]
    assert times == sorted(times)  # the timeline goes on where the first attempt's stopped
    assert not math.isnan(resumed.wall_seconds) and resumed.wall_seconds > 0


# ------------------------------------------------------------------ CrossLM: kill the server, resume


def checkpoint_state(tmp_path: Path, name: str) -> dict:
    return json.loads((checkpoint_dir(tmp_path, name) / STATE_FILE).read_text())


def assert_same_results(got: RunRecord, want: RunRecord) -> None:
    """The same metrics and counters as a run that was never interrupted: counts exactly, floats up to the noise of
    one process (a silo thread's dropout and the server's model loading share torch's global RNG, so two
    uninterrupted in-process runs differ in the 4th digit too)."""
    def flat(record: RunRecord) -> dict[str, float]:
        silos = {f"{s}/{k}": v for s, m in record.silo_metrics.items() for k, v in m.items()}
        return {k: v for k, v in {**record.global_metrics, **silos, **record.server_metrics,
                                  **{f"tokens/{k}": v for k, v in record.tokens.items()}}.items()
                if "seconds" not in k}

    a, b = flat(got), flat(want)
    assert a.keys() == b.keys()
    counts = {k for k, v in b.items() if isinstance(v, int) and not k.startswith("tokens/")}
    assert {k: a[k] for k in counts} == {k: b[k] for k in counts}
    floats = a.keys() - counts
    assert {k: a[k] for k in floats} == pytest.approx({k: b[k] for k in floats}, rel=0.02, nan_ok=True)


@pytest.fixture(scope="module")
def crosslm_uninterrupted(tmp_path_factory) -> dict[str, RunRecord]:
    out = {}
    for mode, score_on in CROSSLM_VARIANTS:
        record, _ = attempt(tmp_path_factory.mktemp(f"reference-{mode}"), f"crosslm-{mode}-{score_on}",
                            crosslm_options=crosslm_variant(mode, score_on))
        assert record.status == "ok" and record.failures == []
        out[mode, score_on] = record
    return out


CROSSLM_VARIANTS = [("async", "silo"), ("sync", "silo"), ("async", "server"), ("sync", "server")]


def crosslm_variant(mode: str, score_on: str) -> dict:
    """score-on=silo with the default DP-vote scores; score-on=server scores with the uploaded SLMs."""
    return {"crosslm.mode": mode, "crosslm.score-on": score_on, **({"crosslm.scores": "slm"} if score_on == "server"
                                                                   else {})}


@pytest.mark.parametrize("mode,score_on", CROSSLM_VARIANTS)
def test_crosslm_resumes_with_its_llm_adapter_batches_and_silo_rounds(tmp_path, mode, score_on,
                                                                      crosslm_uninterrupted):
    """Attempt 1 dies when silo 1's round-1 enhancement reply arrives: silo 1 has trained round 1, the server never
    saw it; the LLM has been updated on batch 1. The resumed run reloads the adapter, its optimizer and batch 1,
    writes batch 2 only, asks silo 1 for round 1 again (answered from its disk, not retrained), and ends with exactly
    the numbers of an uninterrupted run."""
    name, options = f"crosslm-{mode}-{score_on}", crosslm_variant(mode, score_on)
    first, _ = attempt(tmp_path, name, crosslm_options=options, die_on_reply=is_(ENHANCE, NODES[1], "1"))
    assert first is None
    state = checkpoint_state(tmp_path, name)["steps"]["crosslm"]
    assert state["version"] >= 1 and len(state["batches"]) >= 1 and state["progress"]["silo-1"] == {"scored": 1, "enhanced": 0}
    assert (checkpoint_dir(tmp_path, name) / f"llm-v{state['version']}.safetensors").exists()
    assert (checkpoint_dir(tmp_path, name) / f"llm-v{state['version']}.optim.pt").exists()
    experiment = checkpoint_state(tmp_path, name)["experiment"]
    silo_meta = tmp_path / "silos" / experiment / "silo-1-crosslm.json"
    assert json.loads(silo_meta.read_text())["round"] == 1  # the silo finished round 1 before the server died

    resumed, grid = attempt(tmp_path, name, resume=True, crosslm_options=options)
    assert resumed.status == "ok" and resumed.failures == []
    assert sent(grid, TRAIN_PRIVATE) == []  # both silos' private training is kept
    assert (NODES[1], "1") not in sent(grid, SCORE)  # its batch-1 scores are in the checkpoint
    assert sent(grid, UPLOAD) == []  # score-on=server: the server's copies of the SLMs are in its checkpoint
    assert (NODES[1], "1") in sent(grid, ENHANCE)  # asked again; the silo answers from its disk
    assert resumed.server_metrics["crosslm.batches"] == 2
    assert_same_results(resumed, crosslm_uninterrupted[mode, score_on])  # nothing lost, nothing done twice
    steps = [json.loads(line) for line in Path(resumed.artifacts["crosslm-steps"]).read_text().splitlines()]
    assert [e["step"] for e in steps] == list(range(1, resumed.server_metrics["crosslm.llm-steps"] + 1))
    assert not checkpoint_dir(tmp_path, name).exists()
    assert not list((tmp_path / "silos" / experiment).glob("*-slm.safetensors"))  # final round: weights not kept


def test_a_silo_answers_a_finished_crosslm_round_again_and_refuses_one_it_cannot_have(tmp_path):
    cfg = tiny_config(tmp_path, method="crosslm")
    silo = Silo.from_context(SimpleNamespace(run_config=cfg.to_run_config(),
                                             node_config={"partition-id": 0, "state-dir": str(tmp_path)}))
    before = crosslm_silo.train_private(silo, RecordDict(), None, experiment="exp1")
    assert crosslm_silo.train_private(silo, RecordDict(), None, experiment="exp1") == before  # stored, not trained
    examples = Examples.of(["good stuff here", "bad stuff there"], [2, 0])

    def enhance(round_: int, final: bool = False) -> dict:
        return crosslm_silo.enhance(silo, RecordDict(), examples, None, 1, 1.0, False, None, round_, "exp1", final)

    with pytest.raises(p.ProtocolError, match="after round 1"):
        enhance(2)  # it has round 0 only
    first = enhance(1)  # from the round-0 SLM on its disk (fresh node state, as in a new Flower run)
    assert first["train.synthetic"] == 2 and enhance(1) == first
    assert crosslm_silo.score(silo, RecordDict(), ("fine",), 1, "exp1").shape == (1, 3)
    with pytest.raises(p.ProtocolError, match="after round 0"):
        crosslm_silo.score(silo, RecordDict(), ("fine",), 0, "exp1")  # only the latest round is kept
    last = enhance(2, final=True)
    assert enhance(2, final=True) == last and not list(tmp_path.glob("exp1/*.safetensors"))


def test_a_silo_killed_while_keeping_its_crosslm_slm_still_has_the_round_before(tmp_path, monkeypatch):

    cfg = tiny_config(tmp_path, method="crosslm")
    silo = Silo.from_context(SimpleNamespace(run_config=cfg.to_run_config(),
                                             node_config={"partition-id": 1, "state-dir": str(tmp_path)}))
    crosslm_silo.train_private(silo, RecordDict(), None, experiment="exp2")
    round0 = crosslm_silo.kept_slm(silo, RecordDict(), 0, "exp2").trainable_state()

    def killed(path, data):
        raise ServerKilled("silo killed before its round-1 JSON was written")

    monkeypatch.setattr(crosslm_silo, "atomic_write", killed)
    with pytest.raises(ServerKilled):
        crosslm_silo.enhance(silo, RecordDict(), Examples.of(["a new text to learn"], [1]), None, 3, 1.0, False, None,
                             1, "exp2")
    monkeypatch.undo()
    again = crosslm_silo.kept_slm(silo, RecordDict(), 0, "exp2").trainable_state()  # round 0, not the half-kept 1
    assert all(torch.equal(again[k], v) for k, v in round0.items())
    assert crosslm_silo.crosslm_done(silo, "exp2", 1) is None


# ------------------------------------------------------------------ Social Learning: kill the server, resume

# DP teachers (a teacher asked again could not teach: its budget is spent), every round on the wire, canaries
SOCIAL_RESUMED = {**FAST_SOCIAL, "social.dp": "dp-fewshot", "social.epsilon": 8.0,
                  "social.aggregators": "voting,random", "social.baselines": "zero-shot,original",
                  "canaries.enabled": True}


@pytest.fixture(scope="module")
def social_uninterrupted(tmp_path_factory) -> RunRecord:
    record, _ = attempt(tmp_path_factory.mktemp("reference-social"), "social-resume")
    assert record.status == "ok" and record.failures == []
    return record


@pytest.mark.parametrize("die_before", [VOTE, SHARE_RAW])
def test_social_resumes_without_asking_a_teacher_again(tmp_path, die_before, social_uninterrupted):
    """Killed before the vote (lessons checkpointed) or before the original baseline (votes too): the resumed run
    sends no query.teach (the DP teachers have spent their budgets), votes again only if it had not, and ends with
    the numbers of an uninterrupted run."""
    first, _ = attempt(tmp_path, "social-resume", die_on_push=is_(die_before))
    assert first is None
    steps = checkpoint_state(tmp_path, "social-resume")["steps"]
    assert {"lesson/silo-0", "lesson/silo-1"} <= set(steps)
    assert ("vote/silo-0" in steps) == (die_before == SHARE_RAW)
    resumed, grid = attempt(tmp_path, "social-resume", resume=True)
    assert resumed.status == "ok" and resumed.failures == []
    assert sent(grid, TEACH) == []
    assert len(sent(grid, VOTE)) == (2 if die_before == VOTE else 0)
    assert resumed.privacy == social_uninterrupted.privacy
    # the DP teachers' examples are accounted; the votes and raw examples beside them make the run non-private
    assert all(v["epsilon-dp"] <= 8.0 and v["private"] is False and v["non-private"] == "votes, raw examples"
               for v in resumed.privacy.values())
    assert_same_results(resumed, social_uninterrupted)
