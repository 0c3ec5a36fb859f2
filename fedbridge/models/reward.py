"""CrossLM's learning signals: SLM rewards, their robust combination over silos, and the server LLM's LoRA update.

Reward of a generated pair (x, y), from silo i's SLM:  r_i(x, y) = 2·S_i(y|x) − 1  ∈ [−1, 1].
Several silos' rewards are combined per example with ``aggregate`` (mean, median, or trimmed mean), so that one
silo that lies cannot steer the LLM once three or more silos have scored a batch.

The LLM update (``RewardTrainer``) trains LoRA adapters on a minibatch of scored examples with

  quality  r > 0:  −r · mean_t log p(x_t | x_<t, prompt_y)            reward-weighted likelihood
           r < 0:  −|r| · mean_t log(1 − p(x_t | x_<t, prompt_y))      token-level unlikelihood (Welleck et al. 2020)
  task     r > 0:  −r · mean_t log p(y_t | classification prompt(x))  the LLM learns the label of approved examples
  kl       mean over the same tokens of KL(p_θ(·|ctx) ‖ p_0(·|ctx)), p_0 = the same network with adapters disabled

  loss = γ_quality · quality + γ_task · task + γ_kl · kl

The KL reference costs one extra forward pass without gradients and no second copy of the model: with LoRA,
the original model is ``model.disable_adapter()``. Every optimizer step logs its loss components.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedbridge.errors import ConfigError, DataError
from fedbridge.models.generation import Prompt, render_prompt
from fedbridge.models.llm import LLM
from fedbridge.models.llm_classifier import classification_prompt
from fedbridge.models.loading import MODEL_BUILD_LOCK

log = logging.getLogger(__name__)
AGGREGATIONS = ("mean", "median", "trimmed-mean")


# ------------------------------------------------------------------ rewards and their aggregation

def rewards_from_probabilities(probs: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """r = 2·S(y|x) − 1 for each row of class probabilities ``probs`` (n, num_labels) and intended label y."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probabilities of shape {probs.shape} do not match {len(labels)} labels")
    return 2.0 * probs[np.arange(len(labels)), np.asarray(labels, dtype=int)] - 1.0


def trimmed_count(num_silos: int, trim: float) -> int:
    """Values cut from each end by the trimmed mean: floor(trim·n), at least one once three silos have scored
    (any trim > 0), and never all of them.

    So a single outlier is always dropped from three or more values (``scipy.stats.trim_mean`` rounds down to
    zero for three or four silos at trim 0.25, and would keep it)."""
    if trim <= 0 or num_silos < 3:
        return 0
    return min(max(1, math.floor(trim * num_silos)), (num_silos - 1) // 2)


def aggregate(values: np.ndarray | Sequence[Sequence[float]], rule: str, trim: float = 0.25) -> np.ndarray:
    """Combine per-silo values, shape (silos, ...), over the silo axis with ``mean``, ``median`` or
    ``trimmed-mean``. With one silo every rule returns its values; with two, median and trimmed mean are the mean."""
    values = np.asarray(values, dtype=float)
    if values.ndim == 0 or len(values) == 0:
        raise ValueError("nothing to aggregate: no silo has scored these examples")
    if rule == "mean":
        return values.mean(axis=0)
    if rule == "median":
        return np.median(values, axis=0)
    if rule == "trimmed-mean":
        if not 0.0 <= trim < 0.5:
            raise ConfigError(f"trim must be in [0, 0.5), got {trim}.")
        k = trimmed_count(len(values), trim)
        return np.sort(values, axis=0)[k:len(values) - k].mean(axis=0)
    raise ConfigError(f"Unknown aggregation '{rule}'. Use one of: {', '.join(AGGREGATIONS)}.")


def aggregate_probabilities(per_silo: Sequence[np.ndarray], rule: str, trim: float = 0.25) -> np.ndarray:
    """Soft labels from several silos' class probabilities: the rule per class, then rows renormalised."""
    combined = np.clip(aggregate(np.stack(per_silo), rule, trim), 0.0, None)
    sums = combined.sum(axis=1, keepdims=True)
    uniform = np.full_like(combined, 1.0 / combined.shape[1])
    return np.where(sums > 0, combined / np.where(sums > 0, sums, 1.0), uniform)


# ------------------------------------------------------------------ the LoRA update

@dataclass(frozen=True)
class LLMUpdateConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # ("all-linear",) = every linear layer
    lr: float = 5e-4
    batch_size: int = 4  # scored examples per step (each gives a quality and, if r > 0, a task sequence)
    max_length: int = 160  # tokens per training sequence; the prompt is cut from the left
    quality_weight: float = 1.0  # γ_quality
    task_weight: float = 1.0  # γ_task
    kl_weight: float = 1.0  # γ_kl; 0 skips the reference pass


@dataclass(frozen=True)
class ScoredExample:
    """A generated example, the prompt that wrote it, its intended label and its (aggregated) reward."""

    prompt: Prompt
    text: str
    label: int
    reward: float


@dataclass(frozen=True)
class _Sequence:
    ids: list[int]
    start: int  # index of the first target token
    kind: str  # "quality" | "task"
    weight: float  # the reward (signed)


def attach_lora(model: PreTrainedModel, cfg: LLMUpdateConfig, seed: int = 0) -> PeftModel:
    """Wrap ``model`` (modified in place) with fresh LoRA adapters; B = 0, so it starts equal to the original."""
    targets = "all-linear" if cfg.targets == ("all-linear",) else list(cfg.targets)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                      task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # peft asks transformers a deprecated question; nothing for users to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            with MODEL_BUILD_LOCK:  # LoRA's init must not run under another thread's from_pretrained patches
                peft_model = get_peft_model(model, lora)
        except ValueError as err:
            raise ConfigError(f"LoRA target modules {cfg.targets} do not fit this LLM: {err}. "
                              "Name its attention projections, or use 'all-linear'.") from err
    # A's init again, as peft does it but from a private generator: torch's global RNG is shared with other threads
    rng = torch.Generator().manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            with torch.no_grad():
                param.copy_(torch.nn.init.kaiming_uniform_(torch.empty(param.shape), a=math.sqrt(5), generator=rng))
    return peft_model


def _encode(tok: PreTrainedTokenizerBase, prompt: Prompt, target: str, max_length: int) -> tuple[list[int], int] | None:
    text = render_prompt(tok, prompt)
    p_ids = tok(text, add_special_tokens=not text.startswith(tok.bos_token or "\0"))["input_ids"]
    c_ids = tok(target, add_special_tokens=False)["input_ids"][:max(1, max_length - 1)]
    if not c_ids:
        return None
    p_ids = p_ids[-(max_length - len(c_ids)):] or [tok.bos_token_id if tok.bos_token_id is not None else tok.pad_token_id]
    return p_ids + c_ids, len(p_ids)


class RewardTrainer:
    """The server LLM with LoRA adapters, one AdamW over the adapters for the whole run, and the per-step log."""

    def __init__(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, cfg: LLMUpdateConfig,
                 labels: Sequence[str], instruction: str, seed: int = 0) -> None:
        self.model, self.tok, self.cfg = attach_lora(model, cfg, seed), tok, cfg
        self.labels, self.instruction = tuple(labels), instruction
        self.optim = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                       weight_decay=0.0)
        self.rng = random.Random(seed)
        self.log: list[dict[str, float | int | str]] = []
        self.model.eval()

    def sequences(self, examples: Sequence[ScoredExample]) -> list[_Sequence]:
        """A quality sequence per example with r != 0, and a task sequence per example with r > 0."""
        out = []
        for ex in examples:
            if ex.reward != 0 and self.cfg.quality_weight:
                if enc := _encode(self.tok, ex.prompt, ex.text, self.cfg.max_length):
                    out.append(_Sequence(*enc, "quality", ex.reward))
            if ex.reward > 0 and self.cfg.task_weight:
                prompt = classification_prompt(self.instruction, ex.text, self.labels)
                if enc := _encode(self.tok, prompt, self.labels[ex.label], self.cfg.max_length):
                    out.append(_Sequence(*enc, "task", ex.reward))
        return out

    def loss(self, sequences: Sequence[_Sequence], with_kl: bool | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """The combined loss of these sequences and its components (floats, for the log)."""
        with_kl = self.cfg.kl_weight > 0 if with_kl is None else with_kl
        device, pad = self.model.device, self.tok.pad_token_id
        width = max(len(s.ids) for s in sequences)
        ids = torch.tensor([s.ids + [pad] * (width - len(s.ids)) for s in sequences], device=device)
        mask = torch.tensor([[1] * len(s.ids) + [0] * (width - len(s.ids)) for s in sequences], device=device)
        # position t predicts token t+1: the target tokens of sequence i sit at start..len-1
        rows = torch.tensor([i for i, s in enumerate(sequences) for _ in range(s.start, len(s.ids))], device=device)
        cols = torch.tensor([t for s in sequences for t in range(s.start - 1, len(s.ids) - 1)], device=device)
        targets = ids[rows, cols + 1]
        logp = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits[rows, cols].float(), dim=-1)
        token_logp = logp.gather(1, targets[:, None]).squeeze(1)
        weight = torch.tensor([s.weight for s in sequences], device=device)[rows]
        likely = -weight.abs() * token_logp  # r > 0 (quality and task)
        unlikely = -weight.abs() * torch.log1p(-token_logp.exp().clamp(max=1 - 1e-6))  # r < 0 (quality only)
        per_token = torch.where(weight > 0, likely, unlikely)
        counts = torch.bincount(rows, minlength=len(sequences)).clamp_min(1)
        per_sequence = torch.zeros(len(sequences), device=device).index_add(0, rows, per_token) / counts
        components: dict[str, torch.Tensor] = {}
        for kind in ("quality", "task"):
            chosen = torch.tensor([s.kind == kind for s in sequences], device=device)
            components[kind] = per_sequence[chosen].mean() if chosen.any() else per_sequence.sum() * 0.0
        loss = self.cfg.quality_weight * components["quality"] + self.cfg.task_weight * components["task"]
        if with_kl:
            with torch.no_grad(), self.model.disable_adapter():
                ref = torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits[rows, cols].float(), -1)
            components["kl"] = (logp.exp() * (logp - ref)).sum(-1).mean()
            loss = loss + self.cfg.kl_weight * components["kl"]
        return loss, {"loss": loss.item(), **{k: v.item() for k, v in components.items()},
                      "tokens": int(len(rows)), "sequences": len(sequences)}

    @torch.no_grad()
    def kl_divergence(self, examples: Sequence[ScoredExample]) -> float:
        """KL(adapted ‖ original) on these examples' target tokens, without training (a diagnostic)."""
        _, parts = self.loss(self.sequences(examples), with_kl=True)
        return parts["kl"]

    def step(self, examples: Sequence[ScoredExample]) -> dict[str, float] | None:
        """One optimizer step on these examples; None when none of them carries a training signal."""
        sequences = self.sequences(examples)
        if not sequences:
            return None
        t0 = time.perf_counter()
        self.model.train()
        try:
            loss, parts = self.loss(sequences)
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            self.optim.step()
        finally:
            self.model.eval()
        return {**parts, "seconds": round(time.perf_counter() - t0, 4)}

    def update(self, examples: Sequence[ScoredExample], steps: int, progress: str | None = None,
               **tags: float | int | str) -> list[dict]:
        """``steps`` optimizer steps on minibatches drawn in turn from a shuffled pass over the examples with a
        nonzero reward. Each step's components go to ``self.log`` with ``tags`` (e.g. silo, batch, version)."""
        usable = [ex for ex in examples if ex.reward != 0]
        if not usable or steps <= 0:
            return []
        order: list[ScoredExample] = []
        done = []
        for _ in tqdm(range(steps), desc=progress, disable=progress is None, unit="step"):
            if len(order) < min(self.cfg.batch_size, len(usable)):
                order += self.rng.sample(usable, len(usable))
            batch, order = order[:self.cfg.batch_size], order[self.cfg.batch_size:]
            parts = self.step(batch)
            if parts is not None:
                entry = {"step": len(self.log) + 1, **tags, **parts}
                self.log.append(entry)
                done.append(entry)
                log.info("llm step %d %s", entry["step"], {k: v for k, v in entry.items() if k != "step"})
        return done


# ------------------------------------------------------------------ generalisation: perplexity on general text

@torch.no_grad()
def perplexity(llm: LLM, texts: Sequence[str], max_tokens: int = 128, batch_size: int = 8) -> float:
    """exp of the mean negative log-likelihood per token of ``texts`` (each cut to ``max_tokens`` tokens) under
    ``llm`` (the interface: its continuation log-probabilities after an empty prompt)."""
    tok = llm.tokenizer
    cut = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:max_tokens]) for t in texts]
    cut = [t for t in cut if t.strip()]
    if not cut:
        raise DataError("No text to measure perplexity on.")
    scored = llm.continuation_logprobs([""] * len(cut), cut, batch_size=batch_size, max_tokens=max_tokens + 1)
    return float(math.exp(-sum(lp for lp, _ in scored) / sum(n for _, n in scored)))


_ROLE = re.compile(r":\w+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_{1,2}")
_MARKUP = re.compile(r"\*\*|``|\|details-(?:start|split|end)\|")
_WORD = re.compile(r"[(\"]?[A-Za-z][a-z'’-]*[.,;:!?)\"]?")


def _clean_rst(source: str) -> list[str]:
    """Prose paragraphs of a reStructuredText file: no directives, headings, tables, code or citations."""
    paragraphs, current, skip_indented = [], [], False
    for line in source.splitlines():
        stripped = line.strip()
        if skip_indented and (not stripped or line[:1].isspace()):
            continue
        skip_indented = False
        if not stripped:
            if current:
                paragraphs.append(" ".join(current))
            current = []
            continue
        if (stripped.startswith((".. ", ">>>", "|", "+-", "[")) or re.fullmatch(r"[=\-~^*#:+ ]+", stripped)
                or line[:1].isspace() and not current):
            continue
        if stripped.endswith("::"):
            skip_indented = True
            stripped = stripped[:-2].rstrip() + ("." if stripped[:-2].strip() else "")
        current.append(_MARKUP.sub("", _LINK.sub(r"\1", _ROLE.sub(r"\1", stripped))))
    if current:
        paragraphs.append(" ".join(current))
    return [p for p in paragraphs if len(p.split()) >= 12 and _prose_share(p) >= 0.75]


def _prose_share(paragraph: str) -> float:
    """Share of a paragraph's tokens that are words, not numbers, symbols or table cells."""
    tokens = paragraph.split()
    return sum(bool(_WORD.fullmatch(t)) for t in tokens) / len(tokens)


def general_text(path: str = "", words_per_passage: int = 60) -> list[str]:
    """Held-out general English passages for perplexity.

    ``path``: a UTF-8 text file whose passages are separated by blank lines. Empty: the dataset descriptions that
    ship inside scikit-learn (``sklearn/datasets/descr/*.rst``: medicine, housing, faces, news, wine ...), a
    dependency of fedbridge, so nothing is downloaded; markup is stripped and paragraphs are packed into
    passages of about ``words_per_passage`` words, in a fixed order.
    """
    if path:
        file = Path(path).expanduser()
        if not file.is_file():
            raise DataError(f"General-text file '{path}' does not exist. Give a UTF-8 text file with passages "
                            "separated by blank lines, or leave crosslm.general-text empty for the bundled text.")
        passages = [" ".join(p.split()) for p in file.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    else:
        import sklearn.datasets

        descr = Path(sklearn.datasets.__file__).parent / "descr"
        passages = []
        for rst in sorted(descr.glob("*.rst")):
            words: list[str] = []
            for paragraph in _clean_rst(rst.read_text(encoding="utf-8")):
                words += paragraph.split()
                if len(words) >= words_per_passage:
                    passages.append(" ".join(words))
                    words = []
            if len(words) >= words_per_passage // 2:
                passages.append(" ".join(words))
    if not passages:
        raise DataError(f"No general text found in {path or 'scikit-learn dataset descriptions'}.")
    return passages
