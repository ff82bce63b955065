"""Allocation: how to split a FLOP budget between parameters N and tokens D.

Pure functions over a law from ``flopwise.laws.law``. FLOPs are C = 6 N D in the law's
own parameter convention unless a function says it uses the exact count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from flopwise.errors import FlopwiseError
from flopwise.laws.law import Law, ParametricLaw

# Muennighoff et al. 2023, "Scaling Data-Constrained Language Models" (arXiv:2305.16264),
# fitted decay constants of repeated data and of excess parameters (their eq. 5 and 6).
R_D_STAR = 15.4
R_N_STAR = 5.3
EPOCHS_WARNING = 4.0  # their finding: up to ~4 epochs are almost as good as fresh data

MAX_FLOPS = 1e35


def check_flops(flops: float, what: str = "budget") -> float:
    """Validate a FLOP budget: finite, positive and not absurd."""
    try:
        flops = float(flops)
    except (TypeError, ValueError):
        raise FlopwiseError(f"{what} must be a number of FLOPs, got {flops!r}") from None
    if not math.isfinite(flops) or flops <= 0:
        raise FlopwiseError(f"{what} must be a positive finite number of FLOPs (e.g. 1e21), got {flops}")
    if flops > MAX_FLOPS:
        raise FlopwiseError(
            f"{what} of {flops:.3g} FLOPs is beyond {MAX_FLOPS:.0e}, far past any fitted law: check the exponent"
        )
    return flops


def require_parametric(law: Law, what: str) -> ParametricLaw:
    if not isinstance(law, ParametricLaw):
        raise FlopwiseError(
            f"{what} needs a loss prediction, and law {law.name} predicts allocation only: "
            "use --law chinchilla, epoch or a law file written by 'flopwise fit'"
        )
    return law


@dataclass(frozen=True)
class Allocation:
    """One point (N, D) with what it costs and what it is expected to reach."""

    n_params: float
    n_tokens: float
    flops: float
    loss: float | None

    @property
    def tokens_per_param(self) -> float:
        return self.n_tokens / self.n_params


def _loss(law: Law, n: float, d: float) -> float | None:
    return float(law.loss(n, d)) if isinstance(law, ParametricLaw) else None


def compute_optimal(law: Law, flops: float) -> Allocation:
    """The compute-optimal N and D under C = 6 N D (closed form), with the expected loss."""
    flops = check_flops(flops)
    n, d = law.optimal(flops)
    return Allocation(float(n), float(d), flops, _loss(law, n, d))


def size_tradeoff(law: Law, flops: float, factors: Sequence[float] = (0.1, 0.25, 0.5, 1, 2, 4, 10)) -> list[dict]:
    """Same budget, other model sizes: the "bigger is not better" table.

    Each row scales N_opt by a factor, gives it D = C / (6 N) and reports the loss and its
    excess over the optimum (None for allocation-only laws).
    """
    opt = compute_optimal(law, flops)
    rows = []
    for f in factors:
        n = opt.n_params * f
        d = flops / (6.0 * n)
        loss = _loss(law, n, d)
        rows.append({
            "factor": float(f), "n_params": n, "n_tokens": d, "tokens_per_param": d / n, "loss": loss,
            "loss_excess": None if loss is None else loss - opt.loss,
        })
    return rows


def effective_tokens(n_tokens, unique_tokens, r_d_star: float = R_D_STAR):
    """Muennighoff's D': repeated tokens are worth less, decaying with constant R_D*."""
    u = np.asarray(unique_tokens, dtype=float)
    d = np.asarray(n_tokens, dtype=float)
    repeats = np.maximum(d / u - 1.0, 0.0)
    return np.minimum(d, u) + u * r_d_star * (1.0 - np.exp(-repeats / r_d_star))


def r_d_star_of(law: Law) -> float:
    """The decay constant of repeated data a law plans with: its own where fitted, else Muennighoff's."""
    return getattr(law, "r_d_star", None) or R_D_STAR


def effective_params(law: ParametricLaw, n_params, unique_tokens, r_n_star: float = R_N_STAR):
    """Muennighoff's N': parameters beyond what the unique data can use decay with R_N*.

    U_N, the parameters for which the unique tokens are compute-optimal, comes from the law.
    """
    n = np.asarray(n_params, dtype=float)
    u_n = np.minimum(law.n_opt_for_tokens(unique_tokens), n)
    repeats = np.maximum(n / u_n - 1.0, 0.0)
    return u_n + u_n * r_n_star * (1.0 - np.exp(-repeats / r_n_star))


@dataclass(frozen=True)
class DataConstrained:
    n_params: float
    n_tokens: float
    flops: float
    loss: float
    epochs: float
    effective_tokens: float
    effective_params: float
    unconstrained: Allocation  # what the law would choose with unlimited data
    warnings: tuple[str, ...]


def data_constrained(law: Law, flops: float, unique_tokens: float,
                     r_d_star: float | None = None, r_n_star: float = R_N_STAR) -> DataConstrained:
    """Best N and D when only ``unique_tokens`` distinct tokens exist (Muennighoff et al. 2023).

    Minimises L(N', D') with D = C / (6 N) over N, where N' and D' discount repeated data
    and the parameters it cannot feed. ``r_d_star``: default the law's own (a data-constrained
    fit's), else Muennighoff's 15.4.
    """
    law = require_parametric(law, "data-constrained planning (--unique-tokens)")
    r_d_star = r_d_star_of(law) if r_d_star is None else r_d_star
    flops = check_flops(flops)
    if not (math.isfinite(unique_tokens) and unique_tokens >= 1):
        raise FlopwiseError(f"--unique-tokens must be a positive number of tokens, got {unique_tokens}")
    opt = compute_optimal(law, flops)

    def loss_at(log_n: float) -> float:
        n = math.exp(log_n)
        d = flops / (6.0 * n)
        return float(law.loss(effective_params(law, n, unique_tokens, r_n_star),
                              effective_tokens(d, unique_tokens, r_d_star)))

    centre = math.log(opt.n_params)
    res = minimize_scalar(loss_at, bounds=(centre - 12.0, centre + 6.0), method="bounded",
                          options={"xatol": 1e-10})
    n = math.exp(res.x)
    d = flops / (6.0 * n)
    epochs = d / unique_tokens
    warnings = []
    if epochs > EPOCHS_WARNING:
        warnings.append(
            f"the plan repeats the data {epochs:.1f} times (more than {EPOCHS_WARNING:g} epochs): repeated tokens "
            "are worth less; more unique data would lower the loss"
        )
    return DataConstrained(
        n_params=n, n_tokens=d, flops=flops, loss=float(res.fun), epochs=epochs,
        effective_tokens=float(effective_tokens(d, unique_tokens, r_d_star)),
        effective_params=float(effective_params(law, n, unique_tokens, r_n_star)),
        unconstrained=opt, warnings=tuple(warnings),
    )


@dataclass(frozen=True)
class InferenceAware:
    n_params: float
    n_tokens: float  # training tokens
    inference_tokens: float
    loss: float
    training_flops: float
    inference_flops: float
    compute_optimal: Allocation  # the model of the same loss that ignores inference

    @property
    def total_flops(self) -> float:
        return self.training_flops + self.inference_flops

    @property
    def compute_optimal_total_flops(self) -> float:
        return self.compute_optimal.flops + 2.0 * self.compute_optimal.n_params * self.inference_tokens


def _tokens_for_loss(law: ParametricLaw, n: float, loss: float) -> float:
    """The D at which ``n`` parameters reach ``loss`` (solving the law's data term B N^gamma / D^beta)."""
    r = loss - law.E - law.A / n**law.alpha
    return (law.B * n**law.gamma / r) ** (1.0 / law.beta)


def inference_aware(law: Law, flops: float, inference_tokens: float) -> InferenceAware:
    """Sardana & Frankle 2023 (arXiv:2401.00448): the model that reaches the loss of the
    compute-optimal model for ``flops`` at the lowest lifetime cost
    6 N D_train + 2 N D_inference.

    Solves the first-order condition in log N with Brent's method (exact to float precision),
    so ``inference_tokens = 0`` gives back the compute-optimal model.
    """
    law = require_parametric(law, "inference-aware planning (--inference-tokens)")
    opt = compute_optimal(law, flops)
    d_inf = float(inference_tokens)
    if not math.isfinite(d_inf) or d_inf < 0:
        raise FlopwiseError(f"--inference-tokens must be zero or a positive number of tokens, got {inference_tokens}")
    target = opt.loss

    def foc(log_n: float) -> float:
        # d(cost)/dN along the iso-loss curve, divided by 6 D: increasing in N, zero at the optimum.
        n = math.exp(log_n)
        r = target - law.E - law.A / n**law.alpha
        d = _tokens_for_loss(law, n, target)
        return 1.0 + d_inf / (3.0 * d) + (law.gamma - law.alpha * law.A * n**-law.alpha / r) / law.beta

    log_n_min = math.log((law.A / (target - law.E)) ** (1.0 / law.alpha))  # infinite data needed here
    lo, hi = log_n_min + 1e-9, math.log(opt.n_params) + 0.1
    while foc(lo) > 0:  # pragma: no cover - guards round-off at extreme budgets
        lo = log_n_min + (lo - log_n_min) / 10
    log_n = brentq(foc, lo, hi, xtol=1e-14, rtol=4 * np.finfo(float).eps, maxiter=500)
    n = math.exp(log_n)
    d = _tokens_for_loss(law, n, target)
    return InferenceAware(n_params=n, n_tokens=d, inference_tokens=d_inf, loss=target,
                          training_flops=6.0 * n * d, inference_flops=2.0 * n * d_inf, compute_optimal=opt)


def inference_aware_total(law: Law, total_flops: float, inference_tokens: float) -> Allocation:
    """The dual: the lowest loss for a lifetime budget 6 N D_train + 2 N D_inference = total.

    Returns the allocation with ``flops`` set to the training FLOPs.
    """
    law = require_parametric(law, "inference-aware planning")
    total_flops = check_flops(total_flops)
    d_inf = float(inference_tokens)
    if d_inf <= 0:
        return compute_optimal(law, total_flops)
    n_max = total_flops / (2.0 * d_inf)  # all the budget goes to serving

    def loss_at(log_n: float) -> float:
        n = math.exp(log_n)
        d = (total_flops - 2.0 * n * d_inf) / (6.0 * n)
        return float(law.loss(n, d)) if d > 0 else math.inf

    hi = math.log(n_max) - 1e-9
    res = minimize_scalar(loss_at, bounds=(hi - 30.0, hi), method="bounded", options={"xatol": 1e-10})
    n = math.exp(res.x)
    d = (total_flops - 2.0 * n * d_inf) / (6.0 * n)
    return Allocation(n, d, 6.0 * n * d, float(res.fun))


def exact_optimal(law: Law, flops: float, flops_per_token: Callable[[float], tuple[float, float]],
                  n_grid: int = 241) -> Allocation:
    """Numeric optimum under an exact FLOP count instead of 6 N D.

    ``flops_per_token(n)`` returns (actual N of the shape built for target n, training FLOPs per
    token of that shape). Shapes are discrete, so the loss is scanned on a log grid of two
    decades around the closed-form optimum and the best real shape is returned.
    """
    law = require_parametric(law, "exact-FLOP planning")
    flops = check_flops(flops)
    n0 = float(law.optimal(flops)[0])
    best = None
    for n_target in n0 * np.logspace(-1, 1, n_grid):
        n, fpt = flops_per_token(float(n_target))
        d = flops / fpt
        loss = float(law.loss(n, d))
        if best is None or loss < best.loss:
            best = Allocation(float(n), float(d), flops, loss)
    return best
