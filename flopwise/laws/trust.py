"""Can a fitted law be trusted? The checks that decide it, and a verdict from them. Pure python.

Each check is a dict ``{name, value, threshold, passed, severity, why}``. A failed ``critical``
check means the sweep cannot identify the law (planning from it would be planning from noise);
a failed ``caveat`` means the law is usable but less precise than it looks. The verdict:

* ``sound``: every check passed;
* ``usable with caveats``: only caveats failed;
* ``not informative``: a critical check failed.

Thresholds and why:

* ``min_steps`` (critical, >= MIN_STEPS optimizer steps in every run): a run of a few dozen steps
  has not left warm-up; its loss says more about the schedule than about its size.
* ``bounds`` (critical): a parameter on an optimiser bound, or a term negligible for every run, is
  not determined by the data.
* ``grid_edge`` (caveat): the best start lay on the edge of Chinchilla's start grid and the optimum
  beyond it (e.g. E above e^1 = 2.7 nats on a hard corpus): the optimiser converged there, but a
  better optimum further out was not searched for.
* ``exponent_a`` (critical, a in [0.2, 0.8]; b = 1 - a): every published law has a in
  [0.27, 0.73] (Kaplan 0.73, Chinchilla 0.46-0.50, DeepSeek 0.52); outside, the fit has found a
  degenerate direction, not a new regime.
* ``approach2_a`` (critical, the IsoFLOP minima's exponent in [0.2, 0.8]): two approaches that
  disagree in sign or wildly in size mean the sweep did not locate the minima.
* ``largest_bracketed`` (caveat): the largest budget's minimum lies inside its sizes; the plan
  extrapolates from there.
* ``a_interval`` (caveat, 90% bootstrap half-width of a at most 0.15): wider, and N_opt at 10x
  the sweep's compute is uncertain by more than a factor 1.4 either way.
* ``holdout_error`` (caveat, mean relative error at most 3% when the largest budget is held out
  and predicted): the extrapolation the plan relies on, tested.
* ``holdout_coverage`` (caveat, the predictive interval covers at least half the held-out runs).
* ``prediction_width`` (caveat, the autopilot's final prediction: 90% interval within ±10% of the
  predicted loss): wider, and the prediction says little, however sound the fit.
* ``smoothness`` (caveat, zig-zag of each IsoFLOP profile at most 0.01 nats RMS: its distance to
  the nearest profile that falls then rises): loss should move smoothly with size; zig-zags mean
  shapes or run lengths, not N, set the loss. (A parabola's residual is not used: over a wide
  window of sizes a sound profile is not a parabola in log N.)
"""

from __future__ import annotations

import math

import numpy as np

MIN_STEPS = 100
EXPONENT_RANGE = (0.2, 0.8)
A_HALF_WIDTH = 0.15
HOLDOUT_ERROR = 0.03
HOLDOUT_COVERAGE = 0.5
SMOOTHNESS_NATS = 0.01
PREDICTION_WIDTH = 0.10

SOUND, CAVEATS, NOT_INFORMATIVE = "sound", "usable with caveats", "not informative"


def _check(name: str, value, threshold: str, passed: bool, severity: str, why: str) -> dict:
    return {"name": name, "value": value, "threshold": threshold, "passed": bool(passed), "severity": severity,
            "why": why}


def _decreasing_fit(y: np.ndarray) -> np.ndarray:
    """The closest (least squares) non-increasing sequence to ``y``: pool adjacent violators."""
    blocks: list[list[float]] = []  # [mean, weight]
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return np.concatenate([np.full(int(w), m) for m, w in blocks])


def unimodal_residual(loss) -> float:
    """RMS distance (nats) from ``loss`` (ordered by size) to the closest sequence that falls, then rises.

    An IsoFLOP profile is unimodal; what is left over is zig-zag: sizes whose loss is set by something
    other than their size (a jump of shape or of run length)."""
    y = np.asarray(loss, float)
    best = math.inf
    for mode in range(len(y)):
        left = _decreasing_fit(y[: mode + 1])
        right = _decreasing_fit(y[mode:][::-1])[::-1]
        fit = np.concatenate([left, right[1:]])
        fit[mode] = min(left[-1], right[0]) if mode else right[0]
        best = min(best, float(np.sqrt(np.mean((fit - y) ** 2))))
    return best


def isoflop_smoothness(n_params, loss, budget) -> float | None:
    """The largest zig-zag (``unimodal_residual``, nats) of any budget's profile with 4+ sizes."""
    n_params, loss, budget = (np.asarray(x, float) for x in (n_params, loss, budget))
    worst = None
    for c in np.unique(budget):
        m = budget == c
        if np.unique(n_params[m]).size < 4:
            continue
        order = np.argsort(n_params[m], kind="stable")
        rough = unimodal_residual(loss[m][order])
        worst = rough if worst is None else max(worst, rough)
    return worst


def trust_checks(result: dict, runs, min_steps: int = MIN_STEPS) -> list[dict]:
    """The checks of a ``fit_runs`` result on ``runs`` (a laws.runs.Runs); each skipped when its input is missing."""
    out = []
    steps = getattr(runs, "steps", None)
    if steps is not None and len(steps) and np.all(np.isfinite(steps)):
        low = int(np.min(steps))
        out.append(_check("min_steps", low, f">= {min_steps}", low >= min_steps, "critical",
                          f"the shortest sweep run took {low} optimizer steps"))
    if "alpha" in result:
        fixed = set(result.get("fixed") or {})
        stuck = sorted(set(result.get("at_bounds", [])) - fixed)
        stuck += [f"{t} negligible" for t in result.get("negligible", [])]
        out.append(_check("bounds", stuck, "none", not stuck, "critical",
                          "parameters on an optimiser bound, or negligible terms: " + (", ".join(stuck) or "none")))
        edge = sorted(set(result.get("grid_edge", [])) - fixed)
        out.append(_check("grid_edge", edge, "none", not edge, "caveat",
                          "parameters whose best start lay on the start grid's edge and whose optimum beyond it: "
                          + (", ".join(edge) or "none")))
        a = float(result["a"])
        lo, hi = EXPONENT_RANGE
        out.append(_check("exponent_a", round(a, 4), f"in [{lo}, {hi}]", lo <= a <= hi, "critical",
                          f"Approach 3 gives N_opt ~ C^{a:.2f} and D_opt ~ C^{1 - a:.2f}"))
        iv = result.get("intervals", {}).get("a")
        if iv:
            half = (iv["upper"] - iv["lower"]) / 2
            out.append(_check("a_interval", round(half, 4), f"<= {A_HALF_WIDTH}", half <= A_HALF_WIDTH, "caveat",
                              f"the 90% bootstrap interval of a is [{iv['lower']:.2f}, {iv['upper']:.2f}]"))
    a2 = result.get("approach2")
    if a2 is not None:
        lo, hi = EXPONENT_RANGE
        out.append(_check("approach2_a", round(float(a2["a"]), 4), f"in [{lo}, {hi}]", lo <= a2["a"] <= hi,
                          "critical", f"the IsoFLOP minima give N_opt ~ C^{a2['a']:.2f}"))
        top = max(a2["groups"], key=lambda g: g["flops"])
        largest = float(np.max(runs.budget))
        ok = bool(top["bracketed"]) and math.isclose(top["flops"], largest, rel_tol=1e-6)
        out.append(_check("largest_bracketed", ok, "true", ok, "caveat",
                          f"the minimum at the largest budget ({largest:.3g} FLOPs) "
                          + ("lies inside its sizes" if ok else "is not bracketed by its sizes")))
    elif result.get("approach") in ("2", "all") and len(np.unique(runs.budget)) >= 2:
        out.append(_check("approach2_a", None, f"in {list(EXPONENT_RANGE)}", False, "critical",
                          "no IsoFLOP profile has a usable minimum"))
    h = result.get("holdout")
    if h:
        err = float(h["mean_abs_rel_error"])
        out.append(_check("holdout_error", round(err, 4), f"<= {HOLDOUT_ERROR}", err <= HOLDOUT_ERROR, "caveat",
                          f"fitted without the largest budget, the law predicted it with a mean error of {err:.1%}"))
        if "predictive_coverage" in h:
            cov = float(h["predictive_coverage"])
            out.append(_check("holdout_coverage", round(cov, 3), f">= {HOLDOUT_COVERAGE}", cov >= HOLDOUT_COVERAGE,
                              "caveat", f"the {h['level']:.0%} predictive interval covered {cov:.0%} of held-out runs"))
    rough = isoflop_smoothness(runs.n_params, runs.loss, runs.budget)
    if rough is not None:
        out.append(_check("smoothness", round(rough, 4), f"<= {SMOOTHNESS_NATS}", rough <= SMOOTHNESS_NATS, "caveat",
                          f"the worst IsoFLOP profile is {rough:.3f} nats (RMS) from falling-then-rising"))
    return out


def prediction_check(predicted: float, interval) -> dict:
    """How wide the predicted-loss interval of a planned run is, relative to the prediction."""
    half = (interval[1] - interval[0]) / 2 / predicted
    return _check("prediction_width", round(half, 4), f"<= {PREDICTION_WIDTH}", half <= PREDICTION_WIDTH, "caveat",
                  f"the predicted loss {predicted:.3f} has a 90% interval of [{interval[0]:.3f}, {interval[1]:.3f}] "
                  f"(±{half:.0%})")


def verdict(checks: list[dict]) -> str:
    if any(not c["passed"] and c["severity"] == "critical" for c in checks):
        return NOT_INFORMATIVE
    if any(not c["passed"] for c in checks):
        return CAVEATS
    return SOUND


def failed(checks: list[dict], severity: str | None = None) -> list[dict]:
    return [c for c in checks if not c["passed"] and (severity is None or c["severity"] == severity)]
