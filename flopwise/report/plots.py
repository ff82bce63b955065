"""Plots of a scaling-law fit (matplotlib, Agg): PNG and SVG, labelled axes with units.

Each function takes the runs and the dict from ``flopwise.laws.fit.fit_runs`` and writes
``<out>/<name>.png`` and ``.svg``; ``plot_fit`` writes them all and returns the paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flopwise.laws.approach3 import optimal_from_thetas
from flopwise.laws.isoflop import isoflop_optimal
from flopwise.laws.law import REGISTRY
from flopwise.laws.runs import Runs


def _plt():
    import matplotlib  # loaded when a plot is made: it is slow to import and needs the Agg backend set first

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "svg"):
        path = out / f"{name}.{ext}"
        tmp = out / f".{name}.tmp.{ext}"
        fig.savefig(tmp, dpi=130, bbox_inches="tight")
        tmp.replace(path)
        paths.append(str(path))
    _plt().close(fig)
    return paths


def _colors(n: int):
    return _plt().cm.viridis(np.linspace(0.05, 0.9, max(n, 1)))


def plot_isoflop(runs: Runs, result: dict, out: Path) -> list[str]:
    """Loss against N at each budget, with the fitted profile and its minimum."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {g["flops"]: g for g in result.get("approach2", {}).get("groups", [])}
    deg = result.get("approach2", {}).get("degree", 2)
    for color, c in zip(_colors(len(runs.budgets)), runs.budgets, strict=True):
        m = runs.budget == c
        ax.scatter(runs.n_params[m], runs.loss[m], color=color, s=22, label=f"{c:.2g} FLOPs", zorder=3)
        g = groups.get(float(c))
        if g is not None:
            x = np.linspace(np.log(runs.n_params[m]).min() - 0.2, np.log(runs.n_params[m]).max() + 0.2, 100)
            ax.plot(np.exp(x), np.polyval(g["coef"], x), color=color, lw=1.2)
            # a hollow star is an extrapolated minimum (outside the sizes run), not a measurement
            ax.scatter([g["n_opt"]], [g["loss_min"]], marker="*", s=140, zorder=4,
                       color=color if g["bracketed"] else "none", edgecolor=color if not g["bracketed"] else "k")
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters N ({runs.n_convention})")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"IsoFLOP profiles (degree {deg}); stars: minima (hollow: outside the sizes run)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out, "isoflop")


def plot_optimal(runs: Runs, result: dict, out: Path) -> list[str]:
    """N_opt and D_opt against compute: fitted laws with interval bands, minima, published laws."""
    plt = _plt()
    c_lo = runs.budgets.min() / 3
    c_hi = max([runs.budgets.max() * 30] + [r["flops"] for r in result.get("optimal", [])])
    cs = np.geomspace(c_lo, c_hi, 60)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    level = result.get("level", 0.9)
    for ax, idx, label in ((axes[0], 0, "N_opt (parameters)"), (axes[1], 1, "D_opt (tokens)")):
        if "_fit" in result:
            form = result["_fit"].form
            fit_vals = np.array([optimal_from_thetas(result["_fit"].theta, c, form) for c in cs])[:, idx, 0]
            ax.plot(cs, fit_vals, color="C0", lw=2, label=f"Approach 3 (this fit, {form} form)")
            if "_thetas" in result:
                samples = np.array([optimal_from_thetas(result["_thetas"], c, form)[idx] for c in cs])
                lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)], axis=1)
                ax.fill_between(cs, lo, hi, color="C0", alpha=0.2, label=f"{level:.0%} bootstrap interval")
        if "approach2" in result:
            a2 = result["approach2"]
            pts = np.array([[g["flops"], g["n_opt"] if idx == 0 else g["d_opt"]] for g in a2["groups"]])
            ax.scatter(pts[:, 0], pts[:, 1], color="C1", zorder=3, label="IsoFLOP minima")
            ax.plot(cs, np.array([isoflop_optimal(a2, c)[idx] for c in cs]), color="C1", ls="--",
                    label=f"Approach 2 (a={a2['a']:.3f})" if idx == 0 else f"Approach 2 (b={a2['b']:.3f})")
        for i, name in enumerate(("epoch", "chinchilla", "chinchilla-approach1")):
            law = REGISTRY[name]
            ax.plot(cs, law.optimal(cs)[idx], color=f"C{i + 2}", lw=1, ls=":", label=f"{name} (published)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training compute C (FLOPs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("Compute-optimal allocation")
    return _save(fig, out, "optimal")


def plot_contours(runs: Runs, result: dict, out: Path) -> list[str]:
    """Loss contours over (N, D) with IsoFLOP lines and the efficient frontier (Chinchilla Fig. 4 style)."""
    plt = _plt()
    law = result["_fit"].law(runs.n_convention)
    n = np.geomspace(runs.n_params.min() / 10, runs.n_params.max() * 10, 200)
    d = np.geomspace(runs.n_tokens.min() / 10, runs.n_tokens.max() * 10, 200)
    nn, dd = np.meshgrid(n, d)
    fig, ax = plt.subplots(figsize=(7, 5))
    loss = law.loss(nn, dd)
    levels = np.geomspace(loss.min(), np.percentile(loss, 80), 25)  # resolve the low-loss region
    cs = ax.contourf(nn, dd, loss, levels=levels, cmap="viridis_r", extend="max")
    fig.colorbar(cs, ax=ax, label="predicted loss (nats/token)")
    flops = np.geomspace(6 * n[0] * d[0], 6 * n[-1] * d[-1], 60)
    n_opt, d_opt = law.optimal(flops)
    ax.plot(n_opt, d_opt, color="w", lw=2, label="efficient frontier")
    for c in runs.budgets:
        ax.plot(n, c / (6 * n), color="k", lw=0.6, ls="--")
    ax.scatter(runs.n_params, runs.n_tokens, c="r", s=10, label="runs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(n[0], n[-1])
    ax.set_ylim(d[0], d[-1])
    ax.set_xlabel(f"parameters N ({runs.n_convention})")
    ax.set_ylabel("training tokens D")
    ax.set_title("Loss over (N, D); dashed: IsoFLOP budgets")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, out, "contours")


def plot_residuals(runs: Runs, result: dict, out: Path) -> list[str]:
    """log(predicted) - log(measured) loss of every run, by size and budget."""
    plt = _plt()
    law = result["_fit"].law(runs.n_convention)
    resid = np.log(law.loss(runs.n_params, runs.n_tokens)) - np.log(runs.loss)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    for color, c in zip(_colors(len(runs.budgets)), runs.budgets, strict=True):
        m = runs.budget == c
        ax.scatter(runs.n_params[m], resid[m], color=color, s=18, label=f"{c:.2g} FLOPs")
    ax.axhline(0, color="k", lw=0.8)
    ax.axhspan(-result.get("delta", 1e-3), result.get("delta", 1e-3), color="grey", alpha=0.2,
               label="Huber delta")
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters N ({runs.n_convention})")
    ax.set_ylabel("log predicted - log measured loss")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    bx.hist(resid, bins=min(30, max(5, len(resid) // 4)), orientation="horizontal", color="C0")
    bx.set_xlabel("runs")
    fig.suptitle("Approach 3 residuals")
    return _save(fig, out, "residuals")


def plot_fit(runs: Runs, result: dict, out: str | Path) -> list[str]:
    """Write every plot the result supports; return the files written."""
    out = Path(out)
    paths = []
    if "approach2" in result or len(runs.budgets) > 1:
        paths += plot_isoflop(runs, result, out)
    if "_fit" in result or "approach2" in result:
        paths += plot_optimal(runs, result, out)
    if "_fit" in result:
        paths += plot_contours(runs, result, out)
        paths += plot_residuals(runs, result, out)
    return paths


def plot_loss_curves(sweep_dir: str | Path, extra_runs: list[Path], out: str | Path) -> list[str]:
    """Training loss against FLOPs for every sweep run (coloured by budget) and the final run(s)."""
    plt = _plt()
    sweep_dir = Path(sweep_dir)
    curves = []
    for metrics in sorted(sweep_dir.glob("*/metrics.jsonl")):
        final = metrics.parent / "final.json"
        budget = json.loads(final.read_text()).get("budget") if final.exists() else None
        pts = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        if pts and budget:
            curves.append((budget, pts))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    budgets = sorted({b for b, _ in curves})
    colors = dict(zip(budgets, _colors(len(budgets)), strict=True))
    for b, pts in curves:
        ax.plot([p["flops"] for p in pts], [p["loss"] for p in pts], color=colors[b], lw=0.8, alpha=0.8)
    for b in budgets:
        ax.plot([], [], color=colors[b], label=f"sweep, {b:.2g} FLOPs")
    for i, run in enumerate(extra_runs):
        path = Path(run) / "metrics.jsonl"
        if path.exists():
            pts = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            ax.plot([p["flops"] for p in pts], [p["loss"] for p in pts], color=f"C{3 + i}", lw=1.5,
                    label=f"{Path(run).name} run")
            val = [p for p in pts if "val_loss" in p]
            ax.scatter([p["flops"] for p in val], [p["val_loss"] for p in val], color=f"C{3 + i}", s=14, zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("training loss (nats/token); dots: validation")
    ax.set_title("Loss curves of all runs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, Path(out), "loss_curves")


def plot_compare(result: dict, fits: tuple[dict, dict], out: str | Path) -> list[str]:
    """Two recipes' compute-optimal loss against compute (with bootstrap bands), and the compute multiplier."""
    from flopwise.laws.compare import flops_for_loss, optimal_loss

    plt = _plt()
    level = result["level"]
    flops = [r["flops"] for r in result["budgets"]]
    cs = np.geomspace(min(flops) / 3, max(flops) * 3, 50)
    pct = [50 * (1 - level), 50 * (1 + level)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (name, fit) in enumerate(zip(result["names"], fits, strict=True)):
        point = [float(optimal_loss(fit["_fit"].theta[None, :], c, fit["form"])[0]) for c in cs]
        ax.plot(cs, point, color=f"C{i}", lw=2, label=f"{name} (a = {fit['a']:.3f})")
        if "_thetas" in fit:
            band = np.percentile([optimal_loss(fit["_thetas"], c, fit["form"]) for c in cs], pct, axis=1)
            ax.fill_between(cs, band[0], band[1], color=f"C{i}", alpha=0.2)
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel("loss at the compute-optimal N, D (nats/token)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    (ta, fa), (tb, fb) = ((f.get("_thetas", f["_fit"].theta[None, :]), f["form"]) for f in fits)
    n = min(len(ta), len(tb))
    mult = []
    for c in cs:  # the weaker recipe's FLOPs to reach the stronger one's loss, over C
        la, lb = optimal_loss(ta[:n], c, fa), optimal_loss(tb[:n], c, fb)
        weak_b = np.median(lb) >= np.median(la)
        mult.append(np.where(weak_b, flops_for_loss(tb[:n], la, fb), flops_for_loss(ta[:n], lb, fa)) / c)
    mult = np.array(mult)
    lo, mid, hi = np.percentile(mult, [pct[0], 50, pct[1]], axis=1, method="nearest")  # inf: never reached
    bx.plot(cs, mid, color="k", lw=2, label="compute multiplier (median)")
    bx.fill_between(cs, lo, np.minimum(hi, 1e6), color="grey", alpha=0.3, label=f"{level:.0%} bootstrap interval")
    bx.axhline(1.0, color="k", lw=0.8, ls=":")
    bx.scatter(flops, [r["compute_multiplier"] or np.nan for r in result["budgets"]], color="C3", zorder=3,
               label="at the budgets compared")
    bx.set_xscale("log")
    bx.set_yscale("log")
    bx.set_xlabel("training compute C (FLOPs)")
    bx.set_ylabel("FLOPs the weaker recipe needs / C")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3, which="both")
    fig.suptitle(f"{result['names'][0]} vs {result['names'][1]}")
    return _save(fig, Path(out), "compare")
