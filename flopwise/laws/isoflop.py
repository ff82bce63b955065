"""Chinchilla's Approaches 1 and 2: the lower envelope of loss curves, and IsoFLOP profiles with
power laws of their minima (bootstrap intervals by resampling runs within each budget). Pure numpy.
``flopwise.laws.fit`` runs them beside Approach 3."""

from __future__ import annotations

import math

import numpy as np

from flopwise.errors import FlopwiseError
from flopwise.laws.runs import Runs


def interval(samples: np.ndarray, level: float) -> dict[str, float]:
    lo, hi, s16, s84 = np.percentile(samples, [50 * (1 - level), 50 * (1 + level), 15.87, 84.13])
    # se: half the central 68% range (a normal's standard deviation), not the std, which a few runaway
    # resamples (a parameter at its bound) can blow up far beyond the interval shown beside it
    return {"lower": float(lo), "upper": float(hi), "level": level, "se": float((s84 - s16) / 2)}


# ---------------------------------------------------------------- Approach 2: IsoFLOP profiles


def _profile_minimum(x: np.ndarray, y: np.ndarray, degree: int) -> tuple[float | None, np.ndarray]:
    """Minimiser of a polynomial fit of y on x (None when the fit has no minimum), and the fit."""
    coef = np.polyfit(x, y, degree)
    if degree == 2:
        return (float(-coef[1] / (2 * coef[0])) if coef[0] > 0 else None), coef
    deriv = np.polyder(coef)
    roots = [r.real for r in np.roots(deriv) if abs(r.imag) < 1e-12 and np.polyval(np.polyder(deriv), r.real) > 0]
    if not roots:
        return None, coef
    return float(min(roots, key=lambda r: abs(r - np.mean(x)))), coef


def _group_optimum(n_params: np.ndarray, loss: np.ndarray, n_tokens: np.ndarray,
                   degree: int) -> tuple[float | None, float, np.ndarray]:
    """One IsoFLOP group: (log N at the profile's minimum or None, log D there, the profile's coefficients)."""
    x = np.log(n_params)
    x_min, coef = _profile_minimum(x, loss, degree)
    if x_min is None:
        return None, math.nan, coef
    d_slope, d_icpt = np.polyfit(x, np.log(n_tokens), 1)
    return x_min, float(d_icpt + d_slope * x_min), coef


# Approach 2's sampling check. A parabola fitted to a profile that is not one (a real IsoFLOP profile is
# asymmetric in log N) puts its minimum where the sizes' centre pulls it: sizes off-centre around the minimum, or
# spanning too little of it, bias each budget's N_opt and so the exponent a (Open-Athena's scaling-law-analysis
# measured the bias; Chinchilla sampled ~1.5 decades around each minimum).
OFF_CENTRE = 0.5  # warn when the minimum lies beyond half-way from the sizes' centre (log) to an end
NARROW_SPAN = 4.0  # warn when the largest size is less than this factor above the smallest


def sampling_check(log_sizes: np.ndarray, log_n_opt: float) -> dict:
    """Where a budget's minimum sits among its sizes: ``offset`` (-1 at the smallest size, 0 at their geometric
    centre, +1 at the largest), ``offset_decades`` (log10 of N_opt over the centre) and ``span`` (largest over
    smallest size)."""
    lo, hi = float(np.min(log_sizes)), float(np.max(log_sizes))
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    return {"offset": (log_n_opt - centre) / half if half > 0 else math.inf,
            "offset_decades": (log_n_opt - centre) / math.log(10), "span": math.exp(hi - lo)}


def sampling_warnings(c: float, check: dict) -> list[str]:
    out = []
    if abs(check["offset"]) > OFF_CENTRE:
        side = "largest" if check["offset"] > 0 else "smallest"
        out.append(f"budget {c:.3g}: the minimum sits off-centre among the sizes, toward the {side} "
                   f"({check['offset']:+.2f} of the way from their centre to that end, {check['offset_decades']:+.2f} "
                   "decades): a parabola's minimum is pulled toward the centre, biasing Approach 2's exponent; "
                   "re-centre that budget's sizes on its minimum")
    if check["span"] < NARROW_SPAN:
        out.append(f"budget {c:.3g}: the sizes span only {check['span']:.2g}x (under {NARROW_SPAN:g}x): the "
                   "profile's curvature, and so its minimum, is poorly determined; widen the sizes")
    return out


def _powerlaw(log_c: np.ndarray, log_y: np.ndarray) -> tuple[float, float]:
    slope, intercept = np.polyfit(log_c, log_y, 1)
    return float(slope), float(intercept)


def fit_isoflop(runs: Runs, degree: int = 2, n_boot: int = 1000, seed: int = 0, level: float = 0.9) -> dict:
    """Approach 2: per budget, the minimum of loss against log N; then N_opt ~ C^a, D_opt ~ C^b.

    Intervals come from resampling runs within each budget group and refitting everything.
    """
    if degree not in (2, 3):
        raise FlopwiseError(f"IsoFLOP profile degree must be 2 (parabola) or 3 (cubic), got {degree}")
    budgets = runs.budgets
    if len(budgets) < 2:
        raise FlopwiseError("Approach 2 needs runs at two or more FLOP budgets (IsoFLOP groups); these runs "
                            "have one: add budgets, or use --approach 3")
    warnings, groups = [], []
    for c in budgets:
        m = runs.budget == c
        x = np.log(runs.n_params[m])
        if len(x) < degree + 1 or np.ptp(x) < 1e-9:
            warnings.append(f"budget {c:.3g}: {len(x)} run(s) of {len(np.unique(x))} size(s) cannot "
                            f"define a degree-{degree} profile; skipped")
            continue
        if len(x) < 4:
            warnings.append(f"budget {c:.3g}: only {len(x)} runs; the profile's minimum is poorly determined")
        x_min, log_d_opt, coef = _group_optimum(runs.n_params[m], runs.loss[m], runs.n_tokens[m], degree)
        if x_min is None:
            warnings.append(f"budget {c:.3g}: the profile has no minimum (loss does not turn up at either end); "
                            "skipped: add smaller and larger models")
            continue
        bracketed = bool(x.min() <= x_min <= x.max())
        sampling = sampling_check(x, x_min)
        if bracketed:  # an unbracketed minimum has its own warning below
            warnings += sampling_warnings(c, sampling)
        if not bracketed:
            warnings.append(f"budget {c:.3g}: the minimum (N = {math.exp(x_min):.3g}) lies outside the runs' "
                            f"range [{math.exp(x.min()):.3g}, {math.exp(x.max()):.3g}]: extend the sweep there")
        groups.append({"flops": float(c), "n_runs": int(m.sum()), "n_opt": math.exp(x_min),
                       "d_opt": math.exp(log_d_opt), "bracketed": bracketed,
                       "loss_min": float(np.polyval(coef, x_min)), "coef": coef.tolist(), **sampling})
    if len(groups) < 2:
        raise FlopwiseError("Approach 2 found a usable minimum in fewer than two budgets: "
                            "add sizes on both sides of each budget's optimum")
    # Only bracketed minima are measurements; an extrapolated one can be off by orders of magnitude.
    fitted = [g for g in groups if g["bracketed"]]
    if len(fitted) >= 2:
        if len(fitted) < len(groups):
            warnings.append(f"Approach 2 fits the {len(fitted)} budgets whose minimum is bracketed and leaves out "
                            f"{len(groups) - len(fitted)}")
    else:
        fitted = groups
        warnings.append("fewer than two budgets have a bracketed minimum: Approach 2's exponents are unreliable")
    for g in groups:
        g["used"] = g in fitted
    log_c = np.log([g["flops"] for g in fitted])
    a, a_icpt = _powerlaw(log_c, np.log([g["n_opt"] for g in fitted]))
    b, b_icpt = _powerlaw(log_c, np.log([g["d_opt"] for g in fitted]))
    if not (abs(a) < 10 and abs(b) < 10 and abs(a_icpt) < 700 and abs(b_icpt) < 700):
        raise FlopwiseError(f"the IsoFLOP minima give a degenerate power law (N_opt ~ C^{a:.3g}): the minima are "
                            "not bracketed; sweep sizes on both sides of each budget's optimum")

    rng = np.random.default_rng(seed)
    samples = []
    usable = [runs.budget == g["flops"] for g in fitted]
    for _ in range(n_boot):
        pts = []
        for m in usable:
            idx = rng.choice(np.flatnonzero(m), size=int(m.sum()), replace=True)
            if np.unique(runs.n_params[idx]).size <= degree:
                continue
            x_min, log_d_opt, _ = _group_optimum(runs.n_params[idx], runs.loss[idx], runs.n_tokens[idx], degree)
            if x_min is not None:
                pts.append((math.log(runs.budget[idx[0]]), x_min, log_d_opt))
        if len(pts) >= 2:
            p = np.array(pts)
            samples.append((*np.polyfit(p[:, 0], p[:, 1], 1), *np.polyfit(p[:, 0], p[:, 2], 1)))
    out = {"degree": degree, "groups": groups, "a": a, "b": b, "n_coef": math.exp(a_icpt),
           "d_coef": math.exp(b_icpt), "warnings": warnings, "n_boot": len(samples)}
    if len(samples) >= 10:
        s = np.array(samples)
        out["intervals"] = {"a": interval(s[:, 0], level), "b": interval(s[:, 2], level)}
        out["_samples"] = s
    return out


def isoflop_optimal(result: dict, flops: float) -> tuple[float, float]:
    return result["n_coef"] * flops ** result["a"], result["d_coef"] * flops ** result["b"]


# ---------------------------------------------------------------- Approach 1: training-curve envelope


def fit_envelope(runs: Runs, n_points: int = 40) -> dict | None:
    """Approach 1: the lower envelope of loss against FLOPs over all loss curves, and the power
    laws of N and D along it. None when fewer than two runs have curves."""
    curves = {n: c for n, c in runs.curves.items() if n in runs.name}
    if len(curves) < 2:
        return None
    n_of = dict(zip(runs.name, runs.n_params, strict=True))
    lo = max(min(c["flops"][0] for c in curves.values()), 1.0)
    hi = max(c["flops"][-1] for c in curves.values())
    grid = np.geomspace(lo, hi, n_points)
    env = []
    for c in grid:
        best = None
        for name, cur in curves.items():
            if not (cur["flops"][0] <= c <= cur["flops"][-1]):
                continue
            loss = float(np.interp(np.log(c), np.log(cur["flops"]), cur["loss"]))
            if best is None or loss < best[0]:
                best = (loss, n_of[name], float(np.interp(np.log(c), np.log(cur["flops"]), cur["tokens"])))
        if best is not None:
            env.append((c, *best))
    env = np.array(env)
    if len(env) < 3 or np.unique(env[:, 2]).size < 2:
        return {"points": env.tolist(), "a": None, "b": None,
                "warnings": ["the envelope is made by fewer than two model sizes: Approach 1 cannot fit an exponent"]}
    a, a_icpt = _powerlaw(np.log(env[:, 0]), np.log(env[:, 2]))
    b, b_icpt = _powerlaw(np.log(env[:, 0]), np.log(env[:, 3]))
    return {"points": env.tolist(), "a": a, "b": b, "n_coef": math.exp(a_icpt), "d_coef": math.exp(b_icpt),
            "warnings": []}
