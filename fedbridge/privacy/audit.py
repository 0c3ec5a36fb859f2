"""Audit what left the silos in a run: copies of private text, distance to it, and planted canaries.

Any method that stores its contributions with ``Session.save_contribution`` (FDKT's DP demonstrations, Social
Learning's examples and instructions, ...) is audited the same way:
  verbatim copy rate   shared texts that contain a whole private text (``canaries.verbatim_copy_rate``)
  n-gram copy rate     shared texts with a run of ``ngram`` words of a private text (``canaries.CopyDetector``)
  Levenshtein          each shared text's normalised edit distance to its nearest private text, averaged
  secret mentions      shared texts that contain the planted canary's secret
  canary rank          with ``canaries.enabled``: the canary's rank among 999 comparison secrets by per-token likelihood
                       as a continuation of each student prompt (Social Learning) and of all shared text joined;
                       exposure = log2|R| - log2(rank + 1) with |R| = 1,000 (rank 0 = memorised)

Where the private data comes from: in simulation, rebuilt from the run record's config (the same partitions and
planted canaries the silos used: planting is deterministic in the seed). In deployment the private data never
leaves its silo, so each silo runs the audit on its own host against its own file (``private_files``, CLI
``--private silo-k=PATH``) and keeps or publishes the figures it chooses.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedbridge.config import ExperimentConfig
from fedbridge.errors import DataError
from fedbridge.models.generation import Prompt
from fedbridge.models.llm import LLM, FedbridgeLLM, load_llm_interface
from fedbridge.privacy.canaries import (
    Canary,
    CopyDetector,
    canary_rank,
    exposure,
    min_normalized_levenshtein,
    plant_canaries,
    run_canary,
    verbatim_copy_rate,
)
from fedbridge.results import RunRecord
from fedbridge.tasks import SiloData, SiloFile, load_federation, load_task, silo_from_file

RAW_KIND = "raw-examples(non-private)"  # contributions of a non-private upper bound: copies by design, not audited


def canary_report(llm: LLM, prompt: Prompt, canary: Canary, candidates: Sequence[str]) -> dict[str, float]:
    """``canary-rank`` (0 = memorised, ~half the candidates = nothing leaked) and ``canary-exposure`` of one prompt,
    under ``llm`` (the LLM interface)."""
    rank = canary_rank(llm, prompt, canary, candidates, cache_prompt=True)
    return {"canary-rank": rank, "canary-exposure": exposure(rank, len(candidates) + 1)}


@dataclass(frozen=True)
class TextAudit:
    """Shared texts against private texts."""

    shared: int
    verbatim_rate: float
    ngram_copy_rate: float
    levenshtein: float  # mean over shared texts of the normalised distance to the nearest private text
    secret_mentions: int  # shared texts containing the canary's secret (0 without a canary)


def audit_texts(shared: Sequence[str], private: Sequence[str], ngram: int = 8,
                canary: Canary | None = None) -> TextAudit:
    distances = min_normalized_levenshtein(shared, private) if shared else []
    return TextAudit(shared=len(shared), verbatim_rate=verbatim_copy_rate(shared, private),
                     ngram_copy_rate=CopyDetector(private, ngram).copy_rate(shared),
                     levenshtein=float(np.mean(distances)) if distances else math.nan,
                     secret_mentions=sum(canary.secret in t for t in shared) if canary else 0)


@dataclass
class RunAudit:
    run_name: str
    method: str
    seed: int
    configuration: str  # what the summary groups seeds by: the run name without its seed (compare's naming)
    silos: dict[str, TextAudit] = field(default_factory=dict)  # each silo's shared texts vs its own private data
    overall: TextAudit | None = None  # everything shared vs every silo's private data
    canaries: dict[str, dict[str, float]] = field(default_factory=dict)  # prompt name -> canary rank, exposure

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_contributions(record: RunRecord, record_path: Path) -> list[dict]:
    """The run's contribution lines (``Session.save_contribution``): beside the record, or where it says."""
    path = _artifact(record, record_path, "contributions", ".contributions.jsonl")
    if path is None:
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_student_prompts(record: RunRecord, record_path: Path) -> dict[str, str]:
    path = _artifact(record, record_path, "student-prompts", ".student-prompts.jsonl")
    if path is None:
        return {}
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {line["variant"]: line["prompt"] for line in lines}


def _artifact(record: RunRecord, record_path: Path, name: str, suffix: str) -> Path | None:
    for candidate in (record_path.with_name(record.run_name + suffix), Path(record.artifacts.get(name, ""))):
        if candidate.name and candidate.is_file():
            return candidate
    return None


def private_data(cfg: ExperimentConfig, private_files: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Each silo's private texts (train with planted canaries, and test), by silo name.

    Without ``private_files``: the simulation partitions rebuilt from the config. With them (``silo-k`` -> path):
    those silos' own files, read the way a deployed silo reads its ``data-path``.
    """
    task = load_task(cfg.task, cfg.seed)
    silos: dict[str, SiloData] = {}
    if private_files:
        for name, path in private_files.items():
            file = SiloFile(str(path), cfg.task.text_column or "text", cfg.task.label_column or "label",
                            cfg.task.encoding)  # the node-config defaults of a deployed silo's data settings
            silos[name] = silo_from_file(file, task.labels)[0]
    else:
        federation = load_federation(cfg.task, cfg.partition, cfg.seed)
        silos = {f"silo-{k}": data for k, data in enumerate(federation.silos)}
    return {name: [*plant_canaries(data, cfg.canaries, cfg.seed, _silo_index(name)).train.texts, *data.test.texts]
            for name, data in silos.items()}


def _silo_index(name: str) -> int:
    prefix, _, number = name.rpartition("-")
    if prefix != "silo" or not number.isdigit():
        raise DataError(f"'{name}' is not a silo name; use silo-<partition id>, e.g. silo-0.")
    return int(number)


def audit_run(record_path: str | Path, model: LLM | tuple | str | None = None,
              private_files: Mapping[str, str] | None = None, ngram: int = 8, rank: bool = True) -> RunAudit:
    """Audit one run record. With a planted canary and ``rank``, ``model`` ranks it against every student prompt and
    against all shared text: an LLM interface, a loaded (model, tokenizer) (asked through ``FedbridgeLLM``), an LLM
    spec, or None for the run's ``llm.model``; a spec loads behind the run's ``llm.engine``."""
    record_path = Path(record_path)
    record = RunRecord.read(record_path)
    cfg = ExperimentConfig.from_run_config(record.config)
    found = run_canary(cfg.canaries, cfg.seed) if cfg.canaries.enabled else None
    canary = found[0] if found else None
    if isinstance(model, str) or model is None:
        model = load_llm_interface(model or cfg.llm.model, cfg.device.for_server(), cfg.llm.engine,
                                   cfg.llm.gpu_memory_fraction) if rank and found else None
    elif isinstance(model, tuple):
        model = FedbridgeLLM(*model)
    private = private_data(cfg, private_files)
    shared: dict[str, list[str]] = {}
    for line in read_contributions(record, record_path):
        if line.get("silo") in private and line.get("kind") != RAW_KIND:  # a deployed silo audits only its own
            shared.setdefault(line["silo"], []).extend(line.get("texts", []))
    audit = RunAudit(record.run_name, record.method, record.seed,
                     re.sub(r"-s\d+(-\d{8}-\d{6})?$", "", record.run_name) or record.method)
    audit.silos = {silo: audit_texts(texts, private[silo], ngram, canary) for silo, texts in sorted(shared.items())}
    everything = [t for texts in shared.values() for t in texts]
    audit.overall = audit_texts(everything, [t for texts in private.values() for t in texts], ngram, canary)
    if found is not None and rank and model is not None:
        prompts = {f"student:{name}": prompt for name, prompt in read_student_prompts(record, record_path).items()}
        if everything:
            prompts["all-shared"] = "\n\n".join(everything)
        audit.canaries = {name: canary_report(model, prompt + "\n\n", *found) for name, prompt in prompts.items()}
    return audit


def summarize(audits: Sequence[RunAudit]) -> list[dict]:
    """Per (configuration, prompt) over runs (seeds): T, mean canary rank, how often it is 0, mean exposure; and per
    configuration the mean verbatim and n-gram copy rates and Levenshtein distance of everything shared."""
    rows = []
    by_prompt: dict[tuple[str, str], list[dict]] = {}
    for audit in audits:
        for name, result in audit.canaries.items():
            by_prompt.setdefault((audit.configuration, name), []).append(result)
    for (configuration, name), results in sorted(by_prompt.items()):
        ranks = [r["canary-rank"] for r in results]
        rows.append({"configuration": configuration, "prompt": name, "runs": len(results),
                     "mean-rank": float(np.mean(ranks)),
                     "rank-0": sum(r == 0 for r in ranks),
                     "mean-exposure": float(np.mean([r["canary-exposure"] for r in results]))})
    by_configuration: dict[str, list[TextAudit]] = {}
    for audit in audits:
        if audit.overall is not None and audit.overall.shared:
            by_configuration.setdefault(audit.configuration, []).append(audit.overall)
    for configuration, overall in sorted(by_configuration.items()):
        rows.append({"configuration": configuration, "prompt": "shared texts", "runs": len(overall),
                     "shared": int(sum(o.shared for o in overall)),
                     "verbatim-rate": float(np.mean([o.verbatim_rate for o in overall])),
                     "ngram-copy-rate": float(np.mean([o.ngram_copy_rate for o in overall])),
                     "levenshtein": float(np.nanmean([o.levenshtein for o in overall])),
                     "secret-mentions": int(sum(o.secret_mentions for o in overall))})
    return rows


def record_paths(path: str | Path) -> list[Path]:
    """The run records at ``path``: the file itself, or every record in the directory (or its ``runs/``)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"'{path}' is neither a run record nor a directory of them.")
    if not any(path.glob("*.json")) and (path / "runs").is_dir():
        path = path / "runs"
    out = []
    for candidate in sorted(path.glob("*.json")):
        try:
            if RunRecord.read(candidate).status == "ok":
                out.append(candidate)
        except (ValueError, TypeError, OSError):
            continue  # not a run record
    if not out:
        raise DataError(f"No successful run records in '{path}'.")
    return out


def _pct(value: float) -> str:
    return "—" if math.isnan(value) else f"{100 * value:.1f}"


def tables(audits: Sequence[RunAudit]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the audit's two tables: per run, and over runs."""
    per_run = []
    for a in audits:
        o = a.overall or audit_texts([], [])
        ranks = ", ".join(f"{name} {r['canary-rank']:.0f} ({r['canary-exposure']:.2f} bits)"
                          for name, r in a.canaries.items()) or "—"
        per_run.append([a.run_name, a.method, str(a.seed), str(o.shared), _pct(o.verbatim_rate),
                        _pct(o.ngram_copy_rate), "—" if math.isnan(o.levenshtein) else f"{o.levenshtein:.3f}",
                        str(o.secret_mentions), ranks])
    summary = []
    for row in summarize(audits):
        if "mean-rank" in row:
            summary.append([row["configuration"], row["prompt"], str(row["runs"]), f"{row['mean-rank']:.1f}",
                            f"{row['rank-0']}/{row['runs']}", f"{row['mean-exposure']:.2f}", "", "", "", ""])
        else:
            summary.append([row["configuration"], row["prompt"], str(row["runs"]), "", "", "", str(row["shared"]),
                            _pct(row["verbatim-rate"]), _pct(row["ngram-copy-rate"]),
                            "—" if math.isnan(row["levenshtein"]) else f"{row['levenshtein']:.3f}"])
    return [("audit per run", ["run", "method", "seed", "shared texts", "verbatim %", "n-gram copy %",
                               "Levenshtein", "secret mentions", "canary rank (exposure)"], per_run),
            ("over runs", ["configuration", "prompt", "runs", "mean canary rank", "rank 0", "mean exposure",
                           "shared texts", "verbatim %", "n-gram copy %", "Levenshtein"], summary)]


def write_report(audits: Sequence[RunAudit], directory: Path) -> Path:
    """``audit.json`` (every run's audit and the summary) and ``audit.md`` (the tables) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "audit.json").write_text(json.dumps({"runs": [a.to_dict() for a in audits],
                                                      "summary": summarize(audits)}, indent=1, allow_nan=True))
    lines = []
    for title, header, rows in tables(audits):
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows] + [""]
    lines.append("Verbatim: shared texts containing a whole private text; n-gram copy: sharing a run of words with "
                 "one; Levenshtein: mean normalised edit distance to the nearest private text (0 = identical); canary "
                 "rank among the comparison secrets (0 = memorised, ~500 of 999 = nothing leaked), exposure = "
                 "log2(candidates + 1) - log2(rank + 1).")
    path = directory / "audit.md"
    path.write_text("\n".join(lines) + "\n")
    return path
