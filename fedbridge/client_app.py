"""fedbridge ClientApp: one thin handler per message type (see ``fedbridge.protocol``); the work is in ``Silo`` and
in each method's ``silo.py``. ``register`` puts the handlers on any ClientApp (fedbridge's ``app``, or a user's own,
docs/strategies.md). Nothing here imports server code."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedbridge import protocol as p
from fedbridge.errors import ConfigError, SiloFailure, SiloRefusal
from fedbridge.faults import fault_mod
from fedbridge.methods.crosslm import silo as crosslm
from fedbridge.methods.fdkt import silo as fdkt
from fedbridge.methods.social import silo as social
from fedbridge.methods.social.teaching import lesson_records
from fedbridge.privacy.dp_votes import vote_shares
from fedbridge.privacy.policy import SiloPolicy
from fedbridge.protocol import ProtocolError
from fedbridge.silo import Silo, train_metrics

log = logging.getLogger("fedbridge.silo")
REFUSAL_ERROR_CODE = 2  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: what the server saw when a refusal raised


def wire_safe_errors(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A deployed (strict) silo's errors cross the wire as a category and a fix, never its data: Flower returns an
    exception's text to the server, and a data error would quote the silo's rows, labels or paths. Refusals
    (``SiloRefusal``: policy or budget) are the silo's deliberate answer, not a crash: one warning line in its log
    and an error reply naming the reason (no traceback, no failed ClientApp process). Protocol errors (about the
    server's own message) and config errors pass as they are; anything else is replaced, and its detail goes to the
    silo's own log."""
    try:
        return call_next(msg, context)
    except SiloRefusal as refusal:
        log.warning("Refused %s: %s", msg.metadata.message_type, refusal)
        return Message(Error(REFUSAL_ERROR_CODE, f"{type(refusal).__name__}: {refusal}"), reply_to=msg)
    except (ProtocolError, ConfigError):
        raise
    except Exception as err:
        if not _strict(context.node_config):
            raise
        log.warning("%s failed: %s: %s", msg.metadata.message_type, type(err).__name__, err, exc_info=True)
        raise SiloFailure(f"{type(err).__name__} on this silo while handling {msg.metadata.message_type}; the detail "
                          "is in the silo's own log. Check the run config against the silo's node config.") from None


def _strict(node_config: dict) -> bool:
    try:
        return SiloPolicy.from_node_config(node_config).name == "strict"
    except ConfigError:
        return True


def _reply(silo: Silo, msg: Message, metrics: dict, dp_slm: dict | None = None, **records) -> Message:
    """A reply with the metrics this silo's policy lets leave (``Silo.releasable``), the given records, and the
    privacy record of a DP SLM where one was trained (``dp_slm``)."""
    return Message(p.metrics_reply(silo.releasable(metrics), **records, **_slm_privacy(dp_slm)), reply_to=msg)


def _slm_privacy(privacy: dict | None) -> dict:
    return {p.SLM_PRIVACY: ConfigRecord(privacy)} if privacy else {}


def _silo(msg: Message, context: Context) -> tuple[Silo, dict]:
    config = p.check_version(msg.content)
    silo = Silo.from_context(context)
    silo.limits.check_request(msg.content)  # a deployed silo's caps on what one message may ask of it
    return silo, dict(config)


def info(msg: Message, context: Context) -> Message:
    silo, _ = _silo(msg, context)
    return _reply(silo, msg, silo.info())


def _train_fresh_and_evaluate(msg: Message, context: Context, with_examples: bool) -> Message:
    silo, config = _silo(msg, context)
    extra = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels)) if with_examples else None
    weight = p.read_number(config, "synthetic-weight", 1.0, low=0.0)
    global_test = p.read_global_test(msg.content, len(silo.labels))  # a malformed request fails before training
    model = silo.new_slm()
    stats = silo.train_slm(model, extra=extra, extra_weight=weight, experiment=p.read_experiment(config))
    metrics = silo.evaluate_slm(model, global_test)
    return _reply(silo, msg, {**metrics, **silo.info(), **train_metrics(stats),
                              "train.synthetic": len(extra or ())}, stats.privacy)


def train_local(msg: Message, context: Context) -> Message:
    """Baseline ``local``: train a fresh SLM on private data only, then evaluate it."""
    return _train_fresh_and_evaluate(msg, context, with_examples=False)


def train_augmented(msg: Message, context: Context) -> Message:
    """FDKT: train a fresh SLM on private + the server's augmented examples, then evaluate it."""
    return _train_fresh_and_evaluate(msg, context, with_examples=True)


def synthesize(msg: Message, context: Context) -> Message:
    """FDKT: write DP synthetic demonstrations; only they and their privacy cost leave the silo."""
    silo, config = _silo(msg, context)
    examples, privacy, metrics = fdkt.synthesize(silo, experiment=p.read_experiment(config))
    return _reply(silo, msg, metrics, examples=p.examples_record(examples), privacy=ConfigRecord(privacy))


def train_fedavg(msg: Message, context: Context) -> Message:
    """One FedAvg round: start from the server's weights, train locally, send weights back."""
    silo, config = _silo(msg, context)
    epochs = p.read_number(config, "epochs", 1, low=0, high=1000, integer=True)
    proximal_mu = float(p.read_number(config, "proximal-mu", 0.0, low=0.0))  # FedProx's strategy sends it
    arrays = p.read_arrays(msg.content)
    experiment = p.read_experiment(config)
    silo.release_slm("SLM weights", experiment)
    model = silo.slm_from_arrays(arrays)
    stats = silo.train_slm(model, epochs=int(epochs), experiment=experiment, trainings=silo.cfg.rounds,
                           proximal_mu=proximal_mu)
    # FedAvg weights each silo by num-examples: the exact count only where non-private details may leave
    weight = len(silo.data.train) if silo.policy.allow_non_private else 1
    return Message(p.metrics_reply({"num-examples": weight, **silo.releasable(
        {"train.seconds": stats.seconds, "train.examples": stats.examples, "train.loss": stats.final_loss})},
        arrays=ArrayRecord(model.trainable_state()), **_slm_privacy(stats.privacy)), reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the server's SLM weights on the silo's test split (and the global test set, if sent)."""
    silo, _ = _silo(msg, context)
    global_test = p.read_global_test(msg.content, len(silo.labels))
    model = silo.slm_from_arrays(p.read_arrays(msg.content))
    metrics = silo.evaluate_slm(model, global_test)
    return _reply(silo, msg, {**metrics, "num-examples": len(silo.data.test), **silo.info()})


def evaluate_llm(msg: Message, context: Context) -> Message:
    silo, _ = _silo(msg, context)
    return _reply(silo, msg, {**silo.evaluate_llm(), **silo.info()})


def _crosslm_round(config: dict) -> tuple[int, str, bool]:
    """A CrossLM request's round, experiment id and whether it is the silo's final round."""
    return (int(p.read_number(config, "round", 0, low=0, integer=True)), p.read_experiment(config),
            config.get("final", False) is True)


def train_private(msg: Message, context: Context) -> Message:
    """CrossLM: train a fresh SLM on private data and keep it for scoring and enhancement."""
    silo, config = _silo(msg, context)
    global_test = p.read_global_test(msg.content, len(silo.labels))
    metrics, privacy = crosslm.train_private(silo, context.state, global_test, experiment=p.read_experiment(config))
    return _reply(silo, msg, metrics, privacy)


def score(msg: Message, context: Context) -> Message:
    """CrossLM: S(y|x) of the server's batch ``round``: with a vote request in the config (``crosslm.scores=dp-votes``)
    the shares of the silo's DP nearest-neighbour votes, with their privacy cost; else the class probabilities of
    the SLM of the round before (released without DP unless that SLM is DP). Only these leave."""
    silo, config = _silo(msg, context)
    round_, experiment, _ = _crosslm_round(config)
    examples = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels))
    t0, records = time.perf_counter(), {}
    if "epsilon" in config:
        epsilon, releases, k, noise_seed = p.read_vote_request(config)
        histogram, privacy = silo.dp_vote(examples.texts, epsilon, releases, k, noise_seed, experiment)
        probs, records = vote_shares(histogram), {"privacy": ConfigRecord(privacy)}
    else:
        crosslm.release_kept(silo, context.state, "SLM scores", experiment)
        probs = crosslm.score(silo, context.state, examples.texts, max(round_ - 1, 0), experiment)
    agreement = float((probs.argmax(axis=1) == np.array(examples.labels)).mean()) if len(examples) else 0.0
    metrics = {"score.examples": len(examples), "score.seconds": time.perf_counter() - t0, "score.agreement": agreement}
    return _reply(silo, msg, metrics, scores=p.probabilities_record(probs), **records)


def upload(msg: Message, context: Context) -> Message:
    """CrossLM with score-on=server (opt-in, weaker privacy): the weights and spec of the SLM after ``round``."""
    silo, config = _silo(msg, context)
    round_, experiment, _ = _crosslm_round(config)
    crosslm.release_kept(silo, context.state, "SLM weights", experiment)
    model = crosslm.kept_slm(silo, context.state, round_, experiment)
    return _reply(silo, msg, silo.info(), arrays=ArrayRecord(model.trainable_state()),
                  slm=ConfigRecord({"spec": silo.cfg.slm.spec_for(silo.index)}))


def enhance(msg: Message, context: Context) -> Message:
    """CrossLM round ``round``: fine-tune the SLM on the server's selected examples, or keep the weights the server
    enhanced."""
    silo, config = _silo(msg, context)
    round_, experiment, final = _crosslm_round(config)
    global_test = p.read_global_test(msg.content, len(silo.labels))
    if p.ARRAYS in msg.content:
        arrays = p.read_arrays(msg.content, like=context.state.get(crosslm.KEPT_SLM))
        return _reply(silo, msg, crosslm.install_slm(silo, context.state, arrays, global_test, round_, experiment, final))
    examples = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels))
    targets = (p.read_probabilities(msg.content, p.TARGETS, len(examples), len(silo.labels))
               if p.TARGETS in msg.content else None)
    metrics = crosslm.enhance(silo, context.state, examples, targets,
                           epochs=int(p.read_number(config, "epochs", 0, low=0, high=1000, integer=True)),
                           weight=float(p.read_number(config, "synthetic-weight", 1.0, low=0.0)),
                           with_private=config.get("with-private", False) is True, global_test=global_test,
                           round_=max(round_, 1), experiment=experiment, final=final)
    return _reply(silo, msg, metrics)


def teach(msg: Message, context: Context) -> Message:
    """Social Learning: the silo as a teacher writes synthetic examples or instructions from its private data; only
    they, how they were made and their privacy cost leave the silo."""
    silo, config = _silo(msg, context)
    lesson = social.teach(silo, p.read_mode(config), experiment=p.read_experiment(config))
    return _reply(silo, msg, lesson.metrics, **lesson_records(lesson))


def vote(msg: Message, context: Context) -> Message:
    """Social Learning: score the server's candidates against this teacher's held-out examples; only scores leave."""
    silo, config = _silo(msg, context)
    mode = p.read_mode(config)
    if mode == "examples":
        candidates = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels))
        texts, labels = list(candidates.texts), list(candidates.labels)
    else:
        texts, labels = p.read_texts(msg.content, p.INSTRUCTIONS), None
    t0 = time.perf_counter()
    scores = social.vote(silo, mode, texts, labels, p.read_experiment(config))
    return _reply(silo, msg, {"vote.candidates": len(texts), "vote.seconds": time.perf_counter() - t0},
                  votes=ConfigRecord({"scores": scores}))


def dp_vote(msg: Message, context: Context) -> Message:
    """Private Evolution and every DP-scored method: the silo's DP nearest-neighbour vote histogram of the server's
    candidates; only the noisy histogram and its privacy cost leave."""
    silo, config = _silo(msg, context)
    epsilon, releases, k, noise_seed = p.read_vote_request(config)
    candidates = p.read_examples(msg.content, p.EXAMPLES, len(silo.labels))
    t0 = time.perf_counter()
    histogram, privacy = silo.dp_vote(candidates.texts, epsilon, releases, k, noise_seed, p.read_experiment(config))
    return _reply(silo, msg, {"vote.candidates": len(candidates), "vote.seconds": time.perf_counter() - t0},
                  histogram=p.histogram_record(histogram), privacy=ConfigRecord(privacy))


def share_raw(msg: Message, context: Context) -> Message:
    """Social Learning's NON-PRIVATE upper bound only: n raw training examples (refused unless the run asks for it)."""
    silo, config = _silo(msg, context)
    raw, privacy = social.share_raw(silo, int(p.read_number(config, "n", low=1, high=p.MAX_EXAMPLES, integer=True)),
                                  p.read_experiment(config))
    return _reply(silo, msg, {"share.examples": len(raw)}, examples=p.examples_record(raw),
                  privacy=ConfigRecord(privacy))


# message type -> (its handler, the methods that send it; () = every method). A method's silo side is these handlers.
HANDLERS: dict[str, tuple[ClientAppCallable, tuple[str, ...]]] = {
    p.INFO: (info, ()),
    p.TRAIN_LOCAL: (train_local, ("local",)),
    p.TRAIN_FEDAVG: (train_fedavg, ("fedavg",)),
    p.EVALUATE: (evaluate, ("fedavg", "centralized")),
    p.EVALUATE_LLM: (evaluate_llm, ("llm-zero-shot",)),
    p.SYNTHESIZE: (synthesize, ("fdkt", "pipeline")),
    p.TRAIN_AUGMENTED: (train_augmented, ("fdkt", "pe")),
    p.DP_VOTE: (dp_vote, ("fdkt", "pe")),
    p.TRAIN_PRIVATE: (train_private, ("crosslm", "pipeline")),
    p.SCORE: (score, ("crosslm", "pipeline")),
    p.UPLOAD: (upload, ("crosslm", "pipeline")),
    p.ENHANCE: (enhance, ("crosslm", "pipeline")),
    p.TEACH: (teach, ("social",)),
    p.VOTE: (vote, ("social",)),
    p.SHARE_RAW: (share_raw, ("social",)),
}
SERVED = tuple(dict.fromkeys(m for _, methods in HANDLERS.values() for m in methods))  # the methods served here


def register(app: ClientApp, methods: Iterable[str] | None = None) -> ClientApp:
    """Put fedbridge's silo handlers on ``app``: those of ``methods`` (names as ``fedbridge list`` shows them) and
    discovery, or all of them (None). Each handler keeps fedbridge's mods: a strict silo's errors cross the wire as a
    category and a fix (``wire_safe_errors``), and the run config's fault injection (``fault_mod``). Returns ``app``."""
    wanted = set(SERVED if methods is None else [methods] if isinstance(methods, str) else methods)
    if unknown := sorted(wanted - set(SERVED)):
        raise ConfigError(f"register: unknown method '{unknown[0]}'. fedbridge's silo side serves: "
                          f"{', '.join(SERVED)}.")
    for message_type, (handler, users) in HANDLERS.items():
        if not users or wanted & set(users):
            category, _, action = message_type.partition(".")  # "train" alone: Flower's default action
            decorator = getattr(app, category)
            mods = [wire_safe_errors, fault_mod]
            (decorator(action, mods=mods) if action else decorator(mods=mods))(handler)
    return app


app = register(ClientApp())
