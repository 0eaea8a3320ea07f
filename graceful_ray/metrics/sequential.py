"""Anytime-valid confidence sequences for a rate (a Bernoulli mean).

A fixed-sample interval (Wilson, :mod:`graceful_ray.metrics.intervals`) is
valid at *one* sample size chosen in advance. A release gate is watched live and
retried as labels arrive; checking a fixed-sample interval again and again
inflates its error (a candidate whose true NFR equals a 2% budget, looked at
every 50 labels from 200 to 20,000, passes a 95% Wilson gate in about one run in
five: ``benchmarks/gate_sequential.py``). A *confidence sequence* is valid at
every sample size at once: ``P(exists n: p outside CS_n) <= alpha``, so an
operator may look after every label and cut over the first time the bound
clears the budget.

Construction (the method of mixtures with Ville's inequality; Robbins 1970,
"Statistical methods related to the law of the iterated logarithm", Ann. Math.
Statist. 41; Howard, Ramdas, McAuliffe & Sekhon 2021, "Time-uniform,
nonparametric, nonasymptotic confidence sequences", Ann. Statist. 49(2), Sec. 3,
whose conjugate beta-binomial mixture confseq implements as
``beta_binomial_mixture_bound``; confseq is not used here because PyPI has only
its source, which needs Boost to build). For the *upper* bound, test
``H0: p >= p0`` with the likelihood-ratio mixture

    M_n(p0) = E_{q ~ pi(p0)} [ (q / p0)^S ((1 - q) / (1 - p0))^(n - S) ],

where ``S`` of ``n`` observations are successes and the mixing law ``pi(p0)``
lives on ``[0, p0]``. Each factor ``q^X (1-q)^(1-X) / (p0^X (1-p0)^(1-X))``
has mean ``<= 1`` under any ``p >= p0`` when ``q <= p0``, so ``M_n(p0)`` is a
nonnegative supermartingale starting at 1, and by Ville's inequality
``P(exists n: M_n(p0) >= 1/alpha) <= alpha``. The upper bound is

    U_n = sup { p0 : M_n(p0) < 1/alpha },

valid time-uniformly at one-sided level ``alpha``. ``M_n(p0)`` increases in
``p0`` (see :func:`log_mixture_upper`), so the set of
rejected ``p0`` is ``(U_n, 1]`` and bisection finds ``U_n`` exactly.

The mixing law: ``q = p0 - min(p0, 1 - p0) w`` with ``w ~ Beta(rho * kappa,
(1 - rho) * kappa)``, discretised at ``K`` equal-mass quantiles: for a small
rate, alternatives a fraction of the tested rate (scale-free, so the same law
serves a 0.1% and a 10% budget), for a rate above a half the same on its
complement. It may depend on ``p0`` (each ``p0`` has its own test) but never on
the data. Any mixing law gives a valid test, so the discretisation changes
only how tight the bound is, never its validity. ``rho = 0.5`` puts the weight
on alternatives around half the tested rate (the usual design point: "half the
budget"), and ``kappa = 10`` spreads it enough that a rate at three quarters of
a budget still passes (``benchmarks/results/gate_sequential.md``).

The price of validity at every n: any level-alpha test that may stop at any
time needs about ``log(1/alpha) / KL(p || p0)`` observations (Wald), more than a
fixed-sample test that gets one look. At a 2% budget, true rate 1% and one-sided
alpha 2.5% that is about 1.5x the fixed-sample Wilson gate even for the ideal
test tuned to the true rate; this mixture needs about 1.7x (measured in the
benchmark).

The lower bound is the upper bound of the complementary rate:
``L_n = 1 - U_n(n - S)``. For a small rate its alternatives lie between the
tested rate and twice it, so with few successes it stays at or near 0: the
slice gate and the watch after cutover use it to *prove* a regression, where
erring low is the safe side. A two-sided ``confidence`` sequence spends
``(1 - confidence) / 2`` on each end, so the 95% sequence's upper end is valid
at one-sided 2.5%, the same level as the 95% Wilson interval's upper end.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.special import betaincinv

from graceful_ray.errors import MetricsError

#: The mixing law (see the module docstring): weight around rho x the tested rate.
MIXTURE_RHO = 0.5
MIXTURE_KAPPA = 10.0
MIXTURE_POINTS = 256
_BISECTION_STEPS = 50  # halves [p_hat, 1] to below 1e-15


def mixture_points(rho: float = MIXTURE_RHO, kappa: float = MIXTURE_KAPPA,
                   points: int = MIXTURE_POINTS) -> np.ndarray:
    """The ``w`` in ``q = p0 - min(p0, 1 - p0) w``: Beta(rho kappa, (1-rho) kappa) at
    equal-mass quantiles."""
    return _points(float(rho), float(kappa), int(points))


@lru_cache(maxsize=8)
def _points(rho: float, kappa: float, points: int) -> np.ndarray:
    if not 0 < rho < 1 or not kappa > 0 or points < 1:
        raise MetricsError(f"mixture needs 0 < rho < 1, kappa > 0, points >= 1; got "
                           f"rho={rho}, kappa={kappa}, points={points}")
    u = betaincinv(rho * kappa, (1 - rho) * kappa, (np.arange(points) + 0.5) / points)
    u.setflags(write=False)
    return u


def log_mixture_upper(successes, n, p0, w: np.ndarray | None = None) -> np.ndarray:
    """``log M_n(p0)`` for ``H0: p >= p0``, vectorised over ``successes`` and ``n``.

    The alternatives are ``q = p0 - d w`` with ``d = min(p0, 1 - p0)``: below a
    half, ``q = p0 (1 - w)``, a fraction of the tested rate; above a half the
    same on the complement, ``1 - q = (1 - p0)(1 + w)``. With ``F = n - S``,
    ``log LR = S log(q / p0) + F log((1 - q) / (1 - p0))``, which grows with
    ``p0`` on both halves, so the mixture ``M_n(p0)`` does too.
    ``p0 = 1``: one failure refutes ``p >= 1``.
    """
    w = mixture_points() if w is None else w
    s = np.asarray(successes, dtype=np.float64)[..., None]
    f = np.asarray(n, dtype=np.float64)[..., None] - s
    if p0 >= 1.0:
        return np.where(f[..., 0] > 0, np.inf, 0.0)
    if p0 <= 0.5:
        log_lr = s * np.log1p(-w) + f * np.log1p(p0 * w / (1.0 - p0))
    else:
        log_lr = s * np.log1p(-(1.0 - p0) * w / p0) + f * np.log1p(w)
    top = log_lr.max(axis=-1, keepdims=True)
    return (top + np.log(np.mean(np.exp(log_lr - top), axis=-1, keepdims=True)))[..., 0]


def rejects_above(successes, n, p0: float, alpha: float) -> np.ndarray:
    """True where the sequence's upper bound is already ``<= p0`` (H0: p >= p0 rejected).

    The same decision as ``upper_bound(s, n, alpha) <= p0``, without the
    bisection: the gate's question, asked of many streams at once.
    """
    return log_mixture_upper(successes, n, p0) >= math.log(1.0 / alpha)


def upper_bound(successes: int, n: int, alpha: float) -> float:
    """Anytime-valid one-sided upper bound: ``P(exists n: p > U_n) <= alpha``."""
    successes, n = _check(successes, n, alpha)
    return _upper(successes, n, float(alpha))


def lower_bound(successes: int, n: int, alpha: float) -> float:
    """Anytime-valid one-sided lower bound: ``P(exists n: p < L_n) <= alpha``."""
    successes, n = _check(successes, n, alpha)
    return 1.0 - _upper(n - successes, n, float(alpha))


def confidence_sequence(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided: ``(L_n, U_n)``, each end at ``(1 - confidence) / 2``, together
    covering the true rate at every n at once with probability ``>= confidence``.
    ``n == 0`` gives ``(0.0, 1.0)``."""
    if not 0.0 < confidence < 1.0:
        raise MetricsError(f"confidence must be in (0, 1), got {confidence}")
    side = (1.0 - confidence) / 2.0
    return lower_bound(successes, n, side), upper_bound(successes, n, side)


@lru_cache(maxsize=65536)
def _upper(successes: int, n: int, alpha: float) -> float:
    if n == 0 or successes == n:
        return 1.0
    threshold = math.log(1.0 / alpha)
    lo, hi = successes / n, 1.0  # M(p_hat) <= 1 < 1/alpha: never rejected at the MLE
    for _ in range(_BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if log_mixture_upper(successes, n, mid) >= threshold:
            hi = mid
        else:
            lo = mid
    return hi


def _check(successes: int, n: int, alpha: float) -> tuple[int, int]:
    for name, x in (("successes", successes), ("n", n)):
        if isinstance(x, bool) or not hasattr(x, "__index__") or int(x) < 0:
            raise MetricsError(f"{name} must be an integer count >= 0, got {x!r}")
    successes, n = int(successes), int(n)
    if successes > n:
        raise MetricsError(f"successes ({successes}) cannot exceed n ({n})")
    if not 0.0 < alpha < 1.0:
        raise MetricsError(f"alpha must be in (0, 1), got {alpha}")
    return successes, n
