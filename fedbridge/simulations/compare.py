"""Aggregate run records into one comparison: a terminal table (rich), Markdown, and PNG plots (matplotlib)."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedbridge.config import ExperimentConfig
from fedbridge.results import RunRecord
from fedbridge.simulations.console import one_line

METRICS = (  # (record path, column title)
    ("global_metrics.accuracy", "global acc"),
    ("global_metrics.macro_f1", "global F1"),
    ("global_metrics.silo_test_accuracy", "silo-test acc"),
    ("global_metrics.silo_test_macro_f1", "silo-test F1"),
)
CANARY_RANK, CANARY_EXPOSURE = "server_metrics.canary-rank", "server_metrics.canary-exposure"
VARIANT_PREFIX = "variant."  # server_metrics["variant.<name>.<metric>"]: one run, several evaluated variants


@dataclass
class Row:
    """One configuration (method and swept values), aggregated over its seeds."""

    method: str
    sweep: tuple[tuple[str, str], ...]
    records: list[RunRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The method and the settings that tell its rows apart; a core key at its default says nothing (a swept
        ``slm.dp-epsilon`` names DP-FedAvg's row, not every other method's)."""
        return " ".join([self.method, *(f"{k}={v}" for k, v in self.sweep if v and v != CORE_DEFAULTS.get(k))])

    def values(self, path: str) -> list[float]:
        section, key = path.split(".", 1)
        out = [getattr(r, section).get(key) for r in self.records]
        return [float(v) for v in out if isinstance(v, (int, float)) and not math.isnan(v)]

    def stat(self, path: str) -> tuple[float, float]:
        v = self.values(path)
        return (float(np.mean(v)), float(np.std(v))) if v else (math.nan, math.nan)

    @property
    def epsilon(self) -> str:
        """The largest ε any silo spent, averaged over seeds; ∞ where anything left a silo without DP; '—' only
        where the method had silos release nothing but their silo-test metrics (which every method reports)."""
        spent = [max((float(s.get("epsilon", math.nan)) for s in r.privacy.values()), default=math.nan)
                 for r in self.records if r.privacy]
        if not spent:
            return "—"
        mean = float(np.mean(spent))
        return "∞" if math.isinf(mean) else f"{mean:.2f}"

    @property
    def megabytes(self) -> float:
        return float(np.mean([(r.communication["bytes_sent"] + r.communication["bytes_received"]) / 1e6
                              for r in self.records]))

    @property
    def wall(self) -> float:
        return float(np.mean([r.wall_seconds for r in self.records]))

    @property
    def tokens(self) -> float:
        return float(np.mean([r.tokens.get("generated", 0) + r.tokens.get("silo-generated", 0) for r in self.records]))


def variant_records(record: RunRecord) -> list[RunRecord]:
    """One record per variant a run evaluated (e.g. Social Learning's aggregators and baselines on the same teacher
    contributions), named '<method> <variant>', with that variant's metrics, canary figures and ε; a run without
    variants is itself."""
    metrics: dict[str, dict[str, float]] = {}
    for key, value in record.server_metrics.items():
        if key.startswith(VARIANT_PREFIX):
            name, _, metric = key[len(VARIANT_PREFIX):].rpartition(".")
            metrics.setdefault(name, {})[metric] = value
    out = []
    for name, values in metrics.items():
        epsilon = values.pop("epsilon", math.nan)
        out.append(dataclasses.replace(
            record, method=f"{record.method} {name}",
            global_metrics={k: v for k, v in values.items() if k in ("accuracy", "macro_f1", "n")},
            server_metrics={k: v for k, v in values.items() if k.startswith("canary-")},
            privacy=None if math.isnan(epsilon) else {"shared": {"epsilon": epsilon}}))
    return out or [record]


RUN_KEYS = frozenset({"method", "seed", "run-name", "results-dir", "resume", "timeout"})  # bookkeeping, not settings


def group(records: Sequence[RunRecord], sweep_keys: Sequence[str] = ()) -> list[Row]:
    """Rows by method and the swept keys, and also by any other setting whose value differs between runs of one
    method, so that a table over a directory of mixed runs never averages different settings into one row."""
    from fedbridge.methods.registry import option_applies

    def label(rec: RunRecord, key: str) -> str:  # fdkt.* says nothing about a local run, even if its config has it
        value = rec.config.get(key)
        return _value_label(value) if value is not None and option_applies(key, rec.method) else ""

    variants = [variant for record in records for variant in variant_records(record)]
    keys_by_method: dict[str, list[str]] = {}
    for method in dict.fromkeys(rec.method for rec in variants):
        runs = [rec for rec in variants if rec.method == method]
        differing = [k for k in dict.fromkeys(k for rec in runs for k in rec.config)
                     if k not in RUN_KEYS and k not in sweep_keys
                     and len({label(rec, k) for rec in runs} - {""}) > 1]  # absent from an older record: not a split
        keys_by_method[method] = [*sweep_keys, *differing]
    rows: dict[tuple, Row] = {}
    for rec in variants:
        sweep = tuple((k, label(rec, k)) for k in keys_by_method[rec.method])
        rows.setdefault((rec.method, sweep), Row(rec.method, sweep)).records.append(rec)
    methods = list(keys_by_method)
    return sorted(rows.values(), key=lambda row: (methods.index(row.method), [_sort_key(v) for _, v in row.sweep]))


def _sort_key(value: str) -> tuple[int, float, str]:
    """Numbers in numeric order (inf last among them), then other values alphabetically."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def _value_label(value: object) -> str:
    """One label per setting, however the value reached the config: a swept ``1`` and a default ``1.0`` are one row."""
    return f"{value:g}" if isinstance(value, float) else str(value)


CORE_DEFAULTS = {k: _value_label(v) for k, v in ExperimentConfig().to_run_config().items()}  # labels of defaults


def _fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "—"
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if n > 1 else f"{100 * mean:.1f}"


def _canary_cells(row: Row) -> list[str]:
    """Mean canary rank, runs where it was 0 (of the runs that ranked one), mean exposure."""
    ranks = row.values(CANARY_RANK)
    if not ranks:
        return ["—", "—", "—"]
    mean, std = row.stat(CANARY_RANK)
    exposure = row.stat(CANARY_EXPOSURE)[0]
    return [f"{mean:.0f} ± {std:.0f}" if len(ranks) > 1 else f"{mean:.0f}",
            f"{sum(r == 0 for r in ranks)}/{len(ranks)}", f"{exposure:.2f}"]


def _has_canaries(rows: Sequence[Row]) -> bool:
    return any(row.values(CANARY_RANK) for row in rows)


def table(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    canaries = _has_canaries(rows)
    header = ["method", "seeds", *(title for _, title in METRICS), *(["canary rank", "rank 0", "exposure"] if canaries
                                                                    else []),
              "ε", "MB moved", "tokens gen.", "wall s"]
    body = [[row.label, str(len(row.records)), *(_fmt(*row.stat(path), len(row.values(path))) for path, _ in METRICS),
             *(_canary_cells(row) if canaries else []),
             row.epsilon, f"{row.megabytes:.2f}", f"{row.tokens:.0f}", f"{row.wall:.1f}"] for row in rows]
    return header, body


def notes(rows: Sequence[Row]) -> list[str]:
    return sorted({n for row in rows for r in row.records for n in [*r.notes, *(f"{r.run_name}: {f['silo']} "
                   f"failed {f['message_type']}: {f['reason']}" for f in r.failures)]})


def to_markdown(rows: Sequence[Row]) -> str:
    header, body = table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines.append("")
    lines.append("Accuracy and macro-F1 in %, mean ± std over seeds. 'global' = the server's held-out test set "
                 "(methods with one model per silo: mean over silo models); 'silo-test' = mean over silos of "
                 "each silo's own test split. ε: the largest any silo spent on what the method had it release "
                 "(∞ = released without DP; — = nothing released but silo-test metrics).")
    if _has_canaries(rows):
        lines.append("Canary rank: how many comparison secrets (999 by default) the student prompt makes likelier "
                     "than the planted one (0 = memorised, about half = nothing leaked), mean ± std over seeds; "
                     "rank 0: runs where it was 0; exposure = log2(candidates + 1) − log2(rank + 1), mean. Variants of one "
                     "run share its MB, tokens and wall s.")
    lines += [f"- {n}" for n in notes(rows)]
    phases = sorted({k for row in rows for r in row.records for k in r.seconds})
    if phases:
        lines += ["", "Wall seconds by phase (mean over seeds):", "",
                  "| method | " + " | ".join(phases) + " |", "|" + "---|" * (len(phases) + 1)]
        lines += ["| " + row.label + " | " + " | ".join(
            f"{np.mean([r.seconds[k] for r in row.records if k in r.seconds]):.1f}"
            if any(k in r.seconds for r in row.records) else "—" for k in phases) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def print_table(rows: Sequence[Row], title: str = "fedbridge comparison", console=None) -> None:  # noqa: ANN001
    """The comparison in the terminal. Row names are never cut (a narrow terminal wraps the figures' headers
    and cells instead, word by word), so 'fedavg' and 'llm-zero-shot' stay readable in 80 columns."""
    from rich.console import Console
    from rich.table import Table

    header, body = table(rows)
    tab = Table(title=title, pad_edge=False, collapse_padding=True)
    names = [cells[0] for cells in body] + [header[0]]
    tab.add_column(header[0], justify="left", no_wrap=True, min_width=max(len(n) for n in names))
    for h in header[1:]:
        tab.add_column(h, justify="right", overflow="fold")
    for cells in body:
        tab.add_row(*cells)
    console = console or Console()
    console.print(tab)
    for n in notes(rows):  # one line each: a silo's failure reason may be a whole traceback (table.md keeps it all)
        console.print(f"- {one_line(n)}", style="dim", markup=False, highlight=False)


def plot(rows: Sequence[Row], path: Path, sweep_key: str | None = None) -> Path:
    """Bars of accuracy and macro-F1 (global and silo-test) per row; with a swept numeric key, global accuracy
    against that key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4.2))
    if sweep_key:
        by_method: dict[str, list[tuple[float, Row]]] = defaultdict(list)  # one line per method and other values
        for row in rows:
            sweep = dict(row.sweep)
            if sweep_key not in sweep or not sweep[sweep_key]:  # a baseline next to the sweep: a flat line
                continue
            others = " ".join([row.method, *(f"{k}={v}" for k, v in row.sweep if k != sweep_key)])
            by_method[others].append((float(sweep[sweep_key]), row))
        baselines = [row for row in rows if not dict(row.sweep).get(sweep_key)]
        finite = [x for pts in by_method.values() for x, _ in pts if math.isfinite(x)]
        inf_at = (max(finite) * 1.5 if finite else 1.0)
        for method, pts in by_method.items():
            pts.sort(key=lambda p: p[0])
            xs = [x if math.isfinite(x) else inf_at for x, _ in pts]
            means = [100 * r.stat("global_metrics.accuracy")[0] for _, r in pts]
            stds = [100 * r.stat("global_metrics.accuracy")[1] for _, r in pts]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=method)
        for row in baselines:
            ax.axhline(100 * row.stat("global_metrics.accuracy")[0], linestyle="--", alpha=0.6, color="grey")
            ax.annotate(row.label, (0, 100 * row.stat("global_metrics.accuracy")[0]), xycoords=("axes fraction", "data"),
                        fontsize=8, va="bottom")
        ax.set_xlabel(f"{sweep_key} (∞ plotted at {inf_at:g})")
        ax.set_ylabel("global accuracy (%)")
        ax.legend()
    else:
        x = np.arange(len(rows))
        for offset, (path_, title) in zip((-0.3, -0.1, 0.1, 0.3), METRICS):
            stats = [row.stat(path_) for row in rows]
            ax.bar(x + offset, [100 * m for m, _ in stats], 0.2, yerr=[100 * s for _, s in stats], capsize=2,
                   label=title)
        ax.set_xticks(x, [row.label for row in rows], rotation=15, ha="right")
        ax.set_ylabel("%")
        ax.legend()
    ax.set_title("fedbridge: accuracy and macro-F1 by method" if not sweep_key else "fedbridge: accuracy")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def spent_epsilon(row: Row) -> float | None:
    """The row's ε per silo as a number (the largest any silo spent, mean over seeds); None where nothing left."""
    label = row.epsilon
    return None if label == "—" else math.inf if label == "∞" else float(label)


REFERENCES = ("local", "centralized", "fedavg")  # drawn as lines across an ε plot: no ε of their own to vary


def epsilon_plot(rows: Sequence[Row], path: Path) -> Path | None:
    """The privacy-utility picture: global macro-F1 against the ε per silo each row spent, one line (or point) per
    DP method, with ``local``, ``centralized`` and ``fedavg`` (ε = ∞) as reference lines. None where no row spent a
    finite ε."""
    lines: dict[str, list[tuple[float, Row]]] = defaultdict(list)
    for row in rows:
        eps = spent_epsilon(row)
        if row.method not in REFERENCES or (row.method == "fedavg" and eps is not None and math.isfinite(eps)):
            if eps is not None and math.isfinite(eps):
                others = [f"{k}={v}" for k, v in row.sweep if v and "epsilon" not in k and v != CORE_DEFAULTS.get(k)]
                name = "DP-FedAvg" if row.method == "fedavg" else row.method  # one line per method and setting
                lines[" ".join([name, *others])].append((eps, row))
    if not lines:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    for method, pts in sorted(lines.items()):
        pts.sort(key=lambda p: p[0])
        stats = [r.stat("global_metrics.macro_f1") for _, r in pts]
        ax.errorbar([x for x, _ in pts], [100 * m for m, _ in stats], yerr=[100 * s for _, s in stats], marker="o",
                    capsize=3, label=method, linestyle="-" if len(pts) > 1 else "none")
    for row in rows:
        eps = spent_epsilon(row)
        if row.method in REFERENCES and (eps is None or math.isinf(eps)):
            mean = 100 * row.stat("global_metrics.macro_f1")[0]
            ax.axhline(mean, linestyle="--" if row.method == "local" else ":", color="grey", alpha=0.8)
            ax.annotate(f"{row.label} ({'no release' if eps is None else 'ε = ∞'})", (0.01, mean),
                        xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
    ax.set_xscale("log")
    ticks = sorted({round(x, 1) for pts in lines.values() for x, _ in pts})  # 3.99 spent of 4 asked: one tick
    ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("ε per silo (δ = 1e-5; a point averages the seeds that row ran)")
    ax.set_ylabel("global macro-F1 (%)")
    ax.set_title("fedbridge: macro-F1 against privacy (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_records(directory: Path) -> list[RunRecord]:
    """Every ok record under a directory (failed runs are reported in the notes of the runs that retried them)."""
    records = [RunRecord.read(p) for p in sorted(directory.glob("*.json"))]
    return [r for r in records if r.status == "ok"]
