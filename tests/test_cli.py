"""The ``fedbridge`` command: list, run, compare (in process), and how bad input is reported."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY
from typer.testing import CliRunner

from fedbridge.errors import ConfigError, FedbridgeError
from fedbridge.methods.registry import METHODS
from fedbridge.results import RunRecord
from fedbridge.simulations import cli as cli_module
from fedbridge.simulations.cli import build_config, cli, parse_sets, parse_value

FEDBRIDGE = str(Path(sys.executable).with_name("fedbridge"))
runner = CliRunner()


def tiny_sets(**extra) -> list[str]:
    args = []
    for key, value in {**TINY, "task.max-examples": 60, **extra}.items():
        args += ["--set", f"{key}={value}"]
    return args


def test_parse_value_and_sets():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("0.5") == 0.5
    assert parse_value("inf") == float("inf")
    assert parse_value("True") is True and parse_value("false") is False
    assert parse_value("tiny-bert") == "tiny-bert"
    assert parse_sets(["a.b=1", " c = x=y "]) == {"a.b": 1, "c": "x=y"}
    with pytest.raises(FedbridgeError, match="--set expects key=value, got 'novalue'"):
        parse_sets(["novalue"])


def test_build_config_validates_keys_and_method():
    cfg = build_config({"method": "fedavg", "slm.epochs": 2, "fedavg.local-epochs": 2})
    assert cfg.method == "fedavg" and cfg.slm.epochs == 2 and cfg.method_options["fedavg.local-epochs"] == 2
    with pytest.raises(ConfigError, match="Did you mean 'slm.epochs'"):
        build_config({"slm.epoch": 2})
    with pytest.raises(ConfigError, match="Unknown method 'nope'"):
        build_config({"method": "nope"})


def test_list_names_every_method_and_task():
    result = runner.invoke(cli, ["list"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in (*METHODS, "drug-reviews", "tweets", "tiny-bert", "tiny-llama", "iid", "dirichlet", "natural",
                 "inprocess", "simulation"):
        assert name in result.output, name


def test_run_inprocess_writes_a_record(tmp_path):
    result = runner.invoke(cli, ["run", "--method", "local", "--engine", "inprocess", "--seed", "2",
                                 "--results-dir", str(tmp_path), *tiny_sets()], terminal_width=200)
    assert result.exit_code == 0, result.output
    records = list(tmp_path.glob("*.json"))
    assert len(records) == 1
    assert f"record: {records[0]}" in result.output.replace("\n", "")
    record = RunRecord.read(records[0])
    assert record.status == "ok" and record.method == "local" and record.seed == 2
    assert record.config["slm.model"] == "tiny-bert" and record.config["task.max-examples"] == 60
    assert record.run_name.startswith("local-drug-reviews-s2-")


def test_compare_runs_methods_x_seeds_then_keeps_them(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "local,centralized", "--seeds", "0,1", "--engine", "inprocess",
            "--out", str(out), *tiny_sets()]
    first = runner.invoke(cli, args, terminal_width=200)
    assert first.exit_code == 0, first.output
    names = sorted(p.stem for p in (out / "runs").glob("*.json"))
    assert names == ["centralized-drug-reviews-s0", "centralized-drug-reviews-s1",
                     "local-drug-reviews-s0", "local-drug-reviews-s1"]
    table = (out / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| method | seeds | global acc")
    assert any(r.startswith("| local | 2 |") for r in rows) and any(r.startswith("| centralized | 2 |") for r in rows)
    assert "± " in table  # mean ± std over 2 seeds
    assert "non-private upper bound" in table  # centralized's note reaches the reader
    png = (out / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    stamps = {p.name: p.read_text() for p in (out / "runs").glob("*.json")}

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("a finished run was run again")

    import fedbridge.simulations.runner as runner_module

    monkeypatch.setattr(runner_module, "run", must_not_run)
    second = runner.invoke(cli, args, terminal_width=200)
    assert second.exit_code == 0, second.output
    assert second.output.count("done already, kept") == 4
    assert {p.name: p.read_text() for p in (out / "runs").glob("*.json")} == stamps
    assert (out / "table.md").read_text() == table


def test_compare_reruns_a_failed_record(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    runs = out / "runs"
    failed = RunRecord(run_name="local-drug-reviews-s0", method="local", seed=0, config={}, status="failed",
                       error="boom")
    failed.write(runs)
    calls = []

    def fake_run(cfg, engine):
        calls.append((cfg.run_name, engine))
        rec = RunRecord(run_name=cfg.run_name, method=cfg.method, seed=cfg.seed, config=cfg.to_run_config(),
                        status="ok", global_metrics={"accuracy": 0.5, "macro_f1": 0.4})
        rec.write(cfg.results_dir)
        return rec

    import fedbridge.simulations.runner as runner_module

    monkeypatch.setattr(runner_module, "run", fake_run)
    result = runner.invoke(cli, ["compare", "--methods", "local", "--seeds", "0", "--engine", "inprocess",
                                 "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert calls == [("local-drug-reviews-s0", "inprocess")]
    assert RunRecord.read(runs / "local-drug-reviews-s0.json").status == "ok"


def test_compare_sweep_names_runs_by_value(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    seen = []

    def fake_run(cfg, engine):
        seen.append(cfg.slm.epochs)
        rec = RunRecord(run_name=cfg.run_name, method=cfg.method, seed=cfg.seed, config=cfg.to_run_config(),
                        status="ok", global_metrics={"accuracy": 0.1 * cfg.slm.epochs})
        rec.write(cfg.results_dir)
        return rec

    import fedbridge.simulations.runner as runner_module

    monkeypatch.setattr(runner_module, "run", fake_run)
    result = runner.invoke(cli, ["compare", "--methods", "local", "--seeds", "0", "--sweep", "slm.epochs=1,3",
                                 "--engine", "inprocess", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert seen == [1, 3]
    assert sorted(p.stem for p in (out / "runs").glob("*.json")) == ["local-drug-reviews-slm.epochs=1-s0",
                                                                     "local-drug-reviews-slm.epochs=3-s0"]
    table = (out / "table.md").read_text()
    assert "local slm.epochs=1" in table and "local slm.epochs=3" in table
    assert (out / "accuracy.png").is_file()


def test_one_setting_is_one_row_whether_its_value_came_as_1_or_1_0():
    from fedbridge.simulations.compare import group

    records = [RunRecord(run_name=f"r{i}", method="crosslm", seed=i, config={"crosslm.kl-weight": value}, status="ok")
               for i, value in enumerate([1, 1.0, 0, 0.5])]
    rows = group(records, ["crosslm.kl-weight"])
    assert sorted((row.label, len(row.records)) for row in rows) == [
        ("crosslm crosslm.kl-weight=0", 1), ("crosslm crosslm.kl-weight=0.5", 1), ("crosslm crosslm.kl-weight=1", 2)]


def test_runs_with_different_settings_are_never_averaged_into_one_row_even_without_a_sweep():
    from fedbridge.simulations.compare import group

    def record(i, config):
        return RunRecord(run_name=f"r{i}", method=config.pop("method", "fdkt"), seed=i % 2, status="ok",
                         config={"seed": i % 2, "run-name": f"r{i}", "results-dir": f"/runs{i}", **config})

    records = [record(0, {"fdkt.epsilon": 1, "llm.calibrate": False}), record(1, {"fdkt.epsilon": 1.0}),
               record(2, {"fdkt.epsilon": 8, "llm.calibrate": False}), record(3, {"fdkt.epsilon": 8}),
               record(4, {"method": "local", "fdkt.epsilon": 4}), record(5, {"method": "local", "fdkt.epsilon": 8})]
    rows = group(records)
    assert sorted((row.label, len(row.records)) for row in rows) == [
        ("fdkt fdkt.epsilon=1", 2), ("fdkt fdkt.epsilon=8", 2), ("local", 2)]


def test_compare_grid_sweep_runs_a_method_s_own_keys_only_for_that_method(tmp_path, monkeypatch):
    out, seen = tmp_path / "grid", []

    def fake_run(cfg, engine):
        seen.append((cfg.method, cfg.method_options.get("fdkt.epsilon"), cfg.method_options.get("fdkt.mechanism")))
        eps = cfg.method_options.get("fdkt.epsilon", 0)
        rec = RunRecord(run_name=cfg.run_name, method=cfg.method, seed=cfg.seed, config=cfg.to_run_config(),
                        status="ok", global_metrics={"accuracy": 0.5 + 0.01 * min(eps, 10)},
                        seconds={"train": 1.0 + eps if eps < 10 else 2.0})
        rec.write(cfg.results_dir)
        return rec

    import fedbridge.simulations.runner as runner_module

    monkeypatch.setattr(runner_module, "run", fake_run)
    result = runner.invoke(cli, ["compare", "--methods", "local,fdkt", "--seeds", "0", "--sweep", "fdkt.epsilon=1,inf",
                                 "--sweep", "fdkt.mechanism=dp-fewshot,dp-sgd", "--engine", "inprocess",
                                 "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert seen[0] == ("local", None, None) and len(seen) == 5  # the baseline once, fdkt on the 2 x 2 grid
    assert sorted(seen[1:]) == sorted((("fdkt", e, m) for e in (1, float("inf")) for m in ("dp-fewshot", "dp-sgd")))
    table = (out / "table.md").read_text()
    assert "| local |" in table and "fdkt fdkt.epsilon=1 fdkt.mechanism=dp-sgd" in table
    assert "Wall seconds by phase" in table and "| 2.0 |" in table
    assert (out / "accuracy.png").is_file()


def test_one_aggregator_sweep_sets_each_method_s_own_aggregator(tmp_path, monkeypatch, capsys):
    out, seen = tmp_path / "agg", []

    def fake_run(cfg, engine):
        options = cfg.method_options
        seen.append((cfg.method, options.get("fedavg.strategy") or options.get("crosslm.aggregate")
                     or options.get("social.aggregators")))
        rec = RunRecord(run_name=cfg.run_name, method=cfg.method, seed=cfg.seed, config=cfg.to_run_config(),
                        status="ok", global_metrics={"accuracy": 0.5})
        rec.write(cfg.results_dir)
        return rec

    import fedbridge.simulations.runner as runner_module

    monkeypatch.setattr(runner_module, "run", fake_run)
    args = ["compare", "--methods", "local,fedavg,crosslm,pipeline,social", "--seeds", "0", "--engine", "inprocess",
            "--sweep", "aggregator=FedMedian,Krum,median,trimmed-mean,voting,random", "--out", str(out)]
    result = runner.invoke(cli, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert seen == [("local", None), ("fedavg", "FedMedian"), ("fedavg", "Krum"), ("crosslm", "median"),
                    ("crosslm", "trimmed-mean"), ("pipeline", "median"), ("pipeline", "trimmed-mean"),
                    ("social", "voting,random")]  # Social evaluates several aggregators in one run
    table = (out / "table.md").read_text()
    assert "fedavg fedavg.strategy=Krum" in table and "crosslm crosslm.aggregate=trimmed-mean" in table
    assert "| local |" in table
    line = _main(monkeypatch, capsys, *args[:-4], "--sweep", "aggregator=FedMedian,avg", "--out", str(out))
    assert "'avg' is no aggregator of" in line and "crosslm: mean, median, trimmed-mean" in line


def test_compare_only_aggregate_without_records_is_an_error(tmp_path):
    result = runner.invoke(cli, ["compare", "--only-aggregate", "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert isinstance(result.exception, FedbridgeError) and "No successful run records" in str(result.exception)


# ---------------------------------------------------------------- errors through the real entry point


def _fedbridge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([FEDBRIDGE, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def test_missing_data_file_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no-such-file.csv"
    proc = _fedbridge("run", "--engine", "inprocess", "--task", str(missing), "--results-dir", str(tmp_path / "r"),
                      *tiny_sets(), cwd=tmp_path)
    _assert_clean_error(proc, str(missing), "does not exist", "task.name")
    assert not (tmp_path / "r").exists()  # the config check failed it before anything ran


def test_unknown_method_is_a_one_line_error(tmp_path):
    proc = _fedbridge("run", "--method", "fdkt-typo", "--engine", "inprocess", cwd=tmp_path)
    _assert_clean_error(proc, "Unknown method 'fdkt-typo'", "local")
    assert not (tmp_path / "results").exists()  # nothing ran


def _main(monkeypatch, capsys, *args: str) -> str:
    """``fedbridge.simulations.cli.main`` in this process (the same error mapping as the script, faster)."""
    monkeypatch.setattr(sys, "argv", ["fedbridge", *args])
    with pytest.raises(SystemExit) as info:
        cli_module.main()
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    (line,) = [x for x in captured.err.splitlines() if x.startswith("error:")]
    return line


def test_unknown_key_is_an_error_with_a_suggestion(monkeypatch, capsys):
    line = _main(monkeypatch, capsys, "run", "--engine", "inprocess", "--set", "slm.epoch=2")
    assert "Unknown config key 'slm.epoch'" in line and "slm.epochs" in line


def test_bad_model_spec_is_a_clean_error(monkeypatch, capsys, tmp_path):
    line = _main(monkeypatch, capsys, "run", "--method", "fedavg", "--engine", "inprocess",
                 "--results-dir", str(tmp_path), *tiny_sets(**{"slm.model": "minilm-l9"}))
    assert "minilm-l9" in line and "minilm-l1 .. minilm-l6" in line


def test_unknown_engine_is_a_clean_error(monkeypatch, capsys):
    line = _main(monkeypatch, capsys, "run", "--engine", "warp-drive", "--set", "slm.model=tiny-bert")
    assert line == "error: Unknown engine 'warp-drive'. Use one of: simulation, inprocess."


# ---------------------------------------------------------------- bad input a new user tries (issue 13)


def test_a_model_nobody_can_load_is_named_before_any_run_starts(monkeypatch, capsys, tmp_path):
    """Not found locally and no hub: one line saying so, from the CLI's own check (before: every silo failed and
    the run ended in 'No silo completed this step' with two tracebacks)."""
    line = _main(monkeypatch, capsys, "run", "--engine", "inprocess", "--results-dir", str(tmp_path),
                 "--set", "slm.model=nonexistent/model-xyz")
    assert "Could not load SLM 'nonexistent/model-xyz'" in line and "not a local directory" in line
    assert "hub is switched off" in line  # the tests run with HF_HUB_OFFLINE=1
    assert not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("error, says", [("unreachable", "hub cannot be reached from this machine"),
                                         ("missing", "hub has no model by that id")])
def test_a_hub_model_id_is_checked_against_the_hub(monkeypatch, error, says):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from fedbridge.models.loading import ModelSpecError, check_model_spec

    def model_info(self, spec, timeout=None):
        if error == "missing":
            import httpx

            raise RepositoryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "https://x")))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    with pytest.raises(ModelSpecError, match=says):
        check_model_spec("LLM", "someone/no-such-llm")
    check_model_spec("SLM", "minilm-l3")  # built-in names never ask the hub


def test_a_directory_without_a_model_is_named(tmp_path):
    from fedbridge.models.loading import ModelSpecError, check_model_spec

    with pytest.raises(ModelSpecError, match="holds no loadable model.*no config.json"):
        check_model_spec("SLM", str(tmp_path))


def test_every_silo_failing_alike_ends_the_run_with_their_reason(tmp_path):
    """Where the CLI cannot check (a deployed silo's own model), the run's error carries the silos' shared reason."""
    from types import SimpleNamespace

    from fedbridge.errors import SiloFailure
    from fedbridge.methods.base import Session

    reason = "ModelSpecError: Could not load SLM 'x': it is not a local directory"
    record = SimpleNamespace(failures=[{"silo": f"silo-{i}", "reason": reason} for i in range(3)])
    error = Session.no_silo_completed(SimpleNamespace(record=record), "this step")
    assert isinstance(error, SiloFailure) and str(error) == f"No silo completed this step: every silo failed with {reason}"
    record.failures.append({"silo": "silo-3", "reason": "no reply within 60 s"})
    assert "see the record's failures" in str(Session.no_silo_completed(SimpleNamespace(record=record), "x"))


def test_a_dirichlet_alpha_of_zero_is_a_config_error(monkeypatch, capsys):
    line = _main(monkeypatch, capsys, "run", "--engine", "inprocess", "--set", "partition.kind=dirichlet",
                 "--set", "partition.alpha=0")
    assert "partition.alpha must be a finite number > 0" in line and "ValueError" not in line


def test_a_csv_row_with_more_fields_than_its_header_is_named(monkeypatch, capsys, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\ngreat stuff,pos\na, b,pos,extra\nbad,neg\n")
    line = _main(monkeypatch, capsys, "run", "--engine", "inprocess", "--task", str(path))
    assert "line 3 has 4 fields but the header has 2 (text, label)" in line and "Quote text" in line


def _recording_run(monkeypatch) -> list:
    import fedbridge.simulations.runner as runner_module

    seen = []

    def fake_run(cfg, engine):
        seen.append(cfg)
        rec = RunRecord(run_name=cfg.run_name, method=cfg.method, seed=cfg.seed, config=cfg.to_run_config(),
                        status="ok", global_metrics={"accuracy": 0.5})
        rec.write(cfg.results_dir)
        return rec

    monkeypatch.setattr(runner_module, "run", fake_run)
    return seen


def test_compare_and_run_take_the_task_from_set_and_refuse_a_conflict(tmp_path, monkeypatch, toy_csv):
    """One rule for both commands: --set task.name is honoured (compare used to run drug-reviews instead), and
    --task with a different --set task.name is an error, never a silent choice."""
    seen = _recording_run(monkeypatch)
    sets = ["--set", f"task.name={toy_csv}", "--set", "task.text-column=review", "--set", "task.label-column=sentiment",
            "--set", "partition.kind=iid"]
    result = runner.invoke(cli, ["compare", "--methods", "local", "--engine", "inprocess", "--out",
                                 str(tmp_path / "c"), *sets], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert seen[-1].task.name == str(toy_csv) and seen[-1].run_name == "local-toy-s0"
    result = runner.invoke(cli, ["run", "--engine", "inprocess", "--results-dir", str(tmp_path / "r"), *sets])
    assert result.exit_code == 0, result.output
    assert seen[-1].task.name == str(toy_csv)
    for command in (["compare", "--out", str(tmp_path / "d")], ["run"]):
        result = runner.invoke(cli, [*command, "--engine", "inprocess", "--task", "tweets", *sets])
        assert isinstance(result.exception, FedbridgeError)
        assert f"--task tweets and --set task.name={toy_csv} disagree" in str(result.exception)
    result = runner.invoke(cli, ["compare", "--set", "seed=3"])
    assert "use --seeds, not --set/--sweep seed" in str(result.exception)


def test_the_table_keeps_method_names_whole_in_80_columns():
    from rich.console import Console

    from fedbridge.simulations.compare import group, print_table

    records = [RunRecord(run_name=m, method=m, seed=0, config={}, status="ok",
                         global_metrics={"accuracy": 0.6, "macro_f1": 0.4, "silo_test_accuracy": 0.6,
                                         "silo_test_macro_f1": 0.4}) for m in ("fedavg", "llm-zero-shot", "centralized")]
    console = Console(width=80, record=True)
    print_table(group(records), console=console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    for name in ("fedavg", "llm-zero-shot", "centralized"):
        assert any(name in line for line in lines), name
