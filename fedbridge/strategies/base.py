"""A fedbridge method as a Flower strategy (``flwr.serverapp.strategy.Strategy``), and ``run_experiment``, the one path
every fedbridge run takes (fedbridge's ServerApp, the CLI, the tests, a strategy's ``start``).

A strategy is a method with its typed options: the constructor builds the run's ``ExperimentConfig`` from them (the
method's own options through ``to_flat``), and ``start(grid=grid)`` runs ``run_experiment`` on it. The methods are
asynchronous or multi-phase, not Flower's rounds of train and evaluate, so ``start`` runs the whole method and the
round hooks (``configure_*``, ``aggregate_*``) refuse to be driven.

The silos read their settings from the Flower run config, never from the server (``SILO_SECTIONS``, ``SILO_KEYS``).
A strategy built on the run config (``experiment=ExperimentConfig.from_run_config(context.run_config)``) may change
in Python only what the server alone reads; changing what a silo reads would split the two sides (another data split,
another model), so it fails with the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import time
import typing
from collections.abc import Iterable
from logging import INFO
from pathlib import Path
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedbridge.checkpoint import Checkpoint
from fedbridge.config import ExperimentConfig, TaskConfig, from_flat, to_flat
from fedbridge.errors import ConfigError, FedbridgeError
from fedbridge.faults import FaultConfig
from fedbridge.methods import PACKAGES, method_module
from fedbridge.methods.base import MeteredGrid, Session, default_run_name, label_non_private, server_task
from fedbridge.methods.registry import METHODS, get_method, option_class
from fedbridge.results import RunRecord

log = logging.getLogger(__name__)
flower_log = logging.getLogger("flwr").log  # the ServerApp's own log lines, as Flower's strategies write them

# What the silos read from the run config (the option-channel rule in fedbridge.protocol): their data and its split,
# their SLM, the LLM they score with, the seed, FedAvg's rounds (a DP SLM's budget is split over them), their device,
# fault injection, and the sections a method's messages.py names in SILO_SECTIONS (FDKT's demonstrations, Social
# Learning's teaching). Everything else (pe.*, crosslm.*, fedavg.*, results-dir, timeout...) only the server reads, or
# it travels in the messages. A test keeps this equal to what the silo side parses.
CORE_SILO_SECTIONS = ("task", "partition", "slm", "llm", "canaries", "faults")
SILO_KEYS = ("seed", "rounds", "device.silo")


def silo_sections() -> tuple[str, ...]:
    """The run-config sections the silos read: the core's, then each registered method's ``messages.SILO_SECTIONS``."""
    declared = (getattr(method_module(name, "messages"), "SILO_SECTIONS", ()) for name in PACKAGES)
    return tuple(dict.fromkeys((*CORE_SILO_SECTIONS, *(s for sections in declared for s in sections))))


SILO_SECTIONS = silo_sections()
# ExperimentConfig fields a strategy sets itself: the method is the strategy's, and method options come typed
_NOT_OPTIONS = ("method", "method_options", "task")


def run_experiment(grid: Grid, cfg: ExperimentConfig) -> RunRecord:
    """Run one method end to end and write its record, also when it fails (then re-raise).

    The run's checkpoint is kept while it runs and after a failure, and removed once the ``ok`` record is written;
    ``resume=true`` continues a failed run of the same name from it.
    """
    method = get_method(cfg.method)(cfg)
    record = RunRecord(run_name=default_run_name(cfg), method=cfg.method, seed=cfg.seed, config=cfg.to_run_config())
    if method.note:
        record.notes.append(method.note)
    faults = from_flat(FaultConfig, cfg.method_options, "faults")
    if faults.active:
        record.notes.append(faults.describe())
    t0, checkpoint = time.perf_counter(), None
    try:
        task, global_test = server_task(cfg)
        checkpoint = Checkpoint.for_run(cfg, record)
        session = Session(MeteredGrid(grid, record), cfg, record, task, global_test, checkpoint,
                          started=time.monotonic() - checkpoint.prior_elapsed)  # timelines go on where they stopped
        with session.phase("discover"):
            session.discover()
        method.run(session)
        label_non_private(record, method.non_private())
        record.status = "ok"
    except BaseException as err:
        record.status, record.error = "failed", f"{type(err).__name__}: {err}"
        log.error("Run %s failed: %s", record.run_name, record.error,
                  exc_info=not isinstance(err, FedbridgeError))  # input errors need no traceback
        if checkpoint is not None and checkpoint.steps():
            record.notes.append(f"{len(checkpoint.steps())} completed steps are checkpointed in "
                                f"{checkpoint.directory}: rerun with resume=true run-name={record.run_name} to "
                                "continue from them")
        raise
    finally:
        record.wall_seconds = time.perf_counter() - t0 + (checkpoint.prior_elapsed if checkpoint else 0.0)
        path = record.write(cfg.results_dir)
        log.info("Run record: %s", path)
    checkpoint.remove()
    return record


def silo_reads(key: str) -> bool:
    """Whether the silos read flat run-config ``key`` (from the run config, not from the server)."""
    return key in SILO_KEYS or key.split(".")[0] in SILO_SECTIONS


def flower_result(record: RunRecord) -> Result:
    """The run's metrics in Flower's shape, at the run's last round (the highest its messages carried): the server's
    global test set as ServerApp-side evaluation, the means over silos of their own test splits (``silo_test_*``)
    as ClientApp-side evaluation. No arrays: a method keeps its models where it trained them."""
    rounds = [int(r) for r in record.communication["by_round"] if r.isdigit()]
    last = max(rounds, default=1)
    server, clients = {}, {}
    for key, value in record.global_metrics.items():
        value = value if isinstance(value, int) else float(value)
        if key.startswith("silo_test_"):
            clients[key.removeprefix("silo_test_")] = value
        else:
            server[key] = value
    result = Result()
    if server:
        result.evaluate_metrics_serverapp[last] = MetricRecord(server)
    if clients:
        result.evaluate_metrics_clientapp[last] = MetricRecord(clients)
    return result


class MethodStrategy(Strategy):
    """One fedbridge method as a Flower strategy; ``fedbridge.strategies`` has one subclass per method.

    ``task``: a task name (replacing the experiment's task name) or a ``TaskConfig``. ``config``: the method's own
    typed options (``PEConfig`` for ``PrivateEvolution``). ``experiment``: the settings to start from (default:
    fedbridge's defaults); in a ServerApp, the run config the silos read. Keywords: any other ``ExperimentConfig``
    field (``seed=0``, ``results_dir=...``, ``slm=SLMConfig(...)``), and the typed options of the other sections the
    method reads (``Pipeline(fdkt=FDKTConfig(...))``, ``faults=FaultConfig(...)``). None is "not set": the
    experiment's value stays. A wrong name or type fails here, in one line; so does a setting the method rejects.
    """

    method: ClassVar[str]  # the fedbridge method it runs (a key of METHODS)

    def __init_subclass__(cls, method: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if method:
            cls.method = get_method(method).name

    def __init__(self, task: str | TaskConfig | None = None, config: Any = None, *,
                 experiment: ExperimentConfig | None = None, **options: Any) -> None:
        base = ExperimentConfig() if experiment is None else _typed(experiment, ExperimentConfig,
                                                                     f"{self._name}(experiment=...)")
        options = {k: v for k, v in options.items() if v is not None}  # None: not set, as for task and config
        sections = self.sections()
        given = {section: _typed(value, sections[section], f"{self._name}({section}=...)")
                 for section, value in options.items() if section in sections and section != self.method}
        if config is not None:
            own = sections.get(self.method)
            if own is None:
                raise ConfigError(f"{self._name} takes no config: the '{self.method}' method has no options of its "
                                  "own. Set the run's settings with keywords (seed=..., slm=SLMConfig(...)).")
            given[self.method] = _typed(config, own, f"{self._name}(config=...)")
        core = self._core(task, base, {k: v for k, v in options.items() if k not in given})
        method_options = {k: v for k, v in base.method_options.items() if k.split(".")[0] not in given}
        for section, value in given.items():
            method_options.update(to_flat(value, section))
        self.experiment = dataclasses.replace(base, method=self.method, method_options=method_options, **core)
        if experiment is not None:
            self._check_silo_view(experiment)
        get_method(self.method)(self.experiment)  # what the method itself checks across options
        self.record: RunRecord | None = None  # the last start()'s run record

    @property
    def _name(self) -> str:
        return type(self).__name__

    @classmethod
    def sections(cls) -> dict[str, type]:
        """The typed option sections it takes: its method's own (``config``), the ones the method also reads, and
        ``faults``."""
        names = (cls.method, *METHODS[cls.method].sections, "faults")
        return {name: option for name in names if (option := option_class(name)) is not None}

    def _core(self, task: str | TaskConfig | None, base: ExperimentConfig, options: dict[str, Any]) -> dict[str, Any]:
        """The ``ExperimentConfig`` fields the keywords set, each checked against its declared type."""
        hints = typing.get_type_hints(ExperimentConfig)
        allowed = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name not in _NOT_OPTIONS]
        out: dict[str, Any] = {}
        for key, value in options.items():
            if key not in allowed:
                known = ["task", "config", "experiment", *allowed, *(s for s in self.sections() if s != self.method)]
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"Did you mean '{close[0]}'?" if close else f"It takes: {', '.join(known)}."
                raise ConfigError(f"{self._name} got an unknown option '{key}'. {hint}")
            out[key] = _typed(value, hints[key], f"{self._name}({key}=...)")
        if isinstance(task, str):
            out["task"] = dataclasses.replace(base.task, name=task)
        elif task is not None:
            out["task"] = _typed(task, TaskConfig, f"{self._name}(task=...)")
        return out

    def _check_silo_view(self, experiment: ExperimentConfig) -> None:
        """Fail where the Python options change a setting the silos read from ``experiment`` (the run config)."""
        before, after = self._flat(experiment), self._flat(self.experiment)
        for key, value in after.items():
            if silo_reads(key) and before.get(key) != value:
                raise ConfigError(f"{self._name}: the silos read '{key}' from the run config, where it is "
                                  f"{before.get(key)!r}, not {value!r}. Set it in the run config (pyproject.toml "
                                  "[tool.flwr.app.config] or flwr run --run-config), which both sides read.")

    def _flat(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """``cfg``'s flat run config with every option section's defaults where it has no key of that section."""
        defaults = {k: v for section, option in self.sections().items() for k, v in to_flat(option(), section).items()}
        return {**defaults, **cfg.to_run_config()}

    def run_config(self) -> dict[str, bool | int | float | str]:
        """The flat run config this strategy runs: what its silos must read (an ``InProcessGrid``'s run config)."""
        return self.experiment.to_run_config()

    def start(self, grid: Grid) -> Result:  # Flower's takes arrays and rounds: a method is no loop of rounds
        """Run the method once on ``grid``'s silos; its record goes to ``results_dir`` and to ``self.record``. Returns
        Flower's ``Result`` with the run's metrics (``flower_result``). A failed run raises; its record, status
        failed, is written and kept in ``self.record``."""
        cfg = dataclasses.replace(self.experiment, run_name=default_run_name(self.experiment))  # a failed run's
        # record is found by this name
        flower_log(INFO, "Starting %s strategy (fedbridge method '%s'), run %s:", self._name, self.method, cfg.run_name)
        self.record = None
        self.summary()
        try:
            self.record = run_experiment(grid, cfg)
        except BaseException:
            path = Path(cfg.results_dir) / f"{cfg.run_name}.json"
            self.record = RunRecord.read(path) if path.is_file() else None
            raise
        flower_log(INFO, "%s finished:", self._name)
        self.summary()
        return flower_result(self.record)

    def summary(self) -> None:
        """Log the settings it runs that differ from fedbridge's defaults or, after ``start``, its record's line of
        the comparison table."""
        if self.record is None:
            defaults = self._flat(ExperimentConfig())
            changed = {k: v for k, v in self.run_config().items() if defaults.get(k) != v}
            flower_log(INFO, "\t└──> %s", ", ".join(f"{k}={v}" for k, v in changed.items()) or "fedbridge's defaults")
            return
        from fedbridge.simulations.compare import group, table

        header, [row] = table(group([self.record]))
        flower_log(INFO, "\t└──> %s", " | ".join(f"{h}: {c}" for h, c in zip(header, row)))

    # Flower's round hooks. A fedbridge method is asynchronous or multi-phase, with its own messages and checks
    # (``Session``), so it is no sequence of train/evaluate rounds that Flower's loop, or a strategy wrapping this
    # one, could drive: start() runs it whole, and these refuse, naming the way that works.

    def _not_round_based(self) -> NotImplementedError:
        return NotImplementedError(f"{self._name} runs fedbridge's '{self.method}' method, whose exchanges are not "
                                   "Flower rounds: call start(grid=...), which runs it whole. It cannot be driven "
                                   "round by round, nor wrapped by another strategy.")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        raise self._not_round_based()

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        raise self._not_round_based()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        raise self._not_round_based()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        raise self._not_round_based()


def strategy_class(method: str) -> type[MethodStrategy]:
    """The strategy of method ``method``, named as its ``Method`` class, with its description."""
    cls = get_method(method)
    options = option_class(cls.name)
    doc = (f"fedbridge's ``{cls.name}`` method as a Flower strategy: {cls.description}. Its options: "
           f"``config={options.__name__}(...)``." if options else
           f"fedbridge's ``{cls.name}`` method as a Flower strategy: {cls.description}. It has no options of its own.")
    return type(cls.__name__, (MethodStrategy,),
                {"__doc__": doc, "__module__": "fedbridge.strategies", "__qualname__": cls.__name__}, method=cls.name)


def _typed(value: Any, annotation: Any, where: str) -> Any:
    """``value`` if it is of the declared type (an int for a float, a path for a str, converted), else a ConfigError
    naming ``where`` and both types."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) and isinstance(value, annotation):
        return value
    if annotation is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (str, float, bool) and type(value) is annotation:
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    name = getattr(annotation, "__name__", str(annotation))
    shown = f" {value!r:.60}" if isinstance(value, (str, int, float)) else ""
    raise ConfigError(f"{where} takes {name}, got {type(value).__name__}{shown}.")
