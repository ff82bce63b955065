"""What one training recipe is worth against another, in FLOPs: two fitted laws (e.g. a Muon sweep and an AdamW
sweep of the same corpus) compared at their compute-optimal losses. Pure numpy.

Under every parametric form (flopwise.laws.forms) with unlimited data the loss at the compute-optimal allocation
is a power law in compute,

    L*(C) = E + K (C/6)^-p,   p = alpha a,   K = A G^-alpha + B G^(beta + gamma),

(N_opt = G (C/6)^a and D_opt = (C/6)^(1-a) / G; both terms fall as (C/6)^-p), so the compute at which a law
reaches a loss L is C = 6 ((L - E) / K)^(-1/p), infinite at or below E. The **compute multiplier** at a budget
C is C_weaker(L*_stronger(C)) / C: the FLOPs the weaker recipe needs to match what the stronger reaches with C.
"""

from __future__ import annotations

import numpy as np

from flopwise.laws.approach3 import optimal_from_thetas, theta_to_params
from flopwise.laws.isoflop import interval


def optimal_loss_curve(thetas: np.ndarray, form: str = "chinchilla") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E, K, p) of L*(C) = E + K (C/6)^-p for each row of ``thetas``."""
    prm = theta_to_params(np.atleast_2d(thetas), form)
    g, _ = optimal_from_thetas(thetas, 6.0, form)  # N_opt at C/6 = 1 is G
    gamma = prm.get("gamma", 0.0)
    k = prm["A"] * g ** -prm["alpha"] + prm["B"] * g ** (prm["beta"] + gamma)
    return prm["E"], k, prm["alpha"] * prm["a"]


def optimal_loss(thetas: np.ndarray, flops, form: str = "chinchilla") -> np.ndarray:
    """L*(C): each law's loss (nats/token) at the compute-optimal allocation of ``flops``; (len(thetas),)."""
    e, k, p = optimal_loss_curve(thetas, form)
    return e + k * (float(flops) / 6.0) ** -p


def flops_for_loss(thetas: np.ndarray, loss, form: str = "chinchilla") -> np.ndarray:
    """The compute each law needs to reach ``loss`` at its optimal allocation (inf where ``loss`` <= E)."""
    e, k, p = optimal_loss_curve(thetas, form)
    excess = np.asarray(loss, float) - e
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(excess > 0, 6.0 * (excess / k) ** (-1.0 / p), np.inf)


def _finite_interval(samples: np.ndarray, level: float) -> dict:
    """A percentile interval where some samples may be infinite (a law that never reaches the target)."""
    # percentiles by rank (no interpolation between an infinite sample and its neighbour, which gives NaN)
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)], method="nearest")
    finite = samples[np.isfinite(samples)]
    return {"lower": float(lo) if np.isfinite(lo) else None, "upper": float(hi) if np.isfinite(hi) else None,
            "level": level,
            "unreached": float(np.mean(~np.isfinite(samples))),
            "se": float(np.std(finite, ddof=1)) if len(finite) > 1 else None}


def compare_laws(fit_a: dict, fit_b: dict, budgets, names=("A", "B"), level: float = 0.9) -> dict:
    """Two ``fit_runs`` results (Approach 3, with bootstrap samples) compared at ``budgets`` (FLOPs).

    Per budget: each law's L*(C) with its interval, the difference B - A, which is stronger, and the compute
    multiplier with its interval (bootstrap samples of the two fits paired in order; fit them with different
    seeds so that the pairs are independent)."""
    ta, tb = (f["_fit"].theta[None, :] for f in (fit_a, fit_b))
    sa, sb = (f.get("_thetas", f["_fit"].theta[None, :]) for f in (fit_a, fit_b))
    boot = "_thetas" in fit_a and "_thetas" in fit_b  # without bootstrap samples: estimates, no intervals
    fa, fb = fit_a["form"], fit_b["form"]
    n = min(len(sa), len(sb))
    sa, sb = sa[:n], sb[:n]
    rows = []
    for c in budgets:
        c = float(c)
        la, lb = float(optimal_loss(ta, c, fa)[0]), float(optimal_loss(tb, c, fb)[0])
        a_stronger = la <= lb
        (ts, fs, ss), (tw, fw, sw) = ((ta, fa, sa), (tb, fb, sb)) if a_stronger else ((tb, fb, sb), (ta, fa, sa))
        mult = float(flops_for_loss(tw, optimal_loss(ts, c, fs), fw)[0]) / c
        samples = flops_for_loss(sw, optimal_loss(ss, c, fs), fw) / c
        diff = optimal_loss(sb, c, fb) - optimal_loss(sa, c, fa)
        rows.append({"flops": c, "loss_" + names[0]: la, "loss_" + names[1]: lb,
                     f"loss_{names[0]}_interval": interval(optimal_loss(sa, c, fa), level) if boot else None,
                     f"loss_{names[1]}_interval": interval(optimal_loss(sb, c, fb), level) if boot else None,
                     "loss_difference": lb - la, "loss_difference_interval": interval(diff, level) if boot else None,
                     "stronger": names[0] if a_stronger else names[1],
                     "compute_multiplier": mult if np.isfinite(mult) else None,
                     "compute_multiplier_interval": _finite_interval(samples, level) if boot else None})
    exps = {}
    for name, fit in zip(names, (fit_a, fit_b), strict=True):
        iv = fit.get("intervals", {}).get("a")
        exps[name] = {"a": fit["a"], "b": fit["b"], "a_interval": iv, "form": fit["form"],
                      "verdict": fit.get("verdict"), "optimizer": fit.get("optimizer")}
    return {"names": list(names), "level": level, "n_boot": n, "budgets": rows, "exponents": exps}
