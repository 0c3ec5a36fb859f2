"""One privacy ledger per silo: every release of private data is charged here, all releases composed together.

Each mechanism in ``fedbridge.privacy`` (DP-SGD, DP few-shot generation) is a Poisson-subsampled Gaussian
mechanism run for some number of steps. The ledger records those compositions and computes the spent ε by
composing *all* of them at once, two ways, and takes the smaller (both are valid upper bounds):
  - Rényi DP (Mironov 2017; Mironov, Talwar, Zhang 2019), converted to (ε, δ)-DP with the conversion of Balle et
    al. 2020 (the one Opacus uses): ``rdp_epsilon``;
  - numerical composition of privacy loss random variables (Gopi et al. 2021, Opacus's ``PRVAccountant``), its
    upper bound, which includes the discretisation error: ``prv_epsilon``. Tighter for many compositions (DP-SGD,
    q = 1/20, 20 steps, σ = 0.8135: RDP 3.99, PRV 3.26), so the same ε buys less noise.
A mechanism charges *before* it touches the data, so a request over budget is refused with nothing spent and
nothing released.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.rdp import RDPAccountant

from fedbridge.errors import ConfigError, PrivacyBudgetExceeded

# Opacus's default orders (1.1 .. 63) plus larger ones, which tighten small ε (the optimal order grows as ε shrinks).
RDP_ORDERS: tuple[float, ...] = (*RDPAccountant.DEFAULT_ALPHAS, 64, 80, 96, 128, 192, 256, 512)
_STATE_VERSION = 1
ACCOUNTANT = "min(rdp, prv upper bound)"
_MAX_NOISE = 1e6


@dataclass(frozen=True)
class PrivacyEvent:
    """``steps`` compositions of a Gaussian mechanism with noise multiplier σ on a Poisson subsample of rate q.

    σ is the noise std divided by the L2 sensitivity. σ = 0 is a non-private release (ε = ∞).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    mechanism: str

    def __post_init__(self) -> None:
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"{self.mechanism}: noise multiplier must be finite and >= 0, "
                              f"got {self.noise_multiplier}")
        if not 0 < self.sample_rate <= 1:
            raise ConfigError(f"{self.mechanism}: sample rate must be in (0, 1], got {self.sample_rate}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"{self.mechanism}: steps must be an integer >= 0, got {self.steps!r}")

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0 or self.steps == 0


@functools.lru_cache(maxsize=1 << 16)
def _rdp_per_step(noise_multiplier: float, sample_rate: float, order: float) -> float:
    """RDP of one step at one order: composition is linear in steps, and this is the slow part."""
    return float(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                                          orders=[order])[0])


def _conversion_term(order: float, delta: float) -> float:
    """RDP at ``order`` plus this is ε at ``delta`` (Balle et al. 2020, Thm. 21; as in Opacus)."""
    return -(math.log(delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order)


def compute_epsilon(events: Iterable[PrivacyEvent], delta: float) -> float:
    """ε at ``delta`` of all ``events`` composed together: the smaller of the RDP and the PRV upper bound; 0 for
    none, ∞ if any is non-private."""
    events = tuple(events)
    rdp = rdp_epsilon(events, delta)
    return rdp if rdp > PRV_MAX_RDP_EPSILON else min(rdp, prv_epsilon(events, delta))


PRV_EPS_ERROR = 0.01  # PRV's discretisation error budget in ε; its upper bound includes it
# where RDP's ε is above this, no budget is near and PRV's domain grows huge (minutes, or out of memory, at σ ≈ 0.1):
# the RDP bound stands alone
PRV_MAX_RDP_EPSILON = 30.0
PRV_MAX_STEPS = 100_000


def prv_epsilon(events: Iterable[PrivacyEvent], delta: float) -> float:
    """ε at ``delta`` of all ``events`` by PRV composition (Opacus ``PRVAccountant``): its upper bound, the estimate
    plus the error bound, so a valid guarantee; ∞ where the PRV cannot be computed (the RDP bound then stands)."""
    composed: dict[tuple[float, float], int] = {}
    for e in events:
        if e.steps > 0:
            composed[(e.noise_multiplier, e.sample_rate)] = composed.get((e.noise_multiplier, e.sample_rate), 0) + e.steps
    if not composed:
        return 0.0
    if any(sigma == 0 for sigma, _ in composed):
        return math.inf
    if sum(composed.values()) > PRV_MAX_STEPS:  # its mesh shrinks with √steps: beyond this, gigabytes
        return math.inf
    return _prv_epsilon(tuple(sorted((s, q, n) for (s, q), n in composed.items())), delta)


@functools.lru_cache(maxsize=4096)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    accountant = PRVAccountant()
    accountant.history = list(history)
    try:
        with np.errstate(divide="ignore"):  # q = 1 (no subsampling): Opacus takes log(1 - q) = -inf, harmlessly
            return float(accountant.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
    except (ValueError, ArithmeticError, RuntimeError, MemoryError):  # extreme σ or q: the domain does not fit
        return math.inf


def rdp_epsilon(events: Iterable[PrivacyEvent], delta: float) -> float:
    """ε at ``delta`` of all ``events`` composed together in RDP; 0 for none, ∞ if any is non-private."""
    events = [e for e in events if e.steps > 0]
    if not events:
        return 0.0
    if not all(e.private for e in events):
        return math.inf

    def epsilon_at(order: float) -> float:
        rdp = sum(e.steps * _rdp_per_step(e.noise_multiplier, e.sample_rate, order) for e in events)
        return rdp + _conversion_term(order, delta)

    best = min(epsilon_at(a) for a in RDP_ORDERS if float(a).is_integer())
    # RDP >= 0, so a fractional order whose conversion term alone is above the best cannot win: skipping
    # it changes nothing and saves its slow series (seconds at large noise).
    return min([best, *(epsilon_at(a) for a in RDP_ORDERS
                        if not float(a).is_integer() and _conversion_term(a, delta) < best)])


def calibrate_noise(target_epsilon: float, delta: float,
                    events_for: Callable[[float], Iterable[PrivacyEvent]], tolerance: float = 0.01) -> float:
    """Smallest noise multiplier σ (to ``tolerance`` in ε) with ``compute_epsilon(events_for(σ))`` <= target.

    A binary search on ``compute_epsilon`` itself, so charging the result against a budget of
    ``target_epsilon`` never fails on rounding. ``target_epsilon = inf`` gives 0 (no noise: non-private).
    """
    if math.isinf(target_epsilon):
        return 0.0
    if not target_epsilon > 0:
        raise ConfigError(f"target epsilon must be > 0 (or inf for non-private), got {target_epsilon}")

    def epsilon(sigma: float) -> float:
        return compute_epsilon(events_for(sigma), delta)

    low, high = 0.0, 1.0
    while epsilon(high) > target_epsilon:
        low, high = high, 2 * high
        if high > _MAX_NOISE:
            raise ConfigError(f"epsilon={target_epsilon} is out of reach (noise multiplier > {_MAX_NOISE:g}). "
                              "Raise epsilon, or use fewer steps or a lower sample rate.")
    while target_epsilon - epsilon(high) > tolerance and high - low > 1e-6 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if epsilon(mid) > target_epsilon else (low, mid)
    return high


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The noise multiplier for ``steps`` compositions at sample rate q to cost ``target_epsilon`` (to 0.01)."""
    return calibrate_noise(target_epsilon, delta, lambda sigma: [PrivacyEvent(sigma, sample_rate, steps, "search")])


def _as_events(events: PrivacyEvent | Iterable[PrivacyEvent]) -> tuple[PrivacyEvent, ...]:
    return (events,) if isinstance(events, PrivacyEvent) else tuple(events)


class PrivacyLedger:
    """A silo's privacy state: its (ε, δ) budget and every composition charged against it.

    ``epsilon_budget = inf`` marks a non-private silo: it accepts non-private events (σ = 0), and its
    report says ``private: False``. A finite budget refuses them. The ledger only grows; ``to_dict`` /
    ``from_dict`` carry the whole history so a restored server keeps every past charge.
    """

    def __init__(self, epsilon_budget: float, delta: float) -> None:
        if not (epsilon_budget > 0):
            raise ConfigError(f"epsilon budget must be > 0 (inf = non-private), got {epsilon_budget}")
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        self.epsilon_budget = float(epsilon_budget)
        self.delta = float(delta)
        self._events: list[PrivacyEvent] = []

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon_budget)

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        return tuple(self._events)

    def epsilon_if(self, events: PrivacyEvent | Iterable[PrivacyEvent]) -> float:
        """ε spent after also charging ``events``; records nothing."""
        return compute_epsilon([*self._events, *_as_events(events)], self.delta)

    def charge(self, events: PrivacyEvent | Iterable[PrivacyEvent]) -> float:
        """Record ``events`` and return the new spent ε, or raise and record nothing if over budget."""
        events = _as_events(events)
        after = self.epsilon_if(events)
        if after > self.epsilon_budget:
            names = ", ".join(sorted({e.mechanism for e in events}))
            hint = (" Non-private events need epsilon_budget=inf." if not all(e.private for e in events)
                    else " Lower the mechanism's epsilon, or run fewer steps.")
            raise PrivacyBudgetExceeded(
                f"Refused {names}: epsilon would reach {after:.4g} > budget {self.epsilon_budget:.4g} "
                f"(spent {self.spent():.4g}, this request alone {compute_epsilon(events, self.delta):.4g}, "
                f"delta={self.delta:g}).{hint}")
        self._events.extend(events)
        return after

    def spent(self) -> float:
        return compute_epsilon(self._events, self.delta)

    def remaining(self) -> float:
        """Budget minus spent ε; ∞ for a non-private ledger."""
        return math.inf if not self.private else self.epsilon_budget - self.spent()

    def report(self) -> dict[str, Any]:
        """What the run record shows: the guarantee, the budget and every charge."""
        return {"private": self.private, "accountant": ACCOUNTANT, "epsilon": self.spent(), "delta": self.delta,
                "epsilon_rdp": rdp_epsilon(self._events, self.delta), "epsilon_prv": prv_epsilon(self._events, self.delta),
                "epsilon_budget": self.epsilon_budget,
                "mechanisms": sorted({e.mechanism for e in self._events}),
                "events": [asdict(e) for e in self._events]}

    def to_dict(self) -> dict[str, Any]:
        """The full state, JSON-serialisable (a Flower ConfigRecord can hold it as one JSON string)."""
        return {"version": _STATE_VERSION, "epsilon_budget": self.epsilon_budget, "delta": self.delta,
                "events": [asdict(e) for e in self._events]}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"privacy ledger state version {state.get('version')!r}, expected {_STATE_VERSION}")
        ledger = cls(state["epsilon_budget"], state["delta"])
        ledger._events = [PrivacyEvent(**e) for e in state["events"]]
        return ledger

    def __repr__(self) -> str:
        return (f"PrivacyLedger(spent={self.spent():.4g}, budget={self.epsilon_budget:g}, delta={self.delta:g}, "
                f"events={len(self._events)})")

