"""flopwise sweep and flopwise autopilot."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flopwise.cli.app import app, console, fmt_count, log_to_option, plural, require, set_threads, threads_option, warn
from flopwise.config import AutopilotConfig, sweep_train_options
from flopwise.data.prepare import resolve_corpus
from flopwise.errors import FlopwiseError
from flopwise.fsutil import check_output_dir
from flopwise.laws.allocate import check_flops
from flopwise.laws.law import load_law
from flopwise.progress import Bar
from flopwise.sweep.design import (
    check_corpus,
    check_feasible,
    design_sweep,
    design_wsd_sweep,
    equivalent_cosine_flops,
    log_spaced,
    read_design,
    smallest_budget,
    total_flops,
    write_design,
)

A = AutopilotConfig()  # the defaults shown and used
sweep_app = typer.Typer(no_args_is_help=True, help="IsoFLOP sweeps: run, status, compare.")
app.add_typer(sweep_app, name="sweep")


def _budgets(budgets: Optional[str], min_flops: Optional[float], max_flops: Optional[float], n_budgets: int,
             works=None):
    if budgets and budgets.strip().lower() == "auto":  # the smallest informative sweep: b, 2.5b, 6.25b, ...
        def ladder(b: float) -> list[float]:
            return [b * A.budget_ratio**k for k in range(n_budgets)]
        return ladder(smallest_budget(lambda b: works(ladder(b))))
    if budgets:
        try:
            out = [float(b) for b in budgets.split(",")]
        except ValueError:
            raise FlopwiseError(f"--budgets must be comma-separated numbers, got {budgets!r}") from None
        for b in out:
            check_flops(b, "--budgets")
        return out
    if min_flops is None or max_flops is None:
        raise FlopwiseError("give --budgets 1e12,3e12,1e13 or --min-flops and --max-flops")
    return log_spaced(check_flops(min_flops, "--min-flops"), check_flops(max_flops, "--max-flops"), n_budgets)


@sweep_app.command("run")
def sweep_run(
    out: str = typer.Option(..., help="Sweep folder (sweep.json and one run directory per run)."),
    data: Optional[str] = typer.Option(None, help="Prepared corpus or text (default: the bundled sample)."),
    budgets: Optional[str] = typer.Option(None, help="Comma-separated FLOP budgets, or 'auto': the smallest "
                                          "informative sweep (--n-budgets budgets 2.5x apart)."),
    min_flops: Optional[float] = typer.Option(None, help="Smallest budget (with --max-flops)."),
    max_flops: Optional[float] = typer.Option(None, help="Largest budget."),
    n_budgets: int = typer.Option(A.n_budgets, help="Budgets between --min-flops and --max-flops."),
    sizes: int = typer.Option(A.n_sizes, help="Model sizes per budget."),
    spread: float = typer.Option(A.spread, help="Sizes span N_opt/spread to N_opt*spread (prior law's N_opt)."),
    prior: str = typer.Option(A.prior, help="Law that centres the sizes."),
    vocab_size: int = typer.Option(A.vocab_size, help="Vocabulary when --data needs preparing."),
    seq_len: int = typer.Option(A.seq_len, help="Context length of every run."),
    workers: int = typer.Option(A.workers, help="Parallel runs (0: one per core)."),
    threads: int = threads_option(),
    ray: Optional[str] = typer.Option(None, help="Run on Ray: 'local' or a cluster address."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the runs and an ETA; train nothing."),
    schedule: str = typer.Option("cosine", help="cosine (independent runs) or wsd (shared constant-LR trunks "
                                 "with cooldown branches, Hägele et al. 2024)."),
    cooldown_fraction: float = typer.Option(0.2, help="WSD: fraction of each run's steps in its cooldown."),
    optimizer: str = typer.Option(A.optimizer, help="muon or adamw (see 'flopwise train --help'); compare two "
                                  "sweeps with 'flopwise sweep compare'."),
    min_steps: int = typer.Option(A.min_steps, help="Optimizer steps every run gets at least (small budgets shrink "
                                  "the batch for it; a budget that still falls short is refused)."),
    log_to: str = log_to_option(),
    quiet: bool = typer.Option(False, "--quiet"),
) -> None:
    """Design (or resume) an IsoFLOP sweep and train its runs."""
    require(("--n-budgets", n_budgets, 1 <= n_budgets <= 10, "between 1 and 10"))
    AutopilotConfig(n_sizes=sizes, n_budgets=max(n_budgets, 2), vocab_size=vocab_size, seq_len=seq_len,
                    workers=workers, min_steps=min_steps, optimizer=optimizer, log_to=log_to).check()
    require(("--spread", spread, 1 < spread <= 100, "between 1 and 100 (sizes span N_opt/spread to N_opt*spread)"),
            ("--schedule", schedule, schedule in ("cosine", "wsd"), "cosine or wsd"),
            ("--cooldown-fraction", cooldown_fraction, 0 < cooldown_fraction < 1, "between 0 and 1"))
    load_law(prior)  # an unknown --prior fails here, naming the laws there are
    set_threads(threads)
    # torch-heavy modules load when the command runs, so the CLI starts fast for plan and fit
    from flopwise.sweep.runner import default_workers, eta_line, run_sweep, unfinished, worker_pool, worker_threads

    sweep_dir = Path(out)
    check_output_dir(sweep_dir, "--out", lambda p: (p / "sweep.json").exists())
    corpus = resolve_corpus(data, vocab_size, log=warn)
    check_corpus(corpus.meta, seq_len)
    design = design_wsd_sweep if schedule == "wsd" else design_sweep
    extra = {"cooldown_fraction": cooldown_fraction} if schedule == "wsd" else {}

    def make(bs: list[float]):
        return design(bs, corpus.vocab_size, seq_len, sizes, spread, prior, min_steps=min_steps, **extra)

    def works(bs: list[float]) -> bool:
        try:
            return bool(make(bs))
        except FlopwiseError:
            return False

    specs = make(_budgets(budgets, min_flops, max_flops, n_budgets, works))
    check_feasible(specs, corpus.meta["n_tokens_train"])
    meta = {"corpus": str(corpus.path), "corpus_hash": corpus.meta["hash"],
            "budgets": sorted({s.budget for s in specs}),
            "prior": prior, "train_options": sweep_train_options(AutopilotConfig(optimizer=optimizer, log_to=log_to)),
            "schedule": schedule,
            "min_steps": min_steps}
    if (sweep_dir / "sweep.json").exists():
        old, old_meta = read_design(sweep_dir)
        if [s.__dict__ for s in old] != [s.__dict__ for s in specs]:
            raise FlopwiseError(f"{sweep_dir} holds another sweep: resume it with the same options, or choose "
                                "another --out")
        if (was := old_meta["train_options"]["optimizer"]) != optimizer:  # read_design: adamw if unrecorded
            raise FlopwiseError(f"{sweep_dir} holds a sweep trained with {was}: resume it with --optimizer {was}, "
                                "or choose another --out")
        before = old_meta.get("train_options", {}).get("log_to", "none")
        if before != log_to:
            warn(f"note: --log-to {log_to} is not applied: the sweep's runs keep the tracker they were designed "
                 f"with ({before})")
    workers = workers or default_workers(len(specs))
    threads, _ = worker_threads(workers)
    t = Table(title=f"IsoFLOP sweep: {plural(len(specs), 'run')}, {total_flops(specs):.3g} FLOPs")
    for col in ("run", "budget", "N", "shape", "D", "batch", "steps", "tokens/param", "epochs"):
        t.add_column(col, justify="right")
    for s in specs:
        batch = s.options.get("batch_tokens", 0)
        t.add_row(s.name, f"{s.budget:.3g}" if s.budget else "trunk", fmt_count(s.n_params),
                  f"d{s.shape['d_model']} L{s.shape['n_layers']}", fmt_count(s.n_tokens), fmt_count(batch),
                  str((s.n_tokens - s.start_tokens) // batch) if batch else "-", f"{s.n_tokens / s.n_params:.1f}",
                  f"{s.n_tokens / corpus.meta['n_tokens_train']:.2f}")
    todo = unfinished(sweep_dir, specs)
    # the workers start while this process builds the C step and measures (on Ray, or with nothing to train: none)
    with worker_pool(min(workers, len(todo)) if ray is None else 1) as pool:
        if not quiet or dry_run:
            console.print(t)
            if schedule == "wsd":
                cos = equivalent_cosine_flops(specs)
                console.print(f"WSD: {total_flops(specs):.3g} FLOPs for runs that cost {cos:.3g} FLOPs as "
                              f"independent cosine runs ({1 - total_flops(specs) / cos:.0%} saved)")
            console.print(eta_line(todo, workers, threads, pool))
        if dry_run:
            return
        if not (sweep_dir / "sweep.json").exists():
            write_design(sweep_dir, specs, meta)
        with Bar("sweep", total_flops(specs), total_flops(specs) - total_flops(todo), quiet=quiet) as bar:
            run_sweep(sweep_dir, workers, ray_address=ray, pool=pool,
                      progress=lambda d, tot, k, n: bar.update(d, f"{k}/{n} runs"))
    sweep_status(out)


@sweep_app.command("compare")
def sweep_compare(
    sweep_a: str = typer.Argument(..., metavar="SWEEP_A", help="A sweep folder (or a runs table)."),
    sweep_b: str = typer.Argument(..., metavar="SWEEP_B",
                                  help="Another, e.g. the same budgets with --optimizer adamw."),
    budgets: Optional[str] = typer.Option(None, help="Comma-separated FLOP budgets to compare at (default: the "
                                          "sweeps' budgets, and 10x and 100x the largest)."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples of each fit (0: no intervals)."),
    level: float = typer.Option(0.9, help="Interval level."),
    out: Optional[str] = typer.Option(None, help="Folder for compare.json and the plot (default: "
                                      "SWEEP_A-vs-SWEEP_B beside SWEEP_A)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the plot."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Fit two sweeps and say what one recipe is worth against the other in FLOPs (the compute multiplier)."""
    import json

    import numpy as np

    from flopwise.fsutil import atomic_write_text
    from flopwise.laws.compare import compare_laws
    from flopwise.laws.fit import fit_runs, public
    from flopwise.laws.runs import load_runs
    from flopwise.laws.trust import NOT_INFORMATIVE

    require(("--bootstrap", bootstrap, 0 <= bootstrap <= 100_000, "between 0 (no intervals) and 100000"),
            ("--level", level, 0 < level < 1, "in (0, 1), e.g. 0.9"))
    paths = [Path(sweep_a), Path(sweep_b)]
    try:
        at = [float(c) for c in budgets.split(",")] if budgets else None
    except ValueError:
        raise FlopwiseError(f"--budgets must be comma-separated numbers of FLOPs, got {budgets!r}") from None
    if at is not None and not all(np.isfinite(c) and c > 0 for c in at):
        raise FlopwiseError(f"--budgets must be positive numbers of FLOPs, got {budgets!r}")
    runs = [load_runs(p) for p in paths]
    warnings = _comparable(paths)
    opts = [r.optimizer or p.name for r, p in zip(runs, paths, strict=True)]
    names = opts if opts[0] != opts[1] else [p.name for p in paths]
    if names[0] == names[1]:
        names = [f"{names[0]} (A)", f"{names[1]} (B)"]
    # as the autopilot fits: D' where runs repeated their data (both sweeps alike; D' = D for runs that did not)
    effective = any(r.repeated for r in runs) and all(r.epochs is not None for r in runs)
    fits = []
    with Bar("fit", 2 * max(bootstrap, 1), quiet=as_json) as bar:
        for i, r in enumerate(runs):  # different seeds: the two fits' bootstrap samples are independent
            fits.append(fit_runs(r, approach="all", n_boot=bootstrap, level=level, effective_data=effective, seed=i,
                                 progress=lambda stage, done, total, i=i: bar.update(i * bootstrap + done, stage)))
    for name, f in zip(names, fits, strict=True):
        warnings += [f"{name}: {w}" for w in f["warnings"]]
        if f["verdict"] == NOT_INFORMATIVE:
            warnings.append(f"{name}: the fit is not informative (see 'flopwise fit {paths[names.index(name)]}'): "
                            "its multipliers say little")
    top = max(float(max(r.budgets)) for r in runs)
    at = at or sorted({float(c) for r in runs for c in r.budgets} | {10 * top, 100 * top})
    result = compare_laws(fits[0], fits[1], at, tuple(names), level)
    result["warnings"] = warnings
    result["sweeps"] = [str(p) for p in paths]
    result["tokens"] = "effective" if effective else "raw"
    result["fits"] = {n: {k: v for k, v in public(f).items() if k in ("E", "A", "B", "alpha", "beta", "a", "b",
                                                                      "intervals", "verdict", "warnings")}
                      for n, f in zip(names, fits, strict=True)}
    out_dir = Path(out) if out else paths[0].parent / f"{paths[0].name}-vs-{paths[1].name}"
    check_output_dir(out_dir, "--out", lambda p: (p / "compare.json").exists())
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [] if no_plots or bootstrap == 0 else _compare_plot(result, fits, out_dir)
    atomic_write_text(out_dir / "compare.json", json.dumps(result, indent=2) + "\n")
    if as_json:
        print(json.dumps({**result, "plots": plots}, indent=2))
        return
    t = Table(title=f"{names[0]} vs {names[1]}: loss at the compute-optimal allocation, and the compute multiplier")
    for col in ("C (FLOPs)", names[0], names[1], "B - A", "stronger", f"multiplier [{level:.0%}]"):
        t.add_column(col, justify="right")
    def bound(x):
        return "∞" if x is None else f"{x:.2f}"

    for row in result["budgets"]:
        iv = row["compute_multiplier_interval"]
        m = row["compute_multiplier"]
        mult = ("never" if m is None else f"{m:.2f}") + (f" [{bound(iv['lower'])}, {bound(iv['upper'])}]" if iv else "")
        t.add_row(f"{row['flops']:.3g}", f"{row['loss_' + names[0]]:.4f}", f"{row['loss_' + names[1]]:.4f}",
                  f"{row['loss_difference']:+.4f}", row["stronger"], mult)
    console.print(t)
    for name in names:
        e = result["exponents"][name]
        iv = e["a_interval"]
        console.print(f"{name}: N_opt ∝ C^{e['a']:.3f}" + (f" [{iv['lower']:.2f}, {iv['upper']:.2f}]" if iv else "")
                      + f", verdict {e['verdict']}")
    for w in warnings:
        console.print(f"[yellow]warning: {w}[/yellow]")
    console.print("[dim]multiplier: the FLOPs the weaker recipe needs to reach the loss the stronger reaches with C, "
                  "over C (1: equal); budgets beyond the sweeps extrapolate both laws.[/dim]")
    console.print(f"[dim]{out_dir / 'compare.json'}; plots: {len(plots)} files[/dim]")


def _comparable(paths: list[Path]) -> list[str]:
    """Warnings where two sweeps' losses do not measure the same thing (another corpus, vocabulary or context)."""
    import json

    metas = []
    for p in paths:
        try:
            metas.append(json.loads((p / "sweep.json").read_text()))
        except (OSError, ValueError):
            return []  # a runs table, or a folder without its design: nothing to check against
    out = []
    if metas[0].get("corpus_hash") != metas[1].get("corpus_hash"):
        out.append("the sweeps trained on different corpora: their losses (nats/token) do not compare")
    shapes = [{(r["shape"]["vocab_size"], r["shape"]["seq_len"]) for r in m.get("runs", [])} for m in metas]
    if shapes[0] != shapes[1]:
        out.append("the sweeps use different vocabularies or contexts: their losses do not compare")
    return out


def _compare_plot(result: dict, fits, out_dir: Path) -> list[str]:
    from flopwise.report.plots import plot_compare  # matplotlib loads only when plots are made

    return plot_compare(result, fits, out_dir)


@sweep_app.command("status")
def sweep_status(sweep_dir: str = typer.Argument(..., metavar="SWEEP_DIR")) -> None:
    """Done / running / partial / missing runs of a sweep, with losses."""
    from flopwise.sweep.runner import status  # torch: loaded by the command, not at start-up

    rows = status(sweep_dir)
    t = Table(title=f"{sweep_dir}")
    for col in ("run", "budget", "N", "D", "state", "val loss"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r["name"], f"{r['budget']:.3g}", fmt_count(r["n_params"]), fmt_count(r["n_tokens"]), r["state"],
                  f"{r['val_loss']:.4f}" if "val_loss" in r else "-")
    console.print(t)
    counts = {s: sum(r["state"] == s for r in rows) for s in ("done", "running", "partial", "missing")}
    console.print(", ".join(f"{v} {k}" for k, v in counts.items()))


@app.command()
def autopilot(
    data: Optional[str] = typer.Option(None, help="Text, folder or prepared corpus (default: bundled TinyStories)."),
    budget: Optional[str] = typer.Option(None, help=f"Total FLOPs (default {A.budget_flops:g}: ~8-12 min on a 2-core "
                                         "CPU), or 'auto': the smallest whose sweep is informative on this corpus."),
    gpu: Optional[str] = typer.Option(None, help="Budget as GPU time: GPU type (with --hours)."),
    gpus: int = typer.Option(1, help="Number of GPUs (with --hours)."),
    hours: Optional[float] = typer.Option(None, help="Budget as hours on --gpus x --gpu."),
    mfu: float = typer.Option(0.4, help="MFU assumed to turn GPU hours into FLOPs."),
    sweep_fraction: float = typer.Option(A.sweep_fraction, help="Share of the budget spent on the sweep."),
    sizes: int = typer.Option(A.n_sizes, help="Model sizes per sweep budget."),
    n_budgets: int = typer.Option(A.n_budgets, help="Sweep budgets."),
    vocab_size: int = typer.Option(A.vocab_size, help="Tokenizer vocabulary."),
    seq_len: int = typer.Option(A.seq_len, help="Context length."),
    bootstrap: int = typer.Option(A.bootstrap, help="Bootstrap resamples of the fit."),
    min_steps: int = typer.Option(A.min_steps, help="Optimizer steps every sweep run gets at least."),
    compare: bool = typer.Option(False, "--compare", help="Also train a 4x larger model with the final budget."),
    optimizer: str = typer.Option(A.optimizer, help="muon or adamw, for the sweep and the final run."),
    compare_optimizer: Optional[str] = typer.Option(None, help="Also run the sweep with this optimizer (the other "
                                                    "one; its FLOPs come on top of the budget) and report what "
                                                    "it is worth in FLOPs."),
    resume: bool = typer.Option(False, "--resume", help="Finish the sweep already in --out, whatever its design."),
    workers: int = typer.Option(A.workers, help="Parallel sweep runs (0: one per core)."),
    threads: int = threads_option(),
    log_to: str = log_to_option(),
    seed: int = typer.Option(A.seed, help="Seed of everything."),
    out: str = typer.Option("autopilot", help="Output folder."),
    quiet: bool = typer.Option(False, "--quiet", help="Only the closing summary."),
) -> None:
    """Sweep -> fit -> plan -> train -> compare -> report, on the bundled corpus by default."""
    require(("--gpus", gpus, gpus >= 1, "at least 1"),
            ("--mfu", mfu, 0 < mfu <= 1, "in (0, 1], e.g. 0.4"),
            ("--hours", hours, hours is None or 0 < hours < 1e6, "a positive number of hours (below 1e6)"))
    set_threads(threads)
    from flopwise.autopilot import autopilot as run_autopilot  # torch: loaded by the command
    from flopwise.laws.plan import budget_flops

    auto = budget is not None and budget.strip().lower() == "auto"
    if auto and hours is not None:
        raise FlopwiseError("give --budget auto or --hours, not both")
    if budget is not None and hours is not None:
        raise FlopwiseError("give --budget or --gpu with --hours, not both")
    if (hours is None) != (gpu is None):
        raise FlopwiseError("a GPU-time budget needs both --gpu TYPE and --hours H (e.g. --gpu h100 --hours 2)")
    flops = (None if auto else check_flops(_number(budget, "--budget"), "--budget") if budget is not None else
             budget_flops(None, gpu, gpus, hours, None, mfu) if hours is not None else A.budget_flops)
    cfg = AutopilotConfig(budget_flops=flops, sweep_fraction=sweep_fraction, n_budgets=n_budgets, n_sizes=sizes,
                          min_steps=min_steps,
                          vocab_size=vocab_size, seq_len=seq_len, workers=workers, bootstrap=bootstrap, seed=seed,
                          compare=compare, resume=resume, optimizer=optimizer, compare_optimizer=compare_optimizer,
                          log_to=log_to)
    if not quiet:
        console.print(f"[bold]flopwise autopilot[/bold]: budget {'auto' if auto else f'{flops:.3g} FLOPs'}, "
                      f"{sweep_fraction:.0%} for the sweep, output {out}/")
    s = run_autopilot(out, data, cfg, log=(lambda m: None) if quiet else console.print,
                      progress=not quiet)
    lo, hi = s["predicted_loss_interval"]
    console.print(f"\n[bold]report:[/bold] {Path(out) / 'report.html'} (and report.md, summary.json)")
    console.print(f"  verdict: [bold]{s['verdict']}[/bold]; planned with the {s['law_used']['law']} law")
    word = "optimal" if s["verdict"] == "sound" else "planned"
    console.print(f"  {word} for {s['final_flops']:.3g} FLOPs: N = {fmt_count(s['n_params_opt'])} params, "
                  f"D = {fmt_count(s['n_tokens_opt'])} tokens ({s['epochs']:.1f} epochs)")
    console.print(f"  loss: predicted {s['predicted_loss']:.3f} [{lo:.3f}, {hi:.3f}], measured {s['measured_loss']:.3f}"
                  + ("" if s["measured_in_interval"] else f" (outside the interval by {s['interval_miss']:.3f})"))
    console.print(f"  bigger is not better: the {fmt_count(s['bigger_model_n_params'])} model at "
                  f"{s['bigger_model_budget']:.3g} FLOPs lost {s['bigger_model_loss_gap']:+.3f} nats/token against "
                  f"the best size ({fmt_count(s['best_at_that_budget_n_params'])})")


def _number(text: str, option: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FlopwiseError(f"{option} must be a number of FLOPs (e.g. 5e13) or 'auto', got {text!r}") from None
