"""Fitting scaling laws to finished runs: ``fit_runs`` runs Approach 3 (flopwise.laws.approach3) in each law
form asked, scores the forms on held-out budgets and selects one, fits the other parameter conventions, adds
Approaches 1 and 2 (flopwise.laws.isoflop) and the trust checks (flopwise.laws.trust), and writes law.json and
fit.json. Pure numpy/scipy.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text
from flopwise.laws.allocate import R_D_STAR, effective_tokens
from flopwise.laws.approach3 import (
    CHINCHILLA,
    DEFAULT_DELTA,
    MIN_RUNS,
    ParametricFit,
    bootstrap_thetas,
    fit_parametric,
    loss_from_thetas,
    optimal_from_thetas,
    theta_to_params,
)
from flopwise.laws.forms import get_form, parse_forms
from flopwise.laws.isoflop import fit_envelope, fit_isoflop, interval, isoflop_optimal
from flopwise.laws.law import ParametricLaw, law_from_dict, save_law
from flopwise.laws.runs import Runs
from flopwise.laws.trust import MIN_STEPS, trust_checks, verdict

# ---------------------------------------------------------------- synthetic data (tests, benchmarks)


def synthetic_runs(law: ParametricLaw, budgets, n_per_budget: int = 7, noise: float = 0.0, seed: int = 0,
                   spread: float = 8.0, unique_tokens: float | None = None) -> Runs:
    """IsoFLOP runs drawn from ``law``: at each budget, sizes log-spaced over [N_opt/spread, N_opt*spread],
    D = C / (6 N), loss multiplied by lognormal noise of relative size ``noise``. With ``unique_tokens`` the runs
    repeat a corpus of that many tokens (``epochs`` = D / U); a data-constrained law then sees D' (its R_D*)."""
    if law.r_d_star is not None and unique_tokens is None:
        raise FlopwiseError("runs from a data-constrained law need unique_tokens (the corpus they repeat)")
    rng = np.random.default_rng(seed)
    n, d, c = [], [], []
    for flops in budgets:
        n_opt = float(law.optimal(flops)[0])
        sizes = n_opt * np.geomspace(1 / spread, spread, n_per_budget)
        n += list(sizes)
        d += list(flops / (6 * sizes))
        c += [float(flops)] * n_per_budget
    n, d, c = np.array(n), np.array(d), np.array(c)
    epochs = None if unique_tokens is None else d / unique_tokens
    d_law = effective_tokens(d, unique_tokens, law.r_d_star) if law.r_d_star is not None else d
    loss = law.loss(n, d_law) * np.exp(noise * rng.standard_normal(len(n)))
    return Runs(n, d, loss, c, c.copy(), [f"run{i}" for i in range(len(n))], law.n_convention, epochs=epochs,
                counts={law.n_convention: n})


# ---------------------------------------------------------------- extrapolation check and the whole fit


def fit_form(runs: Runs, form: str = "chinchilla", delta: float = DEFAULT_DELTA, n_starts: int = 32,
             fixed: dict[str, float] | None = None) -> ParametricFit:
    """``fit_parametric`` on a table of runs (the data-constrained form reads their epochs)."""
    return fit_parametric(runs.n_params, runs.n_tokens, runs.loss, delta=delta, n_starts=n_starts, fixed=fixed,
                          form=form, unique_tokens=runs.unique_tokens)


def predict(thetas: np.ndarray, runs: Runs, form: str = "chinchilla") -> np.ndarray:
    """Each parameter vector's predicted loss for each run: shape (len(thetas), len(runs))."""
    return loss_from_thetas(thetas, runs.n_params, runs.n_tokens, form, runs.unique_tokens)


def residual_rms(fit: ParametricFit, runs: Runs) -> float:
    """Root-mean-square relative error of the fitted law on these runs: misfit plus run-to-run scatter."""
    return float(np.sqrt(np.mean((predict(fit.theta, runs, fit.form)[0] / runs.loss - 1.0) ** 2)))


def z_score(level: float) -> float:
    """Two-sided normal quantile: 1.645 at 90%."""
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def widen(predicted, lower, upper, rel_sigma: float, level: float):
    """An interval of the law's mean widened, in quadrature, by a relative error of ``rel_sigma`` at ``level``."""
    predicted = np.asarray(predicted, float)
    extra = z_score(level) * rel_sigma * predicted
    return (predicted - np.hypot(predicted - np.asarray(lower, float), extra),
            predicted + np.hypot(np.asarray(upper, float) - predicted, extra))


def predictive_sigma(result: dict, flops: float) -> float:
    """Relative error (one standard deviation) of the law's prediction for one new run at ``flops``, beyond the
    parameters' bootstrap spread: the runs' own scatter about the law (``residual_rms``) and, where a hold-out
    check exists, the extrapolation error it measured beyond that scatter, grown in proportion to how much
    further (in log compute) ``flops`` lies beyond the sweep than the held-out budget lay beyond its fit."""
    noise = float(result.get("residual_rms", 0.0))
    h = result.get("holdout")
    if not h:
        return noise
    extra = math.sqrt(max(0.0, h["rms_rel_error"] ** 2 - h["train_residual_rms"] ** 2))
    held, fit_top = max(h["held_out_budgets"]), h["fit_max_budget"]
    reach = math.log(max(flops, held) / held) / math.log(held / fit_top)  # the full fit's reach beyond the sweep
    return math.hypot(noise, extra * max(1.0, reach))


def holdout_check(runs: Runs, k: int, n_boot: int = 1000, seed: int = 0, level: float = 0.9,
                  delta: float = DEFAULT_DELTA, workers: int | None = None, progress=None,
                  fixed: dict[str, float] | None = None, fixed_sd: dict[str, float] | None = None,
                  form: str = "chinchilla") -> dict:
    """Fit ``form`` without the ``k`` largest budgets and predict their runs' losses.

    Reports the prediction errors and how often two intervals cover the measured loss: the bootstrap
    interval of the law's mean (``coverage``; run-to-run noise alone lowers it), and that interval
    widened by the training runs' residual scatter (``predictive_coverage``), the one users are shown.
    """
    budgets = runs.budgets
    if k < 1 or k >= len(budgets):
        raise FlopwiseError(f"--holdout-largest {k} needs 1 <= K < the number of budgets ({len(budgets)})")
    held = np.isin(runs.budget, budgets[-k:])
    train, test = runs.subset(~held), runs.subset(held)
    need = max(MIN_RUNS, get_form(form).n_params)
    if len(train) < need:
        raise FlopwiseError(f"holding out {k} budget(s) leaves {len(train)} runs, too few to fit the {form} form's "
                            f"{get_form(form).n_params} parameters: hold out fewer")
    fit = fit_form(train, form, delta, fixed=fixed)
    pred = predict(fit.theta, test, form)[0]
    rel = pred / test.loss - 1.0
    noise = residual_rms(fit, train)
    out = {"k": k, "held_out_budgets": [float(c) for c in budgets[-k:]], "n_train": len(train), "n_test": len(test),
           "fit_max_budget": float(budgets[-k - 1]),
           "mean_abs_rel_error": float(np.mean(np.abs(rel))), "max_abs_rel_error": float(np.max(np.abs(rel))),
           "rms_rel_error": float(np.sqrt(np.mean(rel**2))), "train_residual_rms": noise,
           "mean_rel_error": float(np.mean(rel)), "level": level,
           "runs": [{"name": nm, "n_params": float(n), "n_tokens": float(d), "loss": float(y), "predicted": float(p)}
                    for nm, n, d, y, p in zip(test.name, test.n_params, test.n_tokens, test.loss, pred, strict=True)]}
    if n_boot > 0:
        thetas = bootstrap_thetas(train.n_params, train.n_tokens, train.loss, fit, n_boot, seed, workers, progress,
                                  fixed_sd, train.unique_tokens)
        preds = predict(thetas, test, form)
        lo, hi = np.percentile(preds, [50 * (1 - level), 50 * (1 + level)], axis=0)
        out["coverage"] = float(np.mean((test.loss >= lo) & (test.loss <= hi)))
        # the interval a user is shown for one new run: the law's uncertainty and one run's own scatter
        plo, phi = widen(pred, lo, hi, noise, level)
        out["predictive_coverage"] = float(np.mean((test.loss >= plo) & (test.loss <= phi)))
        for r, a, b, c, d in zip(out["runs"], lo, hi, plo, phi, strict=True):
            r.update(lower=float(a), upper=float(b), predictive_lower=float(c), predictive_upper=float(d))
    return out


def with_effective_tokens(runs: Runs, r_d_star: float | None = None) -> Runs:
    """The runs with D replaced by Muennighoff's effective tokens D' (needs ``runs.epochs``), their epochs dropped
    (D / epochs would no longer be the unique tokens). ``r_d_star``: the decay constant (default: theirs, 15.4)."""
    if runs.epochs is None:
        return runs
    d_eff = effective_tokens(runs.n_tokens, runs.unique_tokens, R_D_STAR if r_d_star is None else r_d_star)
    return replace(runs, n_tokens=np.where(np.isfinite(d_eff), d_eff, runs.n_tokens), epochs=None)


def law_tokens(runs: Runs, result: dict) -> Runs:
    """The runs with D as the fitted law reads it (raw, or D' with the R_D* the fit used): for plots and tables."""
    if result.get("form") == "data-constrained" and "r_d_star" in result:
        return with_effective_tokens(runs, result["r_d_star"])
    return with_effective_tokens(runs) if result.get("tokens") == "effective" else runs


# Model selection among forms: each parameter beyond Chinchilla's five adds this fraction to a form's held-out
# error (a 6-parameter form must cut the error by more than 1 - 1/1.1 = 9% to win; a simpler form wins ties):
# parameters fitted to a few budgets extrapolate worse than their hold-out score alone shows.
FORM_PENALTY = 0.1
COMPARE_BOOT = 200  # resamples behind each compared form's hold-out coverage (the selected form gets all)
CONVENTION_FACTOR = 2.0  # warn when the conventions' plans for D differ by more than this factor


def _form_score(error: float, n_params: int) -> float:
    return error * (1.0 + FORM_PENALTY * (n_params - CHINCHILLA.n_params))


def compare_forms(runs: Runs, forms, k: int, raw: Runs | None = None, n_boot: int = COMPARE_BOOT, seed: int = 0,
                  level: float = 0.9, delta: float = DEFAULT_DELTA, workers: int | None = None,
                  n_starts: int = 32, progress=None) -> list[dict]:
    """Fit each form on all runs and without the ``k`` largest budgets; score by the held-out error.

    ``raw``: the runs with raw tokens and epochs, for the data-constrained form (``runs`` may hold D'). A row
    is ``usable`` when the full fit is identified (no parameter on a bound or negligible term) and plans
    (beta + gamma > 0); its ``score`` is the held-out mean |relative error| with FORM_PENALTY per extra
    parameter. Rows of forms that cannot be fitted say why (``skipped``). ``progress(done)`` before each form and
    at the end."""
    rows = []
    for i, name in enumerate(forms):
        if progress:
            progress(i)
        f = get_form(name)
        data = raw if (f.needs_repeats and raw is not None) else runs
        row: dict = {"form": name, "convention": runs.n_convention, "n_params": f.n_params, "formula": f.formula}
        try:
            fit = fit_form(data, name, delta, n_starts)
            h = holdout_check(data, k, n_boot, seed, level, delta, workers, form=name)
        except FlopwiseError as e:
            rows.append({**row, "skipped": str(e), "usable": False})
            continue
        p = fit.params
        problems = fit.at_bounds + [f"{t} negligible" for t in fit.negligible]
        try:
            fit.law(runs.n_convention)
        except FlopwiseError as e:
            problems.append(str(e).split(": ", 1)[-1])
        row.update({"params": p, "a": p["a"], "residual_rms": residual_rms(fit, data),
                    "holdout_error": h["mean_abs_rel_error"], "holdout_max_error": h["max_abs_rel_error"],
                    "coverage": h.get("predictive_coverage"), "score": _form_score(h["mean_abs_rel_error"], f.n_params),
                    "usable": not problems, "problems": problems})
        rows.append(row)
    if progress:
        progress(len(forms))
    return rows


def select_form(rows: list[dict]) -> tuple[dict, str]:
    """The usable row with the lowest score (ties to the simpler form), and why. When no form is identified,
    the first one fitted (the trust checks then say the fit is not informative)."""
    usable = [r for r in rows if r.get("usable")]
    if not usable:
        first = next((r for r in rows if "skipped" not in r), None)
        if first is None:
            raise FlopwiseError("no law form could be fitted to these runs: "
                                + "; ".join(f"{r['form']}: {r['skipped']}" for r in rows))
        return first, "no form is identified by these runs (each has a parameter on a bound or a negligible term)"
    best = min(usable, key=lambda r: (r["score"], r["n_params"]))
    return best, (f"the lowest held-out error ({best['holdout_error']:.2%} on the largest budget(s)) with "
                  f"{FORM_PENALTY:.0%} of it added per parameter beyond 5")


def _convention_block(runs: Runs, form: str, budgets, n_boot: int, seed: int, level: float, delta: float,
                      workers: int | None, n_starts: int, fixed: dict | None, fixed_sd: dict | None) -> dict:
    """One convention's fit of ``form``: exponents, the allocation at ``budgets``, intervals from ``n_boot``."""
    fit = fit_form(runs, form, delta, n_starts, fixed)
    fit.law(runs.n_convention)  # a fit that cannot plan (farseer's beta + gamma <= 0) is refused here
    p = fit.params
    out = {"form": form, **{k: p[k] for k in ("alpha", "beta", "a", "b")}, "warnings": fit.warnings}
    thetas = None
    if n_boot > 0:
        thetas = bootstrap_thetas(runs.n_params, runs.n_tokens, runs.loss, fit, n_boot, seed, workers,
                                  fixed_sd=fixed_sd, unique_tokens=runs.unique_tokens)
        thetas = _plannable(thetas, form)
        out["a_interval"] = interval(theta_to_params(thetas, form)["a"], level)
    out["optimal"] = _optimal_rows(fit, budgets, thetas, level)
    return out


def _optimal_rows(fit: ParametricFit, budgets, thetas, level: float) -> list[dict]:
    rows = []
    for c in budgets:
        n_opt, d_opt = (float(v[0]) for v in optimal_from_thetas(fit.theta, c, fit.form))
        row = {"flops": c, "n_opt": n_opt, "d_opt": d_opt, "tokens_per_param": d_opt / n_opt,
               "loss": float(fit.law().loss(n_opt, d_opt))}
        if thetas is not None:
            ns, ds = optimal_from_thetas(thetas, c, fit.form)
            row["n_opt_interval"] = interval(ns, level)
            row["d_opt_interval"] = interval(ds, level)
            row["tokens_per_param_interval"] = interval(ds / ns, level)
        rows.append(row)
    return rows


def _plannable(thetas: np.ndarray, form: str) -> np.ndarray:
    """The bootstrap samples whose law can plan: farseer's box bounds let a resample reach beta + gamma <= 0,
    where more parameters would always help the data term and no optimum exists."""
    p = theta_to_params(thetas, form)
    return thetas[p["beta"] + p.get("gamma", 0.0) > 0]


def convention_disagreement(blocks: dict[str, dict]) -> float:
    """The largest ratio between the conventions' D_opt at any reported budget (1.0: they agree)."""
    if len(blocks) < 2:
        return 1.0
    per_budget = zip(*(b["optimal"] for b in blocks.values()), strict=True)
    return max(max(r["d_opt"] for r in rows) / min(r["d_opt"] for r in rows) for rows in per_budget)


def default_forms(runs: Runs, approach: str = "all") -> list[str]:
    """The forms fitted when none are named: all that apply where the runs allow comparing them (three or
    more budgets, Approach 3 run), else Chinchilla's; the data-constrained form only where data repeated."""
    if len(runs.budgets) < 3 or approach not in ("3", "all"):
        return ["chinchilla"]
    return [f for f in parse_forms("all") if f != "data-constrained" or runs.repeated]


def fit_runs(runs: Runs, approach: str = "all", n_boot: int = 1000, holdout_largest: int = 0,
             budgets=(), level: float = 0.9, seed: int = 0, delta: float = DEFAULT_DELTA, degree: int = 2,
             n_starts: int = 32, workers: int | None = None, progress=None, fixed: dict[str, float] | None = None,
             fixed_sd: dict[str, float] | None = None, min_steps: int = MIN_STEPS,
             effective_data: bool = False, forms=("chinchilla",), conventions=None) -> dict:
    """Everything ``flopwise fit`` reports, as one dict (private ``_``-keys hold arrays for plots),
    ending with the trust checks and their verdict (``checks``, ``verdict``; see flopwise.laws.trust).

    ``forms``: the law forms to fit (flopwise.laws.forms). With more than one, each is fitted without the
    largest budget(s) (``holdout_largest``, default 1) and scored by its error on them (``compare_forms``);
    the best (``selected``) is the law, with full bootstrap, and ``forms`` lists every row. ``conventions``:
    other parameter conventions the runs carry (e.g. ``["non_embedding"]``) to fit the same form in too;
    ``conventions`` in the result holds each one's exponents and allocation, with a warning when their
    plans for D differ by more than CONVENTION_FACTOR. ``fixed`` holds Approach 3 parameters (e.g. alpha and
    beta from a prior) instead of fitting them, ``fixed_sd`` their stated uncertainty (drawn in the
    bootstrap). ``effective_data``: where runs repeated their data (``runs.epochs`` > 1), fit on Muennighoff's
    effective tokens D' instead of D, so the law's D means what the data-constrained plan feeds it (the
    data-constrained form fits its own R_D* on the raw tokens instead). ``progress(stage, done, total)``,
    if given, is told how the bootstrap refits advance.
    """
    def tick(stage: str):
        return (lambda done: progress(stage, done, n_boot)) if progress else None

    if approach not in ("1", "2", "3", "all"):
        raise FlopwiseError(f"--approach must be 1, 2, 3 or all, got {approach!r}")
    if not (0 < level < 1):
        raise FlopwiseError(f"--level must be between 0 and 1, got {level}")
    forms = [get_form(f).name for f in forms]
    out: dict = {"n_runs": len(runs), "n_convention": runs.n_convention, "approach": approach,
                 "warnings": list(runs.warnings), "level": level, "bootstrap": n_boot, "seed": seed,
                 "tokens": "raw", "form": forms[0], "optimizer": runs.optimizer,
                 "fitted_flops": [float(min(runs.budgets)), float(max(runs.budgets))]}
    raw = runs
    if effective_data or forms == ["data-constrained"]:
        if runs.epochs is None or not np.all(np.isfinite(runs.epochs)):
            raise FlopwiseError("effective tokens need each run's epochs: an epochs column, or a sweep folder")
    if effective_data:
        runs = with_effective_tokens(runs)
        out["tokens"] = "effective"
    budgets = [float(c) for c in budgets] or [float(c) for c in runs.budgets[-1:] * np.array([1.0, 10.0, 100.0])]
    if len(forms) > 1 and approach in ("3", "all"):
        k = holdout_largest or 1
        if len(runs.budgets) < k + 2:
            raise FlopwiseError(f"comparing law forms scores each on held-out budgets: {len(runs.budgets)} budget(s) "
                                f"leave too few to fit without the {k} largest (3+ budgets needed; or pass "
                                "--forms chinchilla)")
        holdout_largest = k
        n_conv = 1 + len([c for c in (conventions or []) if c.replace("-", "_") != runs.n_convention])
        stage = f"law forms ({len(forms)} x {n_conv} conventions)"

        def forms_done(offset: int):
            return (lambda i: progress(stage, offset + i, len(forms) * n_conv)) if progress else None

        rows = compare_forms(runs, forms, k, raw, min(n_boot, COMPARE_BOOT), seed, level, delta, workers, n_starts,
                             forms_done(0))
        best, why = select_form(rows)
        for r in rows:
            r["selected"] = r is best
        out["forms"] = rows
        out["form"] = best["form"]
        out["selected"] = {"form": best["form"], "convention": runs.n_convention, "why": why}
    form = out["form"]
    data = raw if get_form(form).needs_repeats else runs
    if approach not in ("3", "all"):  # no parametric law is fitted: no form to name
        del out["form"]
    elif form == "data-constrained":
        out["tokens"] = "effective (R_D* fitted)"
    if approach in ("3", "all"):
        fit = fit_form(data, form, delta, n_starts, fixed)
        out.update(fit.params)
        out.update({"objective": fit.objective, "delta": delta, "converged": fit.converged,
                    "n_starts": fit.n_starts, "at_bounds": fit.at_bounds, "grid_edge": fit.grid_edge,
                    "negligible": fit.negligible, "fixed": fit.fixed, "fixed_sd": dict(fixed_sd or {}),
                    "residual_rms": residual_rms(fit, data)})
        out["warnings"] += fit.warnings
        out["_fit"] = fit
        thetas = None
        if n_boot > 0:
            thetas = bootstrap_thetas(data.n_params, data.n_tokens, data.loss, fit, n_boot, seed, workers,
                                      tick("bootstrap"), fixed_sd, data.unique_tokens)
            kept = _plannable(thetas, form)
            if len(kept) < len(thetas):
                out["warnings"].append(f"{len(thetas) - len(kept)} of {len(thetas)} bootstrap refits reached beta + "
                                       "gamma <= 0 (no optimum) and are left out of the intervals")
            thetas = kept
            params = theta_to_params(thetas, form)
            out["intervals"] = {k: interval(v, level) for k, v in params.items()}
            out["_thetas"] = thetas
        out["optimal"] = _optimal_rows(fit, budgets, thetas, level)
        others = [c.replace("-", "_") for c in (conventions or []) if c.replace("-", "_") != runs.n_convention]
        if others:
            blocks = {runs.n_convention: {"form": form, **{k: out[k] for k in ("alpha", "beta", "a", "b")},
                                          **({"a_interval": out["intervals"]["a"]} if thetas is not None else {}),
                                          "optimal": out["optimal"]}}
            for j, conv in enumerate(others, start=1):
                other, other_raw = runs.in_convention(conv), raw.in_convention(conv)
                if len(forms) > 1:
                    out["forms"] += [dict(r, selected=False) for r in compare_forms(
                        other, forms, holdout_largest, other_raw, min(n_boot, COMPARE_BOOT), seed, level, delta,
                        workers, n_starts, forms_done(j * len(forms)))]
                try:
                    block = _convention_block(other_raw if get_form(form).needs_repeats else other, form, budgets,
                                              min(n_boot, COMPARE_BOOT), seed, level, delta, workers, n_starts,
                                              fixed, fixed_sd)
                except FlopwiseError as e:
                    out["warnings"].append(f"the {form} form could not be fitted with {conv.replace('_', '-')} "
                                           f"parameter counts: {e}")
                    continue
                out["warnings"] += [f"{conv.replace('_', '-')} counts: {w}" for w in block["warnings"]]
                blocks[conv] = block
            factor = convention_disagreement(blocks)
            out["conventions"] = blocks
            out["convention_factor"] = factor
            if factor > CONVENTION_FACTOR:
                out["warnings"].append(
                    f"the {' and '.join(c.replace('_', '-') for c in blocks)} parameter conventions plan D "
                    f"{factor:.1f}x apart at the same nominal budget (C = 6ND in each one's N; more than "
                    f"{CONVENTION_FACTOR:g}x): how N is counted changes the plan; this law counts "
                    f"{runs.n_convention.replace('_', '-')} parameters (Pearce & Song 2024 and Porian et al. 2024 "
                    "trace Kaplan's exponents to non-embedding counts at small sizes)")
    if approach in ("2", "all"):
        try:
            a2 = fit_isoflop(runs, degree=degree, n_boot=n_boot, seed=seed, level=level)
        except FlopwiseError as e:
            if approach == "2":
                raise
            out["warnings"].append(f"Approach 2 skipped: {e}")
        else:
            out["warnings"] += a2.pop("warnings")
            # the allocation at the budgets asked, by the IsoFLOP minima's power laws (Approach 2's own answer)
            a2["optimal"] = [{"flops": c, "n_opt": n, "d_opt": d, "tokens_per_param": d / n}
                             for c in budgets for n, d in [isoflop_optimal(a2, c)]]
            a2["n_boot_requested"] = n_boot  # n_boot: the resamples that gave every budget a minimum
            out["approach2"] = a2
    if approach in ("1", "all"):
        a1 = fit_envelope(runs)
        if a1 is None:
            if approach == "1":
                raise FlopwiseError("Approach 1 needs loss curves (metrics.jsonl) of two or more runs: "
                                    "fit a sweep directory, or use --approach 2 or 3")
        else:
            out["warnings"] += a1.pop("warnings")
            out["approach1"] = a1
    if holdout_largest:
        out["holdout"] = holdout_check(data, holdout_largest, n_boot, seed, level, delta, workers,
                                       tick("holdout bootstrap"), fixed, fixed_sd, form)
        for r in out.get("forms", []):  # the selected row: the full hold-out's numbers
            if r.get("selected"):
                h = out["holdout"]
                r.update(holdout_error=h["mean_abs_rel_error"], holdout_max_error=h["max_abs_rel_error"],
                         coverage=h.get("predictive_coverage"))
    out["checks"] = trust_checks(out, runs, min_steps)
    out["verdict"] = verdict(out["checks"])
    return out


def law_json(result: dict, source: str = "") -> dict:
    """The law file ``flopwise plan --law`` reads: DESIGN.md's form plus intervals and fit metadata."""
    meta = {k: result[k] for k in ("n_runs", "approach", "bootstrap", "seed", "level", "warnings", "tokens",
                                   "selected", "verdict", "fitted_flops") if k in result}
    optimizer = {"optimizer": result["optimizer"]} if result.get("optimizer") else {}
    meta["source"] = source
    if "E" in result:
        keys = ("E", "A", "B", "alpha", "beta", "gamma", "r_d_star")
        law = {"form": result.get("form", "chinchilla"), **{k: result[k] for k in keys if k in result},
               "n_convention": result["n_convention"], "name": "fitted", "a": result["a"], "b": result["b"]}
        law["objective"] = result["objective"]
        if "intervals" in result:
            law["intervals"] = result["intervals"]
    else:
        a2 = result["approach2"]
        ref = a2["groups"][-1]["flops"]
        law = {"form": "power", "a": a2["a"], "n_ref": isoflop_optimal(a2, ref)[0], "flops_ref": ref,
               "n_convention": result["n_convention"], "name": "fitted-approach2"}
        if "intervals" in a2:
            law["intervals"] = a2["intervals"]
    law.update(optimizer)  # the optimizer that trained the runs: the law holds for it
    law["fit"] = meta
    return law


def save_fit(result: dict, source: str, out_dir: str | Path) -> Path:
    """law.json (what ``plan --law`` reads) and fit.json (the whole result) in ``out_dir``; returns law.json."""
    out_dir = Path(out_dir)
    law_path = out_dir / "law.json"
    save_law(law_from_dict(law_json(result, source), str(law_path)), law_path)
    atomic_write_text(out_dir / "fit.json", json.dumps(public(result), indent=2) + "\n")
    return law_path


def public(result: dict) -> dict:
    """``result`` without its private (array-valued) keys, ready for JSON."""
    if isinstance(result, dict):
        return {k: public(v) for k, v in result.items() if not str(k).startswith("_")}
    if isinstance(result, list):
        return [public(v) for v in result]
    return result
