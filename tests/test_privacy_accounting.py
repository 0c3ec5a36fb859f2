import json
import math

import pytest
from opacus.accountants import PRVAccountant

from fedbridge.errors import ConfigError, PrivacyBudgetExceeded
from fedbridge.privacy import PrivacyEvent, PrivacyLedger, compute_epsilon, noise_for_epsilon
from fedbridge.privacy.accounting import prv_epsilon, rdp_epsilon

DELTA = 1e-5
SETTINGS = [(1.0, 0.01, 1000), (0.83, 0.2, 10), (2.0, 0.05, 500), (5.0, 1.0, 1), (1.1, 1.0, 10)]


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """Poisson-subsampled Gaussian RDP at integer orders in closed form (Mironov, Talwar, Zhang 2019, §3.3):
    A_α = Σ_k C(α,k) (1-q)^(α-k) q^k exp((k²-k)/(2σ²)), RDP = log A_α / (α-1); then the conversion of
    Balle et al. 2020, Thm. 21. Written from the papers, sharing no code with Opacus."""
    best = math.inf
    for a in range(2, 257):
        if q == 1:
            log_a = a * (a - 1) / (2 * sigma**2)
        else:
            terms = [math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) + (a - k) * math.log1p(-q)
                     + k * math.log(q) + (k * k - k) / (2 * sigma**2) for k in range(a + 1)]
            top = max(terms)
            log_a = top + math.log(sum(math.exp(t - top) for t in terms))
        rdp = steps * log_a / (a - 1)
        best = min(best, rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a))
    return best


@pytest.mark.parametrize("sigma,q,steps", SETTINGS)
def test_epsilon_matches_closed_form_rdp(sigma, q, steps):
    eps = rdp_epsilon([PrivacyEvent(sigma, q, steps, "x")], DELTA)
    reference = independent_epsilon(sigma, q, steps, DELTA)
    # the ledger also tries fractional orders, so it may be a little tighter, never looser
    assert 0.95 * reference <= eps <= reference * (1 + 1e-9)


@pytest.mark.parametrize("sigma,q,steps", SETTINGS[:3])
def test_epsilon_is_an_upper_bound_close_to_prv(sigma, q, steps):
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    eps_prv = prv.get_epsilon(DELTA)  # numerical privacy-loss composition: near exact, below RDP
    eps = rdp_epsilon([PrivacyEvent(sigma, q, steps, "x")], DELTA)
    assert eps_prv <= eps <= 1.3 * eps_prv


def test_events_compose_in_rdp_not_by_adding_epsilons():
    a, b = PrivacyEvent(1.0, 0.01, 1000, "a"), PrivacyEvent(2.0, 0.05, 500, "b")
    both = compute_epsilon([a, b], DELTA)
    alone = [compute_epsilon([e], DELTA) for e in (a, b)]
    assert max(alone) < both < sum(alone)
    # same (σ, q): composing is the same as one event with the steps summed
    assert compute_epsilon([a, a], DELTA) == pytest.approx(compute_epsilon([PrivacyEvent(1.0, 0.01, 2000, "a")], DELTA))


@pytest.mark.parametrize("target,q,steps", [(3.0, 0.01, 3000), (8.0, 0.2, 10), (0.5, 0.5, 100)])
def test_noise_for_epsilon_reaches_target_from_below(target, q, steps):
    sigma = noise_for_epsilon(target, DELTA, q, steps)
    eps = compute_epsilon([PrivacyEvent(sigma, q, steps, "x")], DELTA)
    assert target - 0.02 <= eps <= target
    assert compute_epsilon([PrivacyEvent(sigma * 0.97, q, steps, "x")], DELTA) > eps
    assert noise_for_epsilon(math.inf, DELTA, q, steps) == 0.0


def test_charge_refuses_over_budget_and_records_nothing():
    ledger = PrivacyLedger(epsilon_budget=2.0, delta=DELTA)
    fits = PrivacyEvent(noise_for_epsilon(1.5, DELTA, 0.01, 1000), 0.01, 1000, "dp-sgd")
    assert ledger.epsilon_if(fits) == pytest.approx(1.5, abs=0.02)
    assert ledger.events == () and ledger.spent() == 0.0  # epsilon_if records nothing
    ledger.charge(fits)
    spent = ledger.spent()
    with pytest.raises(PrivacyBudgetExceeded, match=r"budget 2 .*spent 1\.4"):
        ledger.charge([fits, fits])
    assert ledger.events == (fits,) and ledger.spent() == spent
    assert ledger.remaining() == pytest.approx(2.0 - spent)


def test_non_private_events_need_an_infinite_budget():
    free = PrivacyEvent(0.0, 0.1, 30, "sgd (non-private)")
    with pytest.raises(PrivacyBudgetExceeded, match="epsilon_budget=inf"):
        PrivacyLedger(100.0, DELTA).charge(free)
    ledger = PrivacyLedger(math.inf, DELTA)
    ledger.charge(free)
    report = ledger.report()
    assert report["private"] is False and report["epsilon"] == math.inf and ledger.remaining() == math.inf
    assert report["mechanisms"] == ["sgd (non-private)"] and report["events"][0]["steps"] == 30


def test_checkpoint_round_trip_keeps_every_charge():
    ledger = PrivacyLedger(4.0, DELTA)
    ledger.charge([PrivacyEvent(1.0, 0.01, 1000, "dp-sgd"), PrivacyEvent(2.0, 0.05, 100, "dp-fewshot")])
    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored.events == ledger.events
    assert restored.spent() == ledger.spent() > 0
    assert restored.report() == ledger.report()
    big = PrivacyEvent(1.0, 0.01, 4000, "dp-sgd")
    with pytest.raises(PrivacyBudgetExceeded):
        restored.charge(big)  # would fit a fresh ledger: the restored one remembers its spending
    PrivacyLedger(4.0, DELTA).charge(big)
    with pytest.raises(ConfigError, match="version"):
        PrivacyLedger.from_dict({**ledger.to_dict(), "version": 99})


@pytest.mark.parametrize("kwargs", [dict(noise_multiplier=-1.0), dict(sample_rate=0.0), dict(sample_rate=1.5),
                                    dict(steps=-1), dict(steps=2.5)])
def test_invalid_events_and_ledgers_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        PrivacyEvent(**{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "mechanism": "x", **kwargs})
    with pytest.raises(ConfigError):
        PrivacyLedger(0.0, DELTA)
    with pytest.raises(ConfigError):
        PrivacyLedger(1.0, 1.0)


# ---------------------------------------------------------------- PRV, and the smaller of the two bounds


def exact_gaussian_epsilon(sigma: float, steps: int, delta: float) -> float:
    """``steps`` Gaussian mechanisms (sensitivity 1, no subsampling) compose to one with μ = √steps / σ, whose exact
    privacy profile is δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Balle & Wang 2018): solved for ε."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    mu = math.sqrt(steps) / sigma
    return brentq(lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta, 0, 500)


def composed_privacy_loss_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """The Poisson-subsampled Gaussian's privacy loss L = log(P/Q) (P = (1−q)N(0,σ²) + qN(1,σ²), Q = N(0,σ²), both
    orders), its density on a grid composed ``steps`` times by FFT, and δ(ε) = E[(1 − e^(ε−L))+] solved for ε.
    Written from the definitions (Koskela et al. 2020), sharing no code with Opacus."""
    import numpy as np
    from scipy.optimize import brentq
    from scipy.stats import norm

    x = np.linspace(-12 * sigma - 2, 12 * sigma + 3, 200_001)
    dx, null = x[1] - x[0], norm.pdf(x, 0, sigma)
    mixed = (1 - q) * null + q * norm.pdf(x, 1, sigma)
    worst, size = 0.0, 2 ** 20
    for a, b in ((mixed, null), (null, mixed)):
        loss = np.log(a / b)
        width = ((loss.max() - loss.min()) * steps + 2) / size
        density = np.zeros(size)
        np.add.at(density, np.clip(((loss - loss.min()) / width).astype(int), 0, size - 1), a * dx)
        composed = np.clip(np.fft.irfft(np.fft.rfft(density) ** steps, n=size), 0, None)
        values = loss.min() * steps + np.arange(size) * width
        worst = max(worst, brentq(lambda e: float(np.sum(composed * np.clip(1 - np.exp(e - values), 0, None)))
                                  - delta, 0, 60))
    return worst


@pytest.mark.parametrize("sigma,steps", [(2.0, 1), (5.0, 10), (1.1, 10)])
def test_prv_bounds_the_exact_epsilon_of_composed_gaussians_tightly(sigma, steps):
    exact = exact_gaussian_epsilon(sigma, steps, DELTA)
    assert exact <= prv_epsilon([PrivacyEvent(sigma, 1.0, steps, "x")], DELTA) <= exact + 0.02  # its error bound
    assert rdp_epsilon([PrivacyEvent(sigma, 1.0, steps, "x")], DELTA) > exact


@pytest.mark.parametrize("sigma,q,steps", [(0.8135, 1 / 20, 20), (1.0, 0.05, 200)])
def test_prv_bounds_an_independent_subsampled_composition(sigma, q, steps):
    independent = composed_privacy_loss_epsilon(sigma, q, steps, DELTA)
    prv = prv_epsilon([PrivacyEvent(sigma, q, steps, "x")], DELTA)
    assert independent - 0.02 <= prv <= independent + 0.3
    assert prv < rdp_epsilon([PrivacyEvent(sigma, q, steps, "x")], DELTA)


def test_the_ledger_reports_the_smaller_bound_and_both():
    """The issue's DP-SGD example: q = 1/20, 20 steps, σ = 0.8135 costs 3.99 in RDP and 3.26 by PRV."""
    event = PrivacyEvent(0.8135, 1 / 20, 20, "dp-sgd")
    assert rdp_epsilon([event], DELTA) == pytest.approx(3.99, abs=0.01)
    assert prv_epsilon([event], DELTA) == pytest.approx(3.26, abs=0.01)
    assert compute_epsilon([event], DELTA) == prv_epsilon([event], DELTA)
    ledger = PrivacyLedger(4.0, DELTA)
    ledger.charge(event)  # fits under PRV: RDP alone would have refused nothing here either, but says 3.99
    report = ledger.report()
    assert report["epsilon"] == pytest.approx(3.26, abs=0.01) and report["epsilon_rdp"] == pytest.approx(3.99, abs=0.01)
    assert report["accountant"] == "min(rdp, prv upper bound)"
    # where ε is far above any budget, PRV is not computed (its domain explodes): RDP's bound stands
    assert compute_epsilon([PrivacyEvent(0.1, 0.5, 96, "x")], DELTA) == rdp_epsilon([PrivacyEvent(0.1, 0.5, 96, "x")],
                                                                                    DELTA)
