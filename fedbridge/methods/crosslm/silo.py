"""CrossLM's silo side: one SLM kept across messages.

The SLM after round r (0 = trained on private data) lives in the node's Flower state and, under the server's
experiment id, on the silo's disk too: a restarted server is a new Flower run with empty node state, and its
resumed run asks for the SLM of the round it had reached. The disk also remembers each finished round's
metrics, so a request the earlier run already completed is answered again, never trained twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedbridge.checkpoint import atomic_write, save_tensors
from fedbridge.errors import ConfigError
from fedbridge.models.slm import SLM, predict_proba
from fedbridge.protocol import ProtocolError
from fedbridge.silo import Silo, train_metrics
from fedbridge.tasks import Examples

KEPT_SLM = "crosslm-slm"  # CrossLM: the silo's SLM, kept in the node state between messages
KEPT_ROUND = "crosslm-slm-round"  # ... and the round it is the result of


def _meta(silo: Silo, experiment: str) -> tuple[Path, dict]:
    """The silo's CrossLM file for this experiment and its content: the latest round and each round's metrics."""
    path = silo.state_dir / experiment / f"{silo.name}-crosslm.json"
    return path, json.loads(path.read_text()) if path.exists() else {"round": None, "metrics": {}}


def _weights_path(silo: Silo, experiment: str, round_: int) -> Path:
    return silo.state_dir / experiment / f"{silo.name}-crosslm-slm-round-{round_}.safetensors"


def crosslm_done(silo: Silo, experiment: str, round_: int) -> dict[str, float] | None:
    """The metrics of ``round_`` if this silo finished it for this experiment already (a resumed server)."""
    return _meta(silo, experiment)[1]["metrics"].get(str(round_)) if experiment else None


def kept_slm(silo: Silo, state: RecordDict, round_: int | None = None, experiment: str = "") -> SLM:
    """The SLM as it was after ``round_`` (None: the latest), from the node state or the silo's disk."""
    if KEPT_SLM in state and (round_ is None or state[KEPT_ROUND]["round"] == round_):
        return silo.slm_from_arrays(state[KEPT_SLM])
    if experiment:
        latest = _meta(silo, experiment)[1]["round"]
        weights = _weights_path(silo, experiment, latest)
        if latest is not None and round_ in (None, latest) and weights.exists():
            return silo.new_slm(safetensors.torch.load_file(weights))
    wanted = "a trained SLM" if round_ is None else f"its SLM after round {round_}"
    raise ProtocolError(f"{silo.name} does not have {wanted}: the server must send train.private first, or "
                        "resume with the same experiment and the silo's same state-dir.")


def kept_is_private(silo: Silo, state: RecordDict, experiment: str = "") -> bool:
    """Whether the kept SLM is a DP release of the private data (trained with ``slm.dp-epsilon`` and only
    post-processed since): what it was trained with, not what the current run asks (a kept model of an earlier,
    non-DP run stays non-private)."""
    if KEPT_ROUND in state:
        return state[KEPT_ROUND].get("private", False) is True
    return experiment != "" and _meta(silo, experiment)[1].get("private", False) is True


def release_kept(silo: Silo, state: RecordDict, what: str, experiment: str = "") -> None:
    """The kept SLM's weights or scores leave: free where it is a DP release, else a non-private release the silo's
    policy must allow."""
    if not kept_is_private(silo, state, experiment):
        silo.non_private_release(what, experiment)


def keep_slm(silo: Silo, state: RecordDict, model: SLM, round_: int = 0, experiment: str = "",
             metrics: dict[str, float] | None = None, final: bool = False, private: bool = False) -> None:
    """Keep the SLM (what its mode trains) after ``round_`` for later messages; with an experiment id also on
    disk, with the round's metrics. The weights file is written before the JSON that points to it, and the
    previous round's removed after, so a crash at any point leaves a consistent pair. After the ``final`` round
    only the metrics stay."""
    weights = model.trainable_state()
    state[KEPT_SLM] = ArrayRecord(weights)
    state[KEPT_ROUND] = ConfigRecord({"round": round_, "private": private})
    if not experiment:
        return
    path, stored = _meta(silo, experiment)
    if not final:
        save_tensors(_weights_path(silo, experiment, round_), weights)
    atomic_write(path, json.dumps({"round": round_, "private": private,
                                   "metrics": {**stored["metrics"], str(round_): metrics or {}}}))
    stale = [stored["round"]] if stored["round"] not in (None, round_) else []
    for old in stale + ([round_] if final else []):
        _weights_path(silo, experiment, old).unlink(missing_ok=True)


def train_private(silo: Silo, state: RecordDict, global_test: Examples | None,
                  experiment: str = "") -> tuple[dict[str, float], dict]:
    """Train a fresh SLM on the private split, keep it for later messages, and evaluate it: (metrics, the DP
    SLM's privacy record or {}; {} too when a resumed server asks again, whose record holds it already)."""
    if (done := crosslm_done(silo, experiment, 0)) is not None:
        return done, {}
    model = silo.new_slm()
    stats = silo.train_slm(model, experiment=experiment)
    metrics = {**silo.evaluate_slm(model, global_test), **silo.info(), **train_metrics(stats)}
    keep_slm(silo, state, model, 0, experiment, metrics, private=silo.cfg.slm.private)
    return metrics, stats.privacy


def score(silo: Silo, state: RecordDict, texts: tuple[str, ...], round_: int | None = None,
          experiment: str = "") -> np.ndarray:
    """Class probabilities of the server's texts, shape (len(texts), num_labels), by the SLM after ``round_``."""
    return predict_proba(kept_slm(silo, state, round_, experiment), texts)


def enhance(silo: Silo, state: RecordDict, examples: Examples, targets: np.ndarray | None, epochs: int, weight: float,
            with_private: bool, global_test: Examples | None, round_: int = 1, experiment: str = "",
            final: bool = False) -> dict[str, float]:
    """Round ``round_``: fine-tune the SLM of the round before on the server's selected examples (hard labels,
    or soft ``targets`` to distil), optionally with the private split again, keep it, and evaluate it.
    ``epochs=0``: the SLM's own recipe, the epoch chosen on the private validation split."""
    if (done := crosslm_done(silo, experiment, round_)) is not None:
        return done
    if with_private and silo.cfg.slm.private:
        raise ConfigError(f"{silo.name} refuses to fine-tune its DP SLM on its private data again: each round "
                          "would be another DP release. Set crosslm.with-private=false (the DP SLM is then "
                          "fine-tuned on the server's examples only, post-processing).")
    model = kept_slm(silo, state, round_ - 1, experiment)
    private = kept_is_private(silo, state, experiment) and not with_private  # server examples only: post-processing
    seen = 0
    if len(examples) or with_private:
        stats = silo.train_slm(model, epochs or None, examples, weight, private=with_private, soft=targets,
                               seed=1000 * round_, progress="enhance")
        seen = stats.examples
    metrics = {**silo.evaluate_slm(model, global_test), **silo.info(), "train.examples": seen,
               "train.synthetic": len(examples)}
    keep_slm(silo, state, model, round_, experiment, metrics, final, private)
    return metrics


def install_slm(silo: Silo, state: RecordDict, arrays: ArrayRecord, global_test: Examples | None, round_: int = 1,
                experiment: str = "", final: bool = False) -> dict[str, float]:
    """Keep SLM weights the server enhanced in round ``round_`` (score-on=server), and evaluate them."""
    if (done := crosslm_done(silo, experiment, round_)) is not None:
        return done
    model = silo.slm_from_arrays(arrays)
    metrics = {**silo.evaluate_slm(model, global_test), **silo.info()}
    keep_slm(silo, state, model, round_, experiment, metrics, final, kept_is_private(silo, state, experiment))
    return metrics
