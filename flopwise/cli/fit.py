"""flopwise fit."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flopwise.cli.app import app, console, fmt_count, plural, require
from flopwise.errors import FlopwiseError
from flopwise.fsutil import check_output_dir


@app.command()
def fit(
    runs_path: str = typer.Argument(..., metavar="RUNS", help="CSV or JSONL of runs (n_params, n_tokens, loss), "
                                    "or a sweep directory of run folders with final.json."),
    approach: str = typer.Option("all", help="1, 2, 3 or all."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for intervals (0: none)."),
    holdout_largest: int = typer.Option(0, help="Fit without the K largest budgets and predict them."),
    budgets: Optional[str] = typer.Option(None, help="Comma-separated budgets (FLOPs) to report N_opt, D_opt at."),
    convention: str = typer.Option("both", help="What N counts: total, non-embedding, or both (fit each and "
                                   "compare; the law counts total). both needs runs that carry both counts "
                                   "(a sweep folder; a table with n_params_non_embedding), else total."),
    forms: Optional[str] = typer.Option(None, help="Law forms to fit: chinchilla, farseer, data-constrained "
                                        "(comma-separated) or all; with several, each is scored by its error "
                                        "on held-out budgets and the best is the law. Default: all with 3+ "
                                        "budgets, else chinchilla."),
    level: float = typer.Option(0.9, help="Interval level."),
    delta: float = typer.Option(1e-3, help="Huber delta of the Approach 3 objective."),
    degree: int = typer.Option(2, help="IsoFLOP profile: 2 (parabola) or 3 (cubic)."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    workers: Optional[int] = typer.Option(None, help="Processes for the bootstrap (default: all cores)."),
    out: Optional[str] = typer.Option(None, help="Folder for law.json, fit.json and plots "
                                      "(default: RUNS-fit/, or SWEEP_DIR/fit/)."),
    effective_tokens: bool = typer.Option(False, "--effective-tokens", help="Fit on Muennighoff's effective tokens "
                                          "D' where runs repeated their data (needs an epochs column or a sweep)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the plots."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Fit a scaling law to finished runs (Chinchilla Approaches 1-3, bootstrap intervals)."""

    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from flopwise.laws.fit import (  # scipy: loaded by the command, not at start-up
        default_forms,
        fit_runs,
        law_tokens,
        public,
        save_fit,
    )
    from flopwise.laws.forms import parse_forms
    from flopwise.progress import Bar

    require(("--approach", approach, approach in ("1", "2", "3", "all"), "1, 2, 3 or all"),
            ("--bootstrap", bootstrap, 0 <= bootstrap <= 100_000, "between 0 (no intervals) and 100000"),
            ("--holdout-largest", holdout_largest, holdout_largest >= 0, "at least 0"),
            ("--level", level, 0 < level < 1, "in (0, 1), e.g. 0.9"),
            ("--delta", delta, 0 < delta < 10, "between 0 and 10 (the Huber threshold, e.g. 1e-3)"),
            ("--degree", degree, degree in (2, 3), "2 (parabola) or 3 (cubic)"),
            ("--workers", workers, workers is None or workers >= 1, "at least 1"))
    budget_list = [_float(b, "--budgets") for b in budgets.split(",")] if budgets else ()
    require(("--budgets", budgets, all(math.isfinite(b) and b > 0 for b in budget_list),
             "comma-separated positive numbers of FLOPs"))
    if not Path(runs_path).exists():
        raise FlopwiseError(f"{runs_path} does not exist: give a CSV or JSONL of runs, or a sweep folder")
    src = Path(runs_path)
    out_dir = Path(out) if out else (src / "fit" if src.is_dir() else src.with_name(src.stem + "-fit"))
    _check_fit_out(out_dir, src, default=out is None)
    runs, others = _runs_in(runs_path, convention)
    if holdout_largest and holdout_largest >= len(runs.budgets):
        raise FlopwiseError(f"--holdout-largest {holdout_largest} leaves no budget to fit: the runs have "
                            f"{len(runs.budgets)} budget(s), so hold out at most {len(runs.budgets) - 1}")
    form_list = default_forms(runs, approach) if forms is None else parse_forms(forms)
    err = Console(stderr=True)
    shown = not (quiet or as_json)
    lines: dict[str, Bar] = {}  # piped: plain lines per stage (a live bar draws nothing without a terminal)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err, disable=not (shown and err.is_terminal),
                  transient=True) as bar:
        tasks: dict = {}

        def progress(stage: str, done: int, total: int) -> None:
            if err.is_terminal:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(stage, total=total)
                bar.update(tasks[stage], completed=done)
            elif shown:
                if stage not in lines:
                    lines[stage] = Bar(stage, total, console=err)
                lines[stage].update(done)

        result = fit_runs(runs, approach=approach, n_boot=bootstrap, holdout_largest=holdout_largest,
                          min_steps=_sweep_min_steps(src),
                          budgets=budget_list, level=level, seed=seed, delta=delta, degree=degree,
                          workers=workers, progress=progress, effective_data=effective_tokens, forms=form_list,
                          conventions=others)
    save_fit(result, str(src.absolute()), out_dir)
    plots = [] if no_plots else _plots(law_tokens(runs, result), result, out_dir)
    if as_json:
        print(json.dumps({**public(result), "law_file": str(out_dir / "law.json"), "plots": plots}, indent=2))
        return
    print_fit(public(result), out_dir, plots)


def _check_fit_out(out_dir: Path, src: Path, default: bool) -> None:
    """The output folder: new, empty, or an earlier fit of these same runs (which the new fit replaces); the
    default folder (beside or inside the runs) always holds their fit, wherever it was run from."""
    def same_runs(p: Path) -> bool:
        try:
            source = json.loads((p / "law.json").read_text()).get("fit", {}).get("source")
        except (OSError, ValueError, AttributeError):
            return False
        if source is None:
            return True
        if not isinstance(source, str) or "\0" in source:
            return False
        stored = Path(source)
        if default:  # a sweep's fit/ lies inside it; beside a table, the folder must be that table's
            same = src.is_dir() or stored.name == src.name
        elif stored.is_absolute():
            same = stored == src.absolute() or stored.resolve() == src.resolve()
        else:  # written relative to some other working directory: the name is what can be compared
            same = stored.name == src.name
        if not same:
            raise FlopwiseError(f"{p} holds the fit of {source}, not of {src}: choose another --out")
        return True

    check_output_dir(out_dir, "--out", same_runs)


def _runs_in(path: str, convention: str):
    """The runs with N in the law's convention, and the other conventions to compare (``--convention``)."""
    from flopwise.laws.runs import load_runs

    convention = convention.replace("-", "_")
    if convention not in ("total", "non_embedding", "both"):
        raise FlopwiseError(f"--convention must be total, non-embedding or both, got {convention!r}")
    runs = load_runs(path)
    if convention == "both":
        return runs, [c for c in runs.conventions if c != "total"]
    if convention == "non_embedding":  # a table without the column: its N is taken to be non-embedding already
        return (runs.in_convention(convention) if convention in runs.counts else load_runs(path, convention)), []
    return runs, []


def _plots(runs, result, out_dir) -> list[str]:
    from flopwise.report.plots import plot_fit  # matplotlib loads only when plots are made

    return plot_fit(runs, result, out_dir)


def _sweep_min_steps(src: Path) -> int:
    """The step floor a sweep folder was designed with (sweep.json), else the default."""
    from flopwise.laws.trust import MIN_STEPS

    try:
        return int(json.loads((src / "sweep.json").read_text()).get("min_steps", MIN_STEPS))
    except (OSError, ValueError, TypeError):
        return MIN_STEPS


def _float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise FlopwiseError(f"{what}: {text!r} is not a number") from None


def _iv(result: dict, key: str, fmt: str = ".4g") -> str:
    iv = result.get("intervals", {}).get(key)
    return f"[{iv['lower']:{fmt}}, {iv['upper']:{fmt}}]" if iv else "-"


def _with_iv(x: float, iv: dict | None) -> str:
    return fmt_count(x) + (f" [{fmt_count(iv['lower'])}, {fmt_count(iv['upper'])}]" if iv else "")


def print_fit(r: dict, out_dir, plots: list[str]) -> None:
    from rich.panel import Panel

    from flopwise.laws.forms import FORMS

    console.print(f"[bold]{plural(r['n_runs'], 'run')}[/bold], N counted as "
                  f"{r['n_convention'].replace('_', '-')} parameters, D as {r['tokens']} tokens")
    if "forms" in r:
        print_forms(r)
    if "E" in r:
        level = f"{r['level']:.0%}"
        t = Table(title=f"Approach 3, {r['form']} form: L = {FORMS[r['form']].formula}  (Huber δ={r['delta']:g}, "
                        f"objective {r['objective']:.4g})")
        for col in ("parameter", "estimate", f"{level} interval", "s.e."):
            t.add_column(col, justify="right")
        for key in ("E", "A", "B", "alpha", "beta", "gamma", "r_d_star", "a", "b"):
            if key not in r:
                continue
            se = r.get("intervals", {}).get(key, {}).get("se")
            t.add_row(key, f"{r[key]:.4g}", _iv(r, key), "-" if se is None else f"{se:.2g}")
        console.print(t)
        t = Table(title="Compute-optimal allocation under this fit")
        for col in ("budget (FLOPs)", "N_opt", "D_opt", "tokens/param", "loss"):
            t.add_column(col, justify="right")
        for row in r["optimal"]:
            t.add_row(f"{row['flops']:.3g}", _with_iv(row["n_opt"], row.get("n_opt_interval")),
                      _with_iv(row["d_opt"], row.get("d_opt_interval")), f"{row['tokens_per_param']:.3g}",
                      f"{row['loss']:.4f}")
        console.print(t)
    if "conventions" in r:
        print_conventions(r)
    if "approach2" in r:
        a2 = r["approach2"]
        t = Table(title=f"Approach 2: IsoFLOP minima (degree {a2['degree']})")
        for col in ("budget (FLOPs)", "runs", "N_opt", "D_opt", "min loss", "bracketed"):
            t.add_column(col, justify="right")
        for g in a2["groups"]:
            t.add_row(f"{g['flops']:.3g}", str(g["n_runs"]), fmt_count(g["n_opt"]), fmt_count(g["d_opt"]),
                      f"{g['loss_min']:.4f}", "yes" if g["bracketed"] else "[red]no[/red]")
        console.print(t)
        console.print(f"Approach 2: N_opt ∝ C^{a2['a']:.3f} {_iv(a2, 'a', '.3f')}, "
                      f"D_opt ∝ C^{a2['b']:.3f} {_iv(a2, 'b', '.3f')}")
        if a2.get("n_boot_requested") and a2["n_boot"] < a2["n_boot_requested"]:
            console.print(f"[dim]Approach 2's intervals: {a2['n_boot']} of {a2['n_boot_requested']} resamples gave "
                          "every budget an interior minimum; the others were dropped[/dim]")
        if "E" not in r and a2.get("optimal"):
            t = Table(title="Compute-optimal allocation by Approach 2")
            for col in ("budget (FLOPs)", "N_opt", "D_opt", "tokens/param"):
                t.add_column(col, justify="right")
            for row in a2["optimal"]:
                t.add_row(f"{row['flops']:.3g}", fmt_count(row["n_opt"]), fmt_count(row["d_opt"]),
                          f"{row['tokens_per_param']:.3g}")
            console.print(t)
    if "approach1" in r and r["approach1"].get("a") is not None:
        a1 = r["approach1"]
        console.print(f"Approach 1 (curve envelope): N_opt ∝ C^{a1['a']:.3f}, D_opt ∝ C^{a1['b']:.3f}")
    if "holdout" in r:
        h = r["holdout"]
        cov = (f"; the {h['level']:.0%} interval of the law covers {h['coverage']:.0%} of them, the predictive "
               f"interval (with the runs' scatter) {h['predictive_coverage']:.0%}" if "coverage" in h else "")
        console.print(Panel(
            f"Fitted without the {h['k']} largest budget(s) ({', '.join(f'{c:.3g}' for c in h['held_out_budgets'])} "
            f"FLOPs), the law predicts their {h['n_test']} runs' losses with mean |error| "
            f"[bold]{h['mean_abs_rel_error']:.2%}[/bold] (max {h['max_abs_rel_error']:.2%}, mean signed "
            f"{h['mean_rel_error']:+.2%}){cov}.", title="Extrapolation check: the number to trust"))
    for w in r["warnings"]:
        console.print(f"[yellow]warning: {w}[/yellow]")
    print_verdict(r["verdict"], r["checks"])
    console.print(f"[dim]law: {out_dir / 'law.json'} (use: flopwise plan --law {out_dir / 'law.json'}); "
                  f"details: {out_dir / 'fit.json'}; plots: {len(plots)} files[/dim]")




def _conv(name: str) -> str:
    return {"non_embedding": "non-emb"}.get(name, name)


def print_forms(r: dict) -> None:
    """Law forms x conventions, each scored by its error on the held-out budgets."""
    k = r["holdout"]["k"] if "holdout" in r else 1
    t = Table(title=f"Law forms fitted without the {k} largest budget(s), scored on them")
    for col in ("form", "N", "p", "a", "held-out", "cover", "score", ""):
        t.add_column(col, justify="left" if col in ("form", "N", "") else "right", no_wrap=True,
                     min_width=16 if col == "form" else None)
    for row in r["forms"]:
        if "skipped" in row:
            t.add_row(row["form"], _conv(row["convention"]), str(row["n_params"]), "-", "-", "-", "-", "skipped")
            continue
        cov = "-" if row.get("coverage") is None else f"{row['coverage']:.0%}"
        note = "[bold green]selected[/bold green]" if row.get("selected") else (
            "" if row["usable"] else f"[yellow]unfit: {', '.join(row['problems'])}[/yellow]")
        t.add_row(row["form"], _conv(row["convention"]), str(row["n_params"]), f"{row['a']:.3f}",
                  f"{row['holdout_error']:.2%}", cov, f"{row['score']:.4f}", note)
    console.print(t)
    console.print(f"[dim]p: fitted parameters; held-out: mean |relative error| of the loss on the held-out runs; "
                  f"cover: of them inside the predictive interval; score: held-out error + 10% per parameter "
                  f"beyond 5. Selected {r['selected']['form']} ({_conv(r['selected']['convention'])} N): "
                  f"{r['selected']['why']}.[/dim]")
    for row in r["forms"]:
        if "skipped" in row:
            console.print(f"[dim]{row['form']} ({_conv(row['convention'])}) skipped: {row['skipped']}[/dim]")
        elif not row["usable"]:
            console.print(f"[dim]{row['form']} ({_conv(row['convention'])}) not identified: "
                          f"{', '.join(row['problems'])} (a parameter on its bound, a negligible term, or no optimum)"
                          "[/dim]")


def print_conventions(r: dict) -> None:
    """The same form fitted with N counted each way: exponents and the plan at each budget."""
    t = Table(title=f"N counted each way ({r['form']} form; C = 6ND in that N)")
    for col in ("N", "a [90%]", "C (FLOPs)", "N_opt", "D_opt", "D/N"):
        t.add_column(col, justify="right" if col != "N" else "left")
    for conv, b in r["conventions"].items():
        iv = b.get("a_interval")
        a = f"{b['a']:.3f}" + (f" [{iv['lower']:.2f}, {iv['upper']:.2f}]" if iv else "")
        for i, row in enumerate(b["optimal"]):
            t.add_row(_conv(conv) if i == 0 else "", a if i == 0 else "", f"{row['flops']:.3g}",
                      fmt_count(row["n_opt"]), fmt_count(row["d_opt"]), f"{row['tokens_per_param']:.3g}")
    console.print(t)
    console.print(f"[dim]the conventions' D_opt differ by up to {r['convention_factor']:.2f}x; the law "
                  f"(law.json) counts {r['n_convention'].replace('_', '-')} parameters[/dim]")


def print_verdict(verdict: str, checks: list[dict]) -> None:
    """The trust verdict and every check behind it (flopwise.laws.trust)."""
    colour = {"sound": "green", "usable with caveats": "yellow"}.get(verdict, "red")
    t = Table(title=f"Verdict: [bold {colour}]{verdict}[/bold {colour}]")
    for col in ("check", "value", "threshold", "", "what it saw"):
        t.add_column(col)
    for c in checks:
        mark = "[green]pass[/green]" if c["passed"] else \
            ("[red]FAIL[/red]" if c["severity"] == "critical" else "[yellow]caveat[/yellow]")
        value = ", ".join(map(str, c["value"])) or "none" if isinstance(c["value"], list) else str(c["value"])
        t.add_row(c["name"], value, c["threshold"], mark, c["why"])
    console.print(t)
