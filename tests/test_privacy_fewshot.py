import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from fedbridge.errors import PrivacyBudgetExceeded
from fedbridge.models.loading import byte_tokenizer, tiny_llm
from fedbridge.privacy import (
    DPFewShotConfig,
    PrivacyLedger,
    aggregate_noise_std,
    compute_epsilon,
    dp_fewshot,
    dp_fewshot_synthesize,
    fewshot_events,
    noisy_argmax,
    noisy_average,
    sigma_for_epsilon,
)
from fedbridge.privacy.dp_fewshot import PackedPrompts, _draw_groups, _float32, _next_token_probs

LABELS = ["negative", "positive"]
TEXTS = [f"review {i} says the film was {'great' if i % 2 else 'dull'}" for i in range(24)]
LABEL_IDS = [i % 2 for i in range(24)]


pytestmark = pytest.mark.usefixtures("one_thread")


class CopyingLM(torch.nn.Module):
    """A stand-in LM that continues the longest earlier match (4+ tokens) of the prompt's suffix, an ideal
    induction head; with no such match it is uniform. Few-shot prompting it reproduces a demonstration."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask, **_):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        for row, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            ids = [t for t, m in zip(ids, mask) if m]
            best, target = 0, None
            for end in range(1, len(ids)):  # an earlier position whose preceding tokens match the suffix
                k = 0
                while k < end and ids[end - 1 - k] == ids[-1 - k]:
                    k += 1
                if k >= max(best, 4):
                    best, target = k, ids[end]
            if target is not None:
                logits[row, -1, target] = 50.0
        return SimpleNamespace(logits=logits)


def test_noise_std_is_sigma_sqrt2_over_m():
    generator = torch.Generator().manual_seed(0)
    for sigma, m in [(0.7, 5), (0.39, 10), (2.0, 1)]:
        probs = torch.full((m, 100_000), 1e-5)
        noise = noisy_average(probs, sigma, generator) - probs.double().mean(0)
        assert aggregate_noise_std(sigma, m) == pytest.approx(sigma * math.sqrt(2) / m)
        assert float(noise.std()) == pytest.approx(sigma * math.sqrt(2) / m, rel=0.01)
        assert abs(float(noise.mean())) < 4 * sigma * math.sqrt(2) / m / math.sqrt(100_000)


def test_noisy_argmax_flips_at_the_gaussian_rate():
    # two tokens whose averaged probabilities differ by 0.2; noise on each has std σ√2/M = √2/4, on the gap 0.5
    generator = torch.Generator().manual_seed(1)
    probs = torch.tensor([[0.6, 0.4]] * 4)
    flips = sum(noisy_argmax(probs, 1.0, generator) == 1 for _ in range(4000)) / 4000
    expected = 0.5 * math.erfc(0.2 / 0.5 / math.sqrt(2))  # P(N(0, 0.5²) > 0.2) ≈ 0.345
    assert flips == pytest.approx(expected, abs=0.03)
    assert noisy_argmax(torch.tensor([[0.1, 0.9], [0.6, 0.4]]), 0.0, generator) == 1  # σ = 0: argmax of the mean


def test_groups_are_disjoint_capped_and_poisson_sized():
    generator = torch.Generator().manual_seed(2)
    sizes = []
    for _ in range(300):
        groups = _draw_groups(100, 0.2, num_groups=4, per_group=50, rng=generator)
        members = [i for g in groups for i in g]
        assert len(members) == len(set(members)) and all(0 <= i < 100 for i in members)
        sizes.append(len(members))
    assert sum(sizes) / len(sizes) == pytest.approx(20, abs=1)  # q·|D|
    assert max(len(g) for g in _draw_groups(100, 1.0, 4, 3, generator)) == 3


def test_noiseless_aggregation_of_a_copying_lm_writes_the_private_example():
    tok = byte_tokenizer()
    cfg = DPFewShotConfig(num_groups=2, shots_per_group=1, sigma=0.0, max_tokens=60, public_top_k=0,
                          num_per_label=1, noise_seed=0, kv_cache=False)  # the stand-in LM keeps no KV cache
    result = dp_fewshot_synthesize(CopyingLM(len(tok)), tok, ["the secret code is 4821"], [1], LABELS, cfg,
                                   PrivacyLedger(math.inf, 1e-5))
    # one example, two groups: one group holds it, the other is empty, so the average still points at it
    assert ("the secret code is 4821", 1) in result.examples
    assert result.mechanism == "fewshot (non-private)" and result.epsilon == math.inf


def test_generates_on_tiny_llm_and_charges_the_worst_case_before_generating():
    model, tok = tiny_llm()
    cfg = DPFewShotConfig(num_groups=3, shots_per_group=2, sigma=1.0, max_tokens=6, public_top_k=20,
                          num_per_label=2, noise_seed=0)
    ledger = PrivacyLedger(100.0, 1e-5)
    result = dp_fewshot_synthesize(model, tok, TEXTS, LABEL_IDS, LABELS, cfg, ledger)
    assert result.examples and {y for _, y in result.examples} <= {0, 1}
    assert ledger.events == result.events and len(result.events) == len(LABELS)
    for event in result.events:  # per label: q = M·N/|D_y| = 6/12, num_per_label · T_max queries
        assert (event.noise_multiplier, event.sample_rate, event.steps) == (1.0, 0.5, 12)
    assert result.steps == 24 and 0 < result.tokens["generated"] <= result.steps
    assert set(result.tokens) == {"generated"} and result.local["private-prompt-tokens"] > 0
    assert result.epsilon == result.epsilon_total == ledger.spent() > 0


def test_refused_before_the_model_is_touched():
    ledger = PrivacyLedger(1.0, 1e-5)
    with pytest.raises(PrivacyBudgetExceeded, match="dp-fewshot"):
        dp_fewshot_synthesize(None, byte_tokenizer(), TEXTS, LABEL_IDS, LABELS, DPFewShotConfig(), ledger)
    assert ledger.events == ()


def test_sigma_for_epsilon_calibrates_the_charge_of_all_labels():
    cfg = DPFewShotConfig(num_groups=2, shots_per_group=2, max_tokens=20, num_per_label=2, sigma=0.0)
    sigma = sigma_for_epsilon(1.0, 1e-5, [0] * 5 + [1] * 8, 2, cfg)
    events = fewshot_events([5, 8], dataclasses.replace(cfg, sigma=sigma))
    assert [e.sample_rate for e in events] == [0.8, 0.5] and all(e.steps == 40 for e in events)
    assert 0.98 <= compute_epsilon(events, 1e-5) <= 1.0
    assert sigma_for_epsilon(math.inf, 1e-5, [0, 1], 2, cfg) == 0.0


@pytest.mark.parametrize("max_cached", [None, 2])
def test_packed_prompts_give_the_whole_prompts_distributions(max_cached):
    """The KV-cached prompts (each prefix once, then only new tokens, all asked prompts packed into one forward;
    cropped back between demonstrations) give the next-token distribution a full forward pass of prefix + written
    tokens gives; with a bound, the least recently asked caches are dropped and read again in full when asked."""
    model, tok = tiny_llm()
    bos, query = tok("")["input_ids"], tok("Label: a\nText:", add_special_tokens=False)["input_ids"]
    demos = [tok(f"Label: a\nText: {t}\n\n", add_special_tokens=False)["input_ids"] for t in TEXTS[:4]]
    prefixes = {-1: bos + query, **{i: bos + d + query for i, d in enumerate(demos)}}
    cached, out = PackedPrompts(model, dict(prefixes), max_cached=max_cached), []
    for step in range(8):
        keys = (-1, 0, 3, -1, 1 if step % 2 else 2)  # some prefixes skip steps: they catch up in the same pass
        packed = cached.probs([(key, out) for key in keys])
        assert cached.cached == (4 if max_cached else min(4 + step, 5))  # a bound keeps the call's 4 prompts only
        for key, probs in zip(keys, packed):
            full = _next_token_probs(model, [prefixes[key] + out], tok.pad_token_id)[0]
            assert torch.allclose(probs, full, atol=1e-6)
        out.append(40 + step)
        if step == 4:  # the next demonstration starts from the prefixes again
            cached.reset()
            out = []
    assert cached.peak_cached == (4 if max_cached else 5)


def test_a_donor_lends_its_template_tokens_to_prompts_not_yet_cached():
    """Every demonstration's prompt starts with the template the data-free prompt is (``BOS Label: a\nText:``): a
    prompt read for the first time starts from the data-free prompt's cache of those tokens, reads only the rest,
    and still gives the whole prompt's distribution."""
    model, tok = tiny_llm()
    bos, query = tok("")["input_ids"], tok("Label: a\nText:", add_special_tokens=False)["input_ids"]
    demos = [tok(f"Label: a\nText: {t}\n\n", add_special_tokens=False)["input_ids"] for t in TEXTS[:6]]
    prefixes = {-1: bos + query, **{i: bos + d + query for i, d in enumerate(demos)}}
    read = {}
    for lend in (False, True):
        packed = PackedPrompts(model, dict(prefixes), donors={i: -1 for i in range(6)} if lend else None)
        out = []
        for step in range(6):
            keys = (-1, step, (step + 3) % 6)  # new prompts at every step, after the donor's first call
            for key, probs in zip(keys, packed.probs([(key, out) for key in keys])):
                full = _next_token_probs(model, [prefixes[key] + out], tok.pad_token_id)[0]
                assert torch.allclose(probs, full, atol=1e-6)
            out.append(40 + step)
        read[lend] = packed.tokens_read
    shared = len(prefixes[-1])  # the data-free prompt is the template every demonstration's prompt starts with
    assert read[False] - read[True] == 4 * shared  # prompts 1, 4, 2 and 5 are first read after the donor's first call


def test_kv_cached_synthesis_releases_exactly_what_the_uncached_one_does():
    """Same noise seed, same subsampling and noise draws: the same demonstrations and the same charge, with far
    fewer private prompt tokens read."""
    model, tok = tiny_llm()
    results = {}
    for kv in (True, False):
        cfg = DPFewShotConfig(num_groups=4, shots_per_group=1, sigma=0.5, max_tokens=16, public_top_k=20,
                              num_per_label=2, noise_seed=3, kv_cache=kv)
        results[kv] = dp_fewshot_synthesize(model, tok, TEXTS, LABEL_IDS, LABELS, cfg, PrivacyLedger(100.0, 1e-5))
    assert results[True].examples == results[False].examples and len(results[True].examples) == 4
    assert results[True].events == results[False].events and results[True].tokens == results[False].tokens
    assert results[True].local["private-prompt-tokens"] < results[False].local["private-prompt-tokens"] / 2


def test_kv_cache_is_bounded_by_the_prompts_in_flight_not_by_the_private_examples(monkeypatch):
    """Every private example is one prompt: unbounded, the caches of all those ever asked stay for the whole
    synthesis. Bounded, at most ``kv_cache_prompts`` (or one token's M + 1 per label) are held, and the release is
    the same as unbounded and as uncached: a dropped prompt is read again in full, which costs tokens only."""
    texts = [f"review {i} says the film was {'great' if i % 3 else 'dull'}" for i in range(200)]
    labels = [i % 2 for i in range(200)]
    made: list[PackedPrompts] = []

    class Recorded(PackedPrompts):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(dp_fewshot, "PackedPrompts", Recorded)
    model, tok = tiny_llm()
    results, peaks = {}, {}
    for name, kv, bound in [("in flight", True, 1), ("bounded", True, 16), ("unbounded", True, 10**9),
                            ("uncached", False, 0)]:
        cfg = DPFewShotConfig(num_groups=4, shots_per_group=1, sigma=0.5, max_tokens=12, public_top_k=20,
                              num_per_label=2, noise_seed=5, kv_cache=kv, kv_cache_prompts=bound)
        made.clear()
        results[name] = dp_fewshot_synthesize(model, tok, texts, labels, LABELS, cfg, PrivacyLedger(100.0, 1e-5))
        peaks[name] = made[0].peak_cached if made else None
    in_flight = len(LABELS) * (4 + 1)  # one token's prompts: the data-free one and M groups, per label
    assert peaks["in flight"] <= in_flight and peaks["bounded"] <= 16
    assert peaks["unbounded"] > 4 * in_flight  # what the bound saves: it grows with the private examples asked
    assert len(results["uncached"].examples) == 4
    for name in ("in flight", "bounded", "unbounded"):
        assert results[name].examples == results["uncached"].examples
        assert results[name].tokens == results["uncached"].tokens
    read = {name: r.local["private-prompt-tokens"] for name, r in results.items()}
    assert read["unbounded"] <= read["bounded"] <= read["in flight"] < read["uncached"]


def test_a_lower_precision_model_runs_as_a_float32_copy():
    """bfloat16 rounds a packed row differently from a lone one, by a fraction of the sensitivity: the mechanism
    runs a float32 copy of a lower-precision model, and leaves the (shared) model as it was."""
    model, tok = tiny_llm()
    low = model.to(torch.bfloat16)
    assert _float32(low) is not low and _float32(low).dtype == torch.float32 and low.dtype == torch.bfloat16
    wide = tiny_llm()[0].to(torch.bfloat16).float()  # the same bfloat16 weights, widened
    assert _float32(wide) is wide
    cfg = DPFewShotConfig(num_groups=3, shots_per_group=1, sigma=0.5, max_tokens=8, public_top_k=20,
                          num_per_label=1, noise_seed=4)
    released = [dp_fewshot_synthesize(m, tok, TEXTS, LABEL_IDS, LABELS, cfg, PrivacyLedger(100.0, 1e-5)).examples
                for m in (low, wide)]
    assert released[0] == released[1] and low.dtype == torch.bfloat16
