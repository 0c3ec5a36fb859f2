"""What a person sees while ``fedbridge run`` and ``compare`` work: one line per run, and where the detail went.

A run's own output (Flower's and Ray's logs, the silos' and the server LLM's progress bars) is for debugging, and two
simulated silos print it at once: it goes to ``<results-dir>/<run-name>.log``, which the run record names
(``artifacts["log"]``). The console gets one line per run: in a terminal it updates in place (phase, silos done,
elapsed seconds, read off the run's output as it arrives); piped, one line when the run starts and one when it ends.
Warnings that matter (fedbridge's own, at WARNING and above) still reach the console, once each, on one line.
``verbose`` streams the full output as well, as ``fedbridge`` did before it had a console.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from fedbridge.config import ExperimentConfig
from fedbridge.results import RunRecord

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RAY_PREFIX = re.compile(r"^\((?:\w+ )?pid=\d+[^)]*\)\s*")  # "(ClientAppActor pid=123) " before an actor's line
BAR = re.compile(r"^(?P<desc>[^|]+?):\s+(?P<pct>\d{1,3})%\|")  # tqdm: "silo-0 train:  40%|████ | 4/10 [...]"
SILO_BAR = re.compile(r"^(?P<silo>silo-\d+) (?P<phase>.+)$")  # a silo's bars are named "silo-<k> <what>"
STEPS = (  # Flower's log lines that mark how far a run got, and the phase each starts
    (re.compile(r"Successfully started run"), "Flower run started"),
    (re.compile(r"Initialising: RayBackend"), "starting the silos"),
    (re.compile(r"\[ROUND (\d+/\d+)\]"), "round {0}"),
)
# A simulation's ServerApp logs every Flower record twice: through Flower's console (colored, "WARNING :   msg") and
# through the root logger ("12/07/2026 21:11:45:WARNING:msg"); fedbridge's records come through the root logger only.
FLOWER_LOG = re.compile(r"^(?:WARNING|ERROR|CRITICAL)\s*:\s+(?P<msg>.+)$")
ROOT_LOG = re.compile(r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:(?:WARNING|ERROR|CRITICAL):(?P<msg>.+)$")
PY_WARNING = re.compile(r"^(?P<file>\S+\.py):\d+: (?P<category>\w*Warning): (?P<msg>.+)$")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WARNING_CHARS = 200  # a warning's one line on the console (at most the terminal's width); the whole is in the log
REFRESH_SECONDS = 0.5


def own_code(path: str) -> bool:
    """Whether a warning's source file is fedbridge's (a checkout, an install, or the app copy Flower runs), not a
    library's: another package's warnings are the library's business and stay in the log."""
    tail = path.replace("\\", "/").rpartition("/fedbridge/")[2]
    return bool(tail) and "site-packages" not in tail


def one_line(message: str, limit: int = WARNING_CHARS) -> str:
    """A message's first line, its whitespace collapsed, cut to ``limit`` characters."""
    line = " ".join(ANSI.sub("", message).strip().split("\n", 1)[0].split())
    return line if len(line) <= limit else line[:limit - 1] + "…"


@dataclass
class Progress:
    """How far one run got, read off its output: the phase (the last progress bar or Flower step seen), and the
    silos whose latest progress bar of the current silo phase finished."""

    num_silos: int
    phase: str = "starting"
    silo_phase: str = ""
    finished: dict[str, str] = field(default_factory=dict)  # silo -> the phase of its last finished bar

    def feed(self, line: str) -> None:
        if bar := BAR.match(line):
            desc, pct = bar["desc"].strip(), int(bar["pct"])
            if silo := SILO_BAR.match(desc):
                self.phase = self.silo_phase = silo["phase"]
                if pct >= 100:
                    self.finished[silo["silo"]] = silo["phase"]
                else:  # a silo that starts a bar again (the next round) is not done with it
                    self.finished.pop(silo["silo"], None)
            else:
                self.phase = f"{desc} {pct}%"
            return
        for pattern, phase in STEPS:
            if match := pattern.search(line):
                self.phase = phase.format(*match.groups())
                return

    def describe(self) -> str:
        if not self.silo_phase or self.phase != self.silo_phase:
            return self.phase
        done = sum(phase == self.silo_phase for phase in tuple(self.finished.values()))  # a copy: silos write
        return f"{self.phase}, silos {done}/{self.num_silos} done"


class RunLog:
    """One run's output: every line goes to its log file (ANSI codes removed, progress bar updates on lines of
    their own) and is read for the run's progress and for warnings that matter."""

    def __init__(self, path: Path, console: RunConsole, num_silos: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.console, self.progress = path, console, Progress(num_silos)
        self._file = path.open("w", encoding="utf-8", buffering=1)  # line-buffered: `tail -f` follows the run
        self._partial, self._flower_said = "", set()
        self._lock = threading.Lock()  # silos' threads (in process) write while the server logs

    def write(self, text: str) -> None:
        clean = ANSI.sub("", text)
        with self._lock:
            if self._file.closed:  # a progress bar closed after its run ended
                return
            self._file.write(clean.replace("\r\n", "\n").replace("\r", "\n"))
            *lines, self._partial = re.split(r"[\r\n]", self._partial + clean)
            for line in lines:
                self._read(RAY_PREFIX.sub("", line).strip())

    def _read(self, line: str) -> None:
        self.progress.feed(line)
        if match := FLOWER_LOG.match(line):  # Flower's own: its twin through the root logger follows
            self._flower_said.add(match["msg"].strip())
        elif (match := ROOT_LOG.match(line)) and match["msg"].strip() not in self._flower_said:
            self.console.warn(match["msg"])
        elif (match := PY_WARNING.match(line)) and own_code(match["file"]):
            self.console.warn(f"{match['category']}: {match['msg']}")

    def close(self) -> None:
        with self._lock:
            if self._partial:
                self._read(self._partial.strip())
            self._file.close()


class _Stream(io.TextIOBase):
    """``sys.stdout`` or ``sys.stderr`` during a run: into the run's log, and on to ``echo`` (``--verbose``)."""

    def __init__(self, log: RunLog, echo: TextIO | None) -> None:
        self.log, self.echo = log, echo

    @property
    def encoding(self) -> str:  # tqdm draws its bars in Unicode where the stream says it can
        return "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        if self.echo is not None:
            self.echo.write(text)
        return len(text)

    def flush(self) -> None:
        if self.echo is not None:
            self.echo.flush()


class _LogHandler(logging.Handler):
    """Every log record of the run into its log; fedbridge's warnings and errors also to the console."""

    def __init__(self, log: RunLog) -> None:
        super().__init__()
        self.log = log
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log.write(self.format(record) + "\n")
            if record.levelno >= logging.WARNING and record.name.partition(".")[0] == "fedbridge":
                self.log.console.warn(record.getMessage())
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


@dataclass
class _Run:
    label: str
    log: RunLog
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def line(self) -> str:
        return f"{self.label}: {self.log.progress.describe()}, {self.elapsed:.0f} s"


class RunConsole:
    """The console of one ``fedbridge`` command: ``run(cfg, ...)`` wraps each run. In a terminal (and without
    ``verbose``), one line per run that updates in place; otherwise plain lines, one as a run starts and one as it
    ends. Warnings that matter are shown once each per command, however many runs or silos raise them."""

    def __init__(self, verbose: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out, self.err, self.verbose = out or sys.stdout, err or sys.stderr, verbose
        self.live = not verbose and _is_terminal(self.out)
        self._shown: set[str] = set()
        self._current: _Run | None = None
        self._drawn = ""  # the live line as last drawn
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def run(self, cfg: ExperimentConfig, label: str, engine: str) -> Iterator[Path]:
        """Around one run of ``cfg`` (its ``run_name`` set): its output goes to its log, whose path this yields and
        the run's record names afterwards; the console shows its line."""
        log = RunLog(Path(cfg.results_dir) / f"{cfg.run_name}.log", self, cfg.partition.num_silos)
        run, stop = _Run(label, log), threading.Event()
        if not self.live:
            self._print(f"{label}: started ({engine}), log: {log.path}")
        with self._lock:
            self._current = run
            self._draw()
        ticker = threading.Thread(target=self._tick, args=(stop,), daemon=True) if self.live else None
        if ticker:
            ticker.start()
        outcome = "interrupted"
        try:
            with self._capture(log):
                yield log.path
            outcome = "ok"
        except Exception:
            outcome = "failed"
            raise
        finally:
            stop.set()
            if ticker:
                ticker.join()
            log.close()
            record = attach_log(Path(cfg.results_dir) / f"{cfg.run_name}.json", log.path)
            with self._lock:
                self._current = None
                self._clear()
                self._print(self._end_line(run, outcome, record))

    def warn(self, message: str) -> None:
        """Show a warning once per command, on one line (with ``verbose`` the stream already shows it)."""
        width = shutil.get_terminal_size().columns - len("warning: ") - 1 if _is_terminal(self.err) else WARNING_CHARS
        line = one_line(message, min(max(width, 40), WARNING_CHARS))
        with self._lock:
            if self.verbose or not line or line in self._shown:
                return
            self._shown.add(line)
            self._clear()
            self.err.write(f"warning: {line}\n")
            self.err.flush()
            self._draw()

    @contextlib.contextmanager
    def _capture(self, log: RunLog) -> Iterator[None]:
        """Route the run's output into its log: what it prints (Flower's streamed log, in-process progress bars),
        its log records and its Python warnings; with ``verbose``, the terminal also gets what it got before."""
        root, flower = logging.getLogger(), logging.getLogger("flwr")
        terminal = (sys.__stdout__, sys.__stderr__, sys.stdout, sys.stderr, self.out, self.err)
        before = root.level
        gates = []  # (handler, filter): a terminal handler keeps what it showed before only with verbose
        for logger, keep in ((root, before if self.verbose else math.inf), (flower, 0 if self.verbose else math.inf)):
            for handler in logger.handlers:
                if isinstance(handler, logging.StreamHandler) and any(handler.stream is s for s in terminal):
                    gate = _level_gate(keep)
                    handler.addFilter(gate)
                    gates.append((handler, gate))
        handler = _LogHandler(log)
        root.addHandler(handler)
        if before > logging.INFO:  # the log has the run's INFO records
            root.setLevel(logging.INFO)
        echo_out, echo_err = (self.out, self.err) if self.verbose else (None, None)
        try:  # Python's warnings print to sys.stderr: into the log, where RunLog reads them
            with contextlib.redirect_stdout(_Stream(log, echo_out)), contextlib.redirect_stderr(_Stream(log, echo_err)):
                yield
        finally:
            root.setLevel(before)
            root.removeHandler(handler)
            for gated, gate in gates:
                gated.removeFilter(gate)

    def _end_line(self, run: _Run, outcome: str, record: RunRecord | None) -> str:
        if outcome == "ok" and (record is None or record.status == "ok"):
            f1 = (record.global_metrics.get("macro_f1") if record else None)
            score = f", macro-F1 {100 * f1:.1f}" if isinstance(f1, (int, float)) and not math.isnan(f1) else ""
            return f"{run.label}: ok, {run.elapsed:.0f} s{score}"
        word = "interrupted" if outcome == "interrupted" else "FAILED"
        return f"{run.label}: {word} after {run.elapsed:.0f} s, log: {run.log.path}"

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(REFRESH_SECONDS):
            with self._lock:
                self._draw()

    def _draw(self) -> None:
        """The current run's line, in place; cut to the terminal's width, since a wrapped line cannot be redrawn."""
        if not self.live or self._current is None:
            return
        line = self._current.line()[:max(shutil.get_terminal_size().columns - 1, 20)]
        if line != self._drawn:
            self.out.write("\r\x1b[K" + line)
            self.out.flush()
            self._drawn = line

    def _clear(self) -> None:
        if self.live:
            self.out.write("\r\x1b[K")
            self._drawn = ""

    def _print(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()


def attach_log(record_path: Path, log_path: Path) -> RunRecord | None:
    """Name the run's log in its record (``artifacts["log"]``), rewriting the record the run wrote; None where the
    run wrote none (it failed before its ServerApp could)."""
    try:
        record = RunRecord.read(record_path)
        record.artifacts["log"] = str(log_path.resolve())  # records are read from anywhere
        record.write(record_path.parent)
    except (OSError, ValueError, TypeError):
        return None
    return record


def _level_gate(level: float):  # noqa: ANN202 - a logging filter
    return lambda record: record.levelno >= level



def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
