"""Chinchilla's Approach 3 in any law form (flopwise.laws.forms): the Huber objective with its exact gradient,
L-BFGS-B from the best points of a start grid, bootstrap refits, and the law's quantities per parameter vector.
Pure numpy/scipy; flopwise.laws.fit builds the whole fit (hold-out, forms, conventions, trust) on it.

Approach 3 follows Hoffmann et al. 2022 (Appendix D.2) with the corrections of Besiroglu et
al. 2024: minimise sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i)
with E = exp(e), A = exp(a), B = exp(b), by L-BFGS-B with an analytic gradient and
tolerances tight enough that the optimiser does not stop early (SciPy's default ``ftol`` is
an absolute 2.2e-9 once the objective is below 1, larger than the whole objective here).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from flopwise.errors import FlopwiseError
from flopwise.laws.forms import (
    FORMS,
    Data,
    Form,
    dlog_effective_tokens_drho,
    get_form,
    log_effective_tokens,
)
from flopwise.laws.law import ParametricLaw

# Approach 3's machinery serves every form of flopwise.laws.forms; Chinchilla's is the default.
CHINCHILLA = FORMS["chinchilla"]
PARAMS = CHINCHILLA.params
BOUNDS = CHINCHILLA.bounds
LBFGS_OPTIONS = {"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000, "maxfun": 40000, "maxcor": 20}
DEFAULT_DELTA = 1e-3
MIN_RUNS = 5


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    return value, np.clip(r, -delta, delta)


def objective(theta: np.ndarray, x: Data, log_l: np.ndarray, delta: float = DEFAULT_DELTA,
              form: Form = CHINCHILLA) -> tuple[float, np.ndarray]:
    """Approach 3's Huber objective sum_i Huber(log L_hat_i - log L_i) and its exact gradient in theta.

    The terms are those of ``Form.log_terms`` (a test checks they agree), written out here with their gradient:
    the bootstrap calls this ~10^5 times on a dozen runs, where numpy's per-call overhead, not arithmetic, sets
    the time."""
    a, b, e, alpha, beta = theta[:5]
    log_d = x.log_d
    if form.needs_repeats:
        r_d = math.exp(theta[5])
        log_d = log_effective_tokens(x.log_d, x.log_u, r_d)
    t1 = a - alpha * x.log_n
    t2 = b - beta * log_d
    if form.name == "farseer":
        t2 = t2 + theta[5] * x.log_n
    m = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    value, dr = _huber(m + np.log(s) - log_l, delta)
    g1, g2, g3 = dr * w1 / s, dr * w2 / s, dr * w3 / s
    grad = [g1.sum(), g2.sum(), g3.sum(), -(g1 * x.log_n).sum(), -(g2 * log_d).sum()]
    if form.name == "farseer":
        grad.append((g2 * x.log_n).sum())
    elif form.needs_repeats:
        grad.append(-beta * (g2 * dlog_effective_tokens_drho(x.log_d, x.log_u, r_d)).sum())
    return float(value.sum()), np.array(grad)


def grid_points(grid: dict[str, np.ndarray] | None = None, form: Form = CHINCHILLA) -> np.ndarray:
    grid = grid or form.grid
    mesh = np.meshgrid(*(np.asarray(grid[p], float) for p in form.params), indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _grid_values(points: np.ndarray, x: Data, log_l, delta: float, form: Form) -> np.ndarray:
    """The objective at every grid point at once (points x runs)."""
    t = form.log_terms(points, x)
    lse = np.logaddexp(np.logaddexp(t[0], t[1]), t[2])
    return _huber(lse - log_l, delta)[0].sum(axis=1)


def _minimise(theta0, x: Data, log_l, delta, free=None, form: Form = CHINCHILLA):
    """L-BFGS-B from theta0; parameters outside ``free`` (a boolean mask) stay at theta0's values."""
    if free is None or free.all():
        return minimize(objective, theta0, args=(x, log_l, delta, form), jac=True, method="L-BFGS-B",
                        bounds=form.bounds, options=LBFGS_OPTIONS)
    theta0 = np.asarray(theta0, float)

    def sub(z):
        theta = theta0.copy()
        theta[free] = z
        value, grad = objective(theta, x, log_l, delta, form)
        return value, grad[free]

    res = minimize(sub, theta0[free], jac=True, method="L-BFGS-B",
                   bounds=[b for b, f in zip(form.bounds, free, strict=True) if f], options=LBFGS_OPTIONS)
    full = theta0.copy()
    full[free] = res.x
    jac = np.zeros(len(theta0))
    jac[free] = res.jac
    res.x, res.jac = full, jac
    return res


@dataclass
class ParametricFit:
    """The result of an Approach 3 fit in one law form."""

    theta: np.ndarray  # in form.params' order: (a, b, e, alpha, beta[, gamma | rho])
    objective: float
    n_runs: int
    delta: float
    converged: bool
    n_starts: int
    at_bounds: list[str] = field(default_factory=list)
    grid_edge: list[str] = field(default_factory=list)
    negligible: list[str] = field(default_factory=list)  # terms too small to matter for any run
    fixed: dict[str, float] = field(default_factory=dict)  # parameters held, not fitted
    form: str = "chinchilla"

    @property
    def params(self) -> dict[str, float]:
        return {k: float(v[0]) for k, v in theta_to_params(self.theta[None, :], self.form).items()}

    def law(self, n_convention: str = "total", name: str = "fitted") -> ParametricLaw:
        p = self.params
        return ParametricLaw(E=p["E"], A=p["A"], B=p["B"], alpha=p["alpha"], beta=p["beta"],
                             n_convention=n_convention, name=name, form=self.form, gamma=p.get("gamma", 0.0),
                             r_d_star=p.get("r_d_star"))

    @property
    def warnings(self) -> list[str]:
        out = []
        if not self.converged:
            out.append("the optimiser did not report convergence: treat the fit with suspicion")
        if self.at_bounds:
            names = [{"a": "A", "b": "B", "e": "E"}.get(p, p) for p in self.at_bounds]  # theta holds log A, ...
            out.append(f"the fit sits on a bound for {', '.join(names)}: the data do not pin "
                       "these down (add runs across a wider range of N and D)")
        for term in self.negligible:
            which = "N" if term.startswith("A") else "D"
            out.append(f"the fitted {term} term is negligible for every run: the data do not determine it "
                       f"(vary {which} more widely, or check that loss really falls with {which})")
        if self.grid_edge:
            out.append(f"the best start lies on the edge of the grid for {', '.join(self.grid_edge)}: "
                       "widen the grid to be sure no better fit lies beyond it")
        return out


def log_data(n_params, n_tokens, loss, unique_tokens=None, form: Form = CHINCHILLA) -> tuple[Data, np.ndarray]:
    """Validated runs as (Data, log L); ``unique_tokens`` (NaN or None: no repeats known) feeds D'."""
    n, d, loss = (np.asarray(x, dtype=float) for x in (n_params, n_tokens, loss))
    for name, x in (("n_params", n), ("n_tokens", d), ("loss", loss)):
        if not np.all(np.isfinite(x)) or np.any(x <= 0):
            raise FlopwiseError(f"{name} must be positive and finite for every run")
    need = max(MIN_RUNS, form.n_params)
    if len(loss) < need:
        raise FlopwiseError(f"{len(loss)} runs are too few to fit {form.n_params} parameters: give at least {need} "
                            "(a sweep of 3+ budgets x 5 sizes is a good start)")
    if np.ptp(np.log(n)) < 1e-9:
        raise FlopwiseError("every run has the same N: a law in N and D needs runs of several model sizes")
    if np.ptp(np.log(d)) < 1e-9:
        raise FlopwiseError("every run has the same D: a law in N and D needs runs of several token counts")
    u = d.copy() if unique_tokens is None else np.asarray(unique_tokens, float)
    u = np.where(np.isfinite(u) & (u > 0), u, d)
    if form.needs_repeats and not np.any(d > u * (1 + 1e-6)):
        raise FlopwiseError(f"the {form.name} form needs runs that repeated their data (epochs > 1): "
                            "none of these did")
    return Data(np.log(n), np.log(d), np.log(u)), np.log(loss)


def fit_parametric(n_params, n_tokens, loss, delta: float = DEFAULT_DELTA, grid: dict | None = None,
                   n_starts: int = 32, init: np.ndarray | None = None, fixed: dict[str, float] | None = None,
                   form: str = "chinchilla", unique_tokens=None) -> ParametricFit:
    """Approach 3 in ``form`` (flopwise.laws.forms). Starts L-BFGS-B from the ``n_starts`` best points of the
    form's grid (Chinchilla's, extended; all points when ``n_starts`` is 0) and, if given, from ``init``; keeps
    the best optimum. ``fixed`` holds parameters (by name, e.g. alpha and beta) at given values.
    ``unique_tokens`` (per run) is needed by the data-constrained form."""
    f = get_form(form)
    x, log_l = log_data(n_params, n_tokens, loss, unique_tokens, f)
    fixed = fixed or {}
    if set(fixed) - set(f.params):
        raise FlopwiseError(f"only {', '.join(f.params)} can be held in a fit, not "
                            f"{', '.join(set(fixed) - set(f.params))}")
    grid = dict(grid or f.grid)
    for k, v in fixed.items():
        grid[k] = np.array([float(v)])
    free = np.array([p not in fixed for p in f.params])
    points = grid_points(grid, f)
    values = _grid_values(points, x, log_l, delta, f)
    order = np.argsort(values, kind="stable")
    starts = points[order if n_starts <= 0 else order[:n_starts]]
    if init is not None:
        starts = np.vstack([np.asarray(init, float)[None, :], starts])
    best, best_start = None, None
    for s in starts:
        res = _minimise(s, x, log_l, delta, free, f)
        if best is None or res.fun < best.fun:
            best, best_start = res, s
    lo, hi = points.min(axis=0), points.max(axis=0)
    theta = best.x
    at_bounds = [p for p, v, (bl, bh) in zip(f.params, theta, f.bounds, strict=True)
                 if p not in fixed and (v <= bl + 1e-6 or v >= bh - 1e-6)]
    edge = [p for p, v, l_, h_ in zip(f.params, best_start, lo, hi, strict=True) if (v == l_ or v == h_) and l_ != h_]
    # only worth a warning when the optimum also went beyond the grid's range in that parameter
    edge = [p for p in edge if not (lo[f.index(p)] <= theta[f.index(p)] <= hi[f.index(p)])]
    # L-BFGS-B reports an "abnormal" line search once it is at float precision; a gradient that is
    # tiny against its natural scale (runs x delta x log N) is convergence all the same.
    scale = len(log_l) * delta * max(1.0, float(np.abs(x.log_n).max()), float(np.abs(x.log_d).max()))
    free = free & np.array([p not in at_bounds for p in f.params])
    converged = bool(best.success) or float(np.max(np.abs(best.jac[free]), initial=0.0)) < 1e-6 * scale
    shares = np.exp(f.log_terms(theta, x)[:2, 0, :] - log_l)
    negligible = [name for name, share in zip(("A/N^alpha", "B/D^beta"), shares, strict=True)
                  if float(np.max(share)) < 1e-6]
    return ParametricFit(theta=theta, objective=float(best.fun), n_runs=len(log_l), delta=delta,
                         converged=converged, n_starts=len(starts), at_bounds=at_bounds, grid_edge=edge,
                         negligible=negligible, fixed=dict(fixed), form=f.name)


def _bootstrap_chunk(args) -> np.ndarray:
    idx, x, log_l, starts, free, delta, form = args
    out = np.empty((len(idx), form.n_params))
    for i, (rows, theta0) in enumerate(zip(idx, starts, strict=True)):
        out[i] = _minimise(theta0, x.rows(rows), log_l[rows], delta, free, form).x
    return out


def bootstrap_thetas(n_params, n_tokens, loss, fit: ParametricFit, n_boot: int = 1000, seed: int = 0,
                     workers: int | None = None, progress=None, fixed_sd: dict[str, float] | None = None,
                     unique_tokens=None) -> np.ndarray:
    """Refit on ``n_boot`` resamples of the runs (with replacement), warm-started at ``fit``.

    Parameters the fit held (``fit.fixed``) stay held; with ``fixed_sd`` each resample draws them
    from a normal of that standard deviation around the held value (a prior's stated uncertainty).
    Resamples are drawn from one seeded generator, so the result does not depend on ``workers``.
    ``progress(n)``, if given, is called with the number of refits done as chunks finish.
    """
    form = get_form(fit.form)
    x, log_l = log_data(n_params, n_tokens, loss, unique_tokens, form)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(log_l), size=(n_boot, len(log_l)))
    starts = np.tile(fit.theta, (n_boot, 1))
    for name, sd in (fixed_sd or {}).items():
        k = form.index(name)
        starts[:, k] = np.clip(fit.theta[k] + sd * rng.standard_normal(n_boot), *form.bounds[k])
    free = np.array([p not in fit.fixed for p in form.params])
    workers = workers or os.cpu_count() or 1
    parts = np.array_split(np.arange(n_boot), max(1, workers * 8))
    jobs = [(idx[c], x, log_l, starts[c], free, fit.delta, form) for c in parts if len(c)]
    results: list = [None] * len(jobs)
    done = 0
    # L-BFGS-B's BLAS calls are on vectors of a few numbers: with BLAS threads on every core, two workers ran
    # 1000 refits 6x slower than with one thread each (67 s against 11 s, 2 cores)
    with threadpool_limits(1):
        if workers <= 1 or n_boot < 50:
            for i, j in enumerate(jobs):
                results[i] = _bootstrap_chunk(j)
                done += len(results[i])
                if progress:
                    progress(done)
            return np.vstack(results)
        with ProcessPoolExecutor(max_workers=workers, initializer=_one_blas_thread) as pool:
            futures = {pool.submit(_bootstrap_chunk, j): i for i, j in enumerate(jobs)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                done += len(results[futures[fut]])
                if progress:
                    progress(done)
    return np.vstack(results)


def _one_blas_thread() -> None:
    threadpool_limits(1)


def theta_to_params(thetas: np.ndarray, form: str = "chinchilla") -> dict[str, np.ndarray]:
    """The law's constants (E, A, B, alpha, beta[, gamma | r_d_star]) and allocation exponents a, b per row."""
    f = get_form(form)
    t = np.atleast_2d(thetas)
    col = {p: t[:, i] for i, p in enumerate(f.params)}
    gamma = col.get("gamma", 0.0)
    a = col["beta"] / (col["alpha"] + col["beta"] + gamma)
    out = {"E": np.exp(col["e"]), "A": np.exp(col["a"]), "B": np.exp(col["b"]), "alpha": col["alpha"],
           "beta": col["beta"]}
    if "gamma" in col:
        out["gamma"] = col["gamma"]
    if "rho" in col:
        out["r_d_star"] = np.exp(col["rho"])
    return {**out, "a": a, "b": 1.0 - a}


def loss_from_thetas(thetas: np.ndarray, n_params, n_tokens, form: str = "chinchilla",
                     unique_tokens=None) -> np.ndarray:
    """The law's loss (nats/token) under each parameter vector: shape (len(thetas), len(n_params)). In the
    data-constrained form ``n_tokens`` are raw tokens and each row turns them into D' with its own R_D*
    (``unique_tokens`` needed); in the others they are the law's own D."""
    f = get_form(form)
    n = np.atleast_1d(np.asarray(n_params, float))
    d = np.atleast_1d(np.asarray(n_tokens, float))
    u = d if unique_tokens is None else np.broadcast_to(np.asarray(unique_tokens, float), d.shape)
    u = np.where(np.isfinite(u) & (u > 0), u, d)  # unknown: nothing repeated
    if f.needs_repeats and unique_tokens is None:
        raise FlopwiseError("the data-constrained form's loss needs the unique tokens")
    t = f.log_terms(np.atleast_2d(thetas), Data(np.log(n), np.log(d), np.log(u)))
    return np.exp(t).sum(axis=0)


def optimal_from_thetas(thetas: np.ndarray, flops: float, form: str = "chinchilla") -> tuple[np.ndarray, np.ndarray]:
    """N_opt and D_opt at ``flops`` for each row of theta (closed form under C = 6 N D, data unlimited)."""
    p = theta_to_params(np.atleast_2d(thetas), form)
    gamma = p.get("gamma", 0.0)
    g = (p["alpha"] * p["A"] / ((p["beta"] + gamma) * p["B"])) ** (1.0 / (p["alpha"] + p["beta"] + gamma))
    c6 = flops / 6.0
    return g * c6 ** p["a"], c6 ** p["b"] / g
