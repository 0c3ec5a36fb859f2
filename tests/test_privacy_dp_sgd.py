import math

import pytest
import torch
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from fedbridge.errors import PrivacyBudgetExceeded
from fedbridge.models.generation import SamplingConfig
from fedbridge.models.loading import tiny_llm
from fedbridge.privacy import DPSGDConfig, PrivacyLedger, compute_epsilon, dp_sgd_synthesize, dp_sgd_train
from fedbridge.privacy.dp_sgd import per_example_loss

LABELS = ["negative", "positive"]
TEXTS = [f"review {i}: the film was {'great fun and I loved' if i % 2 else 'dull and I hated'} it" for i in range(40)]
LABEL_IDS = [i % 2 for i in range(40)]
# 40 texts, expected batch 8: q = 1/5, 5 Poisson batches an epoch
CFG = DPSGDConfig(target_epsilon=4.0, epochs=2, batch_size=8, lr=1e-2, max_length=48, noise_seed=0, num_per_label=3,
                  min_words=0, sampling=SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def spies(monkeypatch):
    """Count the batches Opacus's Poisson sampler yields and the noisy optimizer steps that run."""
    counts = {"poisson_batches": 0, "dp_steps": 0}
    sampler_iter, dp_step = UniformWithReplacementSampler.__iter__, DPOptimizer.step

    def counting_iter(self):
        for batch in sampler_iter(self):
            counts["poisson_batches"] += 1
            yield batch

    def counting_step(self, *args, **kwargs):
        counts["dp_steps"] += 1
        return dp_step(self, *args, **kwargs)

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", counting_iter)
    monkeypatch.setattr(DPOptimizer, "step", counting_step)
    return counts


def test_trains_on_the_poisson_loader_and_charges_exactly_what_ran(spies):
    model, tok = tiny_llm()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ledger = PrivacyLedger(5.0, 1e-5)
    generator, report = dp_sgd_train(model, tok, TEXTS, LABEL_IDS, LABELS, CFG, ledger, seed=0)

    event = report.event
    assert ledger.events == (event,)
    assert (event.sample_rate, event.steps, event.mechanism) == (0.2, 10, "dp-sgd")
    assert spies["poisson_batches"] == spies["dp_steps"] == len(report.batch_sizes) == event.steps
    assert len(set(report.batch_sizes)) > 1  # Poisson batches vary in size; a fixed loader would give 8s
    assert CFG.target_epsilon - 0.02 <= compute_epsilon([event], 1e-5) <= CFG.target_epsilon
    assert event.noise_multiplier > 1.0
    # the caller's model is untouched; the generator got the merged LoRA update, embeddings frozen
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    trained = generator.state_dict()
    assert not torch.equal(trained["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(trained["model.embed_tokens.weight"], original["model.embed_tokens.weight"])
    assert not any("lora" in k for k in trained)


def test_empty_poisson_batches_still_take_a_counted_noisy_step(spies):
    model, tok = tiny_llm()
    cfg = DPSGDConfig(target_epsilon=4.0, epochs=4, batch_size=1, max_length=32, noise_seed=1)
    _, report = dp_sgd_train(model, tok, TEXTS[:4], LABEL_IDS[:4], LABELS, cfg, PrivacyLedger(4.0, 1e-5))
    assert 0 in report.batch_sizes  # q = 1/4 over 4 examples: P(empty) = 0.32 a step
    assert spies["dp_steps"] == report.event.steps == len(report.batch_sizes) == 16


def test_refused_when_over_budget_and_nothing_runs(spies):
    model, tok = tiny_llm()
    ledger = PrivacyLedger(3.0, 1e-5)
    with pytest.raises(PrivacyBudgetExceeded, match="dp-sgd"):
        dp_sgd_train(model, tok, TEXTS, LABEL_IDS, LABELS, CFG, ledger)
    assert ledger.events == () and spies["dp_steps"] == 0


def test_non_private_training_is_labelled_and_needs_an_infinite_budget():
    model, tok = tiny_llm()
    cfg = DPSGDConfig(target_epsilon=math.inf, epochs=1, batch_size=8, max_length=32)
    with pytest.raises(PrivacyBudgetExceeded):
        dp_sgd_train(model, tok, TEXTS, LABEL_IDS, LABELS, cfg, PrivacyLedger(100.0, 1e-5))
    ledger = PrivacyLedger(math.inf, 1e-5)
    _, report = dp_sgd_train(model, tok, TEXTS, LABEL_IDS, LABELS, cfg, ledger)
    assert report.event.noise_multiplier == 0 and report.event.mechanism == "sgd (non-private)"
    assert report.batch_sizes == [8] * 5
    assert ledger.report()["private"] is False and ledger.spent() == math.inf


@torch.no_grad()
def test_per_example_loss_ignores_padding_and_other_examples():
    model, tok = tiny_llm()
    short, long = tok("a short one")["input_ids"], tok("a much longer example text")["input_ids"]
    pad = tok.pad_token_id
    ids = torch.tensor([short + [pad] * (len(long) - len(short)), long])
    mask = (torch.arange(ids.shape[1]) < torch.tensor([[len(short)], [len(long)]])).long()
    batch = per_example_loss(model(input_ids=ids, attention_mask=mask).logits, ids, mask)
    alone = per_example_loss(model(input_ids=ids[:1, :len(short)]).logits, ids[:1, :len(short)], mask[:1, :len(short)])
    assert batch[0] == pytest.approx(float(alone[0]), rel=1e-5)


def test_synthesize_returns_labelled_samples_and_the_charge():
    model, tok = tiny_llm()
    ledger = PrivacyLedger(5.0, 1e-5)
    result = dp_sgd_synthesize(model, tok, TEXTS, LABEL_IDS, LABELS, CFG, ledger, seed=0)
    assert 0 < len(result.examples) <= CFG.num_per_label * len(LABELS)
    assert {y for _, y in result.examples} <= {0, 1} and all(isinstance(t, str) for t, _ in result.examples)
    assert result.epsilon == result.epsilon_total == ledger.spent() <= CFG.target_epsilon
    assert result.steps == 10 and result.events == ledger.events
    assert result.tokens["generated"] > 0 and set(result.seconds) == {"train", "sample"}
    assert result.local["train-tokens"] > 0 and "local" not in result.summary()  # data-dependent: stays home


def test_an_empty_first_poisson_batch_is_a_noise_step_not_a_crash(spies, monkeypatch):
    """Opacus builds an empty first batch from dataset[0]'s shapes (a one-element list for 1-tuple items); before,
    unpacking it crashed the run after the budget was charged. Forced here: the sampler's first batch is empty."""
    inner = UniformWithReplacementSampler.__iter__  # the spies' counting iterator

    def empty_first(self):  # the first draw comes out empty; every other draw as Opacus makes it
        for step, batch in enumerate(inner(self)):
            yield [] if step == 0 else batch

    monkeypatch.setattr(UniformWithReplacementSampler, "__iter__", empty_first)
    model, tok = tiny_llm()
    cfg = DPSGDConfig(target_epsilon=4.0, epochs=1, batch_size=8, max_length=32, noise_seed=2)
    ledger = PrivacyLedger(4.0, 1e-5)
    _, report = dp_sgd_train(model, tok, TEXTS, LABEL_IDS, LABELS, cfg, ledger)
    assert report.batch_sizes[0] == 0 and len(report.batch_sizes) == spies["dp_steps"] == report.event.steps
    assert ledger.events == (report.event,)


@pytest.mark.parametrize("texts", [24, 40])
def test_a_public_size_bound_fixes_q_and_steps_whatever_the_private_count(spies, texts):
    """With size_bound, q = 1 / ceil(bound / batch) and steps = epochs / q: the same for 24 or 40 private texts, so
    neither the charged event nor the number of noisy steps tells the server how many there are."""
    model, tok = tiny_llm()
    cfg = DPSGDConfig(target_epsilon=4.0, epochs=2, batch_size=8, max_length=32, noise_seed=3, size_bound=64)
    _, report = dp_sgd_train(model, tok, TEXTS[:texts], LABEL_IDS[:texts], LABELS, cfg, PrivacyLedger(4.0, 1e-5))
    assert (report.event.sample_rate, report.event.steps) == (1 / 8, 16)
    assert spies["poisson_batches"] == spies["dp_steps"] == 16
