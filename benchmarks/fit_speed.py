"""Benchmark: Approach 3 fit of 250 runs plus 1000 bootstrap refits (target: under 30 s on 2 cores).

Baseline in the same invocation: the same refits done serially with SciPy's finite-difference
gradient (what a fit without the analytic gradient and process pool costs), timed on a subset
and scaled to 1000 resamples.

    .venv/bin/python benchmarks/fit_speed.py [--resamples 1000]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy.optimize import minimize

from flopwise.laws.approach3 import BOUNDS, LBFGS_OPTIONS, bootstrap_thetas, fit_parametric, objective
from flopwise.laws.fit import synthetic_runs
from flopwise.laws.forms import Data
from flopwise.laws.law import ParametricLaw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--baseline-resamples", type=int, default=20)
    args = ap.parse_args()
    truth = ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30)
    runs = synthetic_runs(truth, np.geomspace(1e16, 1e20, 10), n_per_budget=25, noise=0.01, seed=0)
    print(f"runs: {len(runs)}, bootstrap resamples: {args.resamples}, cores: {os.cpu_count()}")

    t0 = time.perf_counter()
    fit = fit_parametric(runs.n_params, runs.n_tokens, runs.loss)
    t_fit = time.perf_counter() - t0
    thetas = bootstrap_thetas(runs.n_params, runs.n_tokens, runs.loss, fit, args.resamples, seed=0)
    t_total = time.perf_counter() - t0
    p = fit.params
    print(f"fit: alpha={p['alpha']:.4f} beta={p['beta']:.4f} E={p['E']:.4f} (truth 0.35, 0.30, 1.8)")
    print(f"flopwise: fit {t_fit:.2f} s, fit + {len(thetas)} bootstrap refits {t_total:.2f} s "
          f"(target < 30 s: {'met' if t_total < 30 else 'MISSED'})")

    # baseline: serial, finite-difference gradient, same warm start and tolerances
    rng = np.random.default_rng(0)
    ln, ld, ll = np.log(runs.n_params), np.log(runs.n_tokens), np.log(runs.loss)
    t0 = time.perf_counter()
    for _ in range(args.baseline_resamples):
        rows = rng.integers(0, len(ll), len(ll))
        minimize(lambda th, r=rows: objective(th, Data(ln[r], ld[r], ld[r]), ll[r])[0], fit.theta, method="L-BFGS-B",
                 bounds=BOUNDS, options=LBFGS_OPTIONS)
    t_base = (time.perf_counter() - t0) / args.baseline_resamples * args.resamples + t_fit
    print(f"baseline (serial, numeric gradient): {t_base:.1f} s for {args.resamples} refits (scaled from "
          f"{args.baseline_resamples})")
    print(f"speed-up: {t_base / t_total:.1f}x")


if __name__ == "__main__":
    main()
