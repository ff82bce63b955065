"""Benchmark: a WSD sweep against a cosine sweep at the same budgets on the bundled corpus.

Runs both sweeps (the autopilot's default sweep budgets), fits Approach 3 to each, and prints the
allocation exponent a (N_opt ~ C^a) of both, their difference (target: within 0.05), the FLOPs
each sweep spent and its wall time.

    .venv/bin/python benchmarks/wsd_vs_cosine.py [--out DIR] [--budgets 4.1e11,1.03e12,2.56e12]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from flopwise.config import AutopilotConfig, sweep_train_options
from flopwise.data.prepare import prepare
from flopwise.laws.fit import fit_runs
from flopwise.laws.runs import load_runs
from flopwise.sweep.design import design_sweep, design_wsd_sweep, equivalent_cosine_flops, total_flops, write_design
from flopwise.sweep.runner import run_sweep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-wsd")
    ap.add_argument("--budgets", default="4.1e11,1.03e12,2.56e12")
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    corpus = prepare(vocab_size=1024, log=lambda m: None)
    results = {}
    for name, design in (("cosine", design_sweep), ("wsd", design_wsd_sweep)):
        sweep = Path(args.out) / name
        specs = design(budgets, corpus.vocab_size, 128)
        if not (sweep / "sweep.json").exists():
            write_design(sweep, specs, {"corpus": str(corpus.path), "corpus_hash": corpus.meta["hash"],
                                        "budgets": budgets, "train_options": sweep_train_options(AutopilotConfig())})
        t0 = time.perf_counter()
        run_sweep(sweep, workers=2, threads=1)
        wall = time.perf_counter() - t0
        fit = fit_runs(load_runs(sweep), approach="3", n_boot=200)
        results[name] = {"a": fit["a"], "a_interval": [fit["intervals"]["a"]["lower"], fit["intervals"]["a"]["upper"]],
                         "flops": total_flops(specs), "cosine_equivalent_flops": equivalent_cosine_flops(specs),
                         "wall_seconds": wall, "runs": len(specs)}
        print(f"{name:6s}: a = {fit['a']:.3f} [{results[name]['a_interval'][0]:.3f}, "
              f"{results[name]['a_interval'][1]:.3f}], {total_flops(specs):.3g} FLOPs "
              f"({len(specs)} runs), {wall / 60:.1f} min")
    diff = abs(results["wsd"]["a"] - results["cosine"]["a"])
    saved = 1 - results["wsd"]["flops"] / results["wsd"]["cosine_equivalent_flops"]
    print(f"|a_wsd - a_cosine| = {diff:.3f} (target <= 0.05: {'met' if diff <= 0.05 else 'MISSED'}); "
          f"WSD saved {saved:.0%} of the FLOPs of the same runs as independent cosine runs")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
