"""The ``flopwise`` command: a thin Typer layer over the library.

Heavy imports (torch) happen inside the commands that need them, so ``flopwise plan`` and
``flopwise fit`` start fast.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flopwise import __version__
from flopwise.errors import FlopwiseError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="flopwise: the best small language model a compute budget can buy.")
hw_app = typer.Typer(no_args_is_help=True, help="Hardware presets and measurements.")
app.add_typer(hw_app, name="hw")
console = Console()


def _version(value: bool) -> None:
    if value:
        print(f"flopwise {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def fmt_count(x: float | None) -> str:
    """1.23e9 -> '1.23B'."""
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def fmt_hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.3g} s"
    if h < 1:
        return f"{h * 60:.3g} min"
    if h < 48:
        return f"{h:.3g} h"
    return f"{h / 24:.3g} days"


_SIZE = re.compile(r"^\s*([0-9.eE+-]+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> float:
    """'4GB' / '512MiB' / '8e9' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise FlopwiseError(f"cannot read {text!r} as a size: write e.g. 4GB, 512MiB or 8e9")
    unit = (m.group(2) or "").lower()
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit[:1]]
    if "i" in unit:
        scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit[:1]]
    try:
        return float(m.group(1)) * scale
    except ValueError:
        raise FlopwiseError(f"cannot read {text!r} as a size: write e.g. 4GB, 512MiB or 8e9") from None


@app.command()
def plan(
    flops: Optional[float] = typer.Option(None, help="Training budget in FLOPs, e.g. 1e21."),
    gpu: Optional[str] = typer.Option(None, help="GPU type for a GPU-hours or dollar budget, and for time/cost "
                                      "(default h100; 'local' uses 'flopwise hw probe')."),
    gpus: int = typer.Option(1, help="Number of GPUs."),
    hours: Optional[float] = typer.Option(None, help="Wall-clock hours on --gpus x --gpu."),
    dollars: Optional[float] = typer.Option(None, help="Budget in dollars at --price-per-hour."),
    mfu: float = typer.Option(0.40, help="Model FLOP utilisation assumed for time and cost."),
    price_per_hour: Optional[float] = typer.Option(None, help="Dollars per GPU-hour (default: the preset's)."),
    law: str = typer.Option("chinchilla", help="Registry name (see 'flopwise laws') or a law JSON file."),
    inference_tokens: Optional[float] = typer.Option(None, help="Lifetime tokens the model will serve."),
    unique_tokens: Optional[float] = typer.Option(None, help="Unique training tokens available (repeats "
                                                  "cost effectiveness)."),
    device: Optional[str] = typer.Option(None, help="Target device whose memory caps N: rpi5, phone, laptop, m2."),
    bits: int = typer.Option(4, help="Weight bits on the device: 4, 8, 16 or 32."),
    max_memory: Optional[str] = typer.Option(None, help="Memory for weights instead of --device, e.g. 4GB."),
    vocab_size: Optional[int] = typer.Option(None, help="Vocabulary of the suggested shape (default by size)."),
    seq_len: int = typer.Option(2048, help="Context length of the suggested shape."),
    exact: bool = typer.Option(False, "--exact", help="Optimise under the exact FLOP count of real shapes."),
    pue: float = typer.Option(1.2, help="Data-centre power usage effectiveness for energy."),
    carbon: float = typer.Option(0.4, help="Grid carbon intensity, kg CO2e per kWh."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Compute-optimal N, D, shape, loss, time, cost and energy for a budget."""
    from flopwise.laws.plan import budget_flops, make_plan

    budget = budget_flops(flops, gpu, gpus, hours, dollars, mfu, price_per_hour)
    p = make_plan(budget, law, inference_tokens=inference_tokens, unique_tokens=unique_tokens, device=device,
                  bits=bits, max_memory_bytes=parse_bytes(max_memory) if max_memory else None, gpu=gpu or "h100",
                  n_gpus=gpus, mfu=mfu, price_per_hour=price_per_hour, pue=pue, carbon_kg_per_kwh=carbon,
                  vocab_size=vocab_size, seq_len=seq_len, exact_flops=exact)
    if as_json:
        print(json.dumps(p, indent=2))
        return
    print_plan(p)


def print_plan(p: dict) -> None:
    s, c = p["shape"], p["compute"]
    conv = "total" if p["n_convention"] == "total" else "non-embedding"
    t = Table(title=f"flopwise plan  ·  {p['budget_flops']:.3g} FLOPs  ·  law {p['law']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("parameters N", f"{fmt_count(p['n_params'])} ({conv} convention)")
    t.add_row("tokens D", fmt_count(p["n_tokens"]))
    t.add_row("tokens / parameter", f"{p['tokens_per_param']:.1f}")
    t.add_row("expected loss", "-" if p["loss"] is None else f"{p['loss']:.4f} nats/token")
    t.add_row("shape", f"{s['n_layers']} layers × d_model {s['d_model']}, {s['n_heads']} heads "
              f"({s['n_kv_heads']} kv), d_ff {s['d_ff']}, vocab {s['vocab_size']}, ctx {s['seq_len']}"
              f"{', tied' if s['tie_embeddings'] else ''}")
    t.add_row("shape's N", f"{s['n_params_total']:,} total, {s['n_params_non_embedding']:,} non-embedding")
    t.add_row("training FLOPs", f"{p['flops']:.3g} by 6ND; {p['flops_exact']:.3g} by exact count "
              f"({s['training_flops_per_token']:,} FLOPs/token)")
    t.add_row("time", f"{fmt_hours(c['hours'])} on {c['n_gpus']} × {c['gpu']} at {c['mfu']:.0%} MFU")
    t.add_row("cost", f"${c['dollars']:,.0f} at ${c['price_per_hour']:.2f}/GPU-hour")
    t.add_row("energy", f"{c['kwh']:,.3g} kWh (PUE {c['pue']}), {c['co2e_kg']:,.3g} kg CO2e "
              f"at {c['carbon_kg_per_kwh']} kg/kWh")
    if "data_constrained" in p:
        dc = p["data_constrained"]
        t.add_row("epochs of data", f"{dc['epochs']:.2f} over {fmt_count(dc['unique_tokens'])} unique tokens "
                  f"(effective {fmt_count(dc['effective_tokens'])})")
    if "inference" in p:
        inf = p["inference"]
        t.add_row("lifetime FLOPs", f"{inf['total_flops']:.3g} (train {inf['training_flops']:.3g} + serve "
                  f"{inf['inference_flops']:.3g}); {inf['saving']:.1%} less than the compute-optimal "
                  f"{fmt_count(inf['compute_optimal_n_params'])} model")
    if "device" in p:
        dv = p["device"]
        speed = f", about {dv['decode_tokens_per_s']:.3g} tokens/s decode (bandwidth bound)" \
            if dv["decode_tokens_per_s"] else ""
        t.add_row("device", f"{dv['name']}: {dv['bits']}-bit weights {dv['weight_bytes'] / 1e9:.3g} GB "
                  f"(max N {fmt_count(dv['max_params'])}){speed}")
    console.print(t)
    if p["tradeoff"]:
        tt = Table(title="Same compute, other sizes (bigger is not better)")
        for col in ("N", "× N_opt", "D", "tokens/param", "loss", "vs optimum"):
            tt.add_column(col, justify="right")
        for r in p["tradeoff"]:
            tt.add_row(fmt_count(r["n_params"]), f"{r['factor']:g}", fmt_count(r["n_tokens"]),
                       f"{r['tokens_per_param']:.3g}", f"{r['loss']:.4f}",
                       "optimum" if r["factor"] == 1 else f"+{r['loss_excess']:.4f}")
        console.print(tt)
    for note in p["notes"]:
        console.print(f"[dim]note: {note}[/dim]")
    for w in p["warnings"]:
        console.print(f"[yellow]warning: {w}[/yellow]")
    console.print(f"[dim]{p['citation']}[/dim]")


@app.command()
def fit(
    runs_path: str = typer.Argument(..., metavar="RUNS", help="CSV or JSONL of runs (n_params, n_tokens, loss), "
                                    "or a sweep directory of run folders with final.json."),
    approach: str = typer.Option("all", help="1, 2, 3 or all."),
    bootstrap: int = typer.Option(1000, help="Bootstrap resamples for intervals (0: none)."),
    holdout_largest: int = typer.Option(0, help="Fit without the K largest budgets and predict them."),
    budgets: Optional[str] = typer.Option(None, help="Comma-separated budgets (FLOPs) to report N_opt, D_opt at."),
    convention: str = typer.Option("total", help="What N in the table counts: total or non_embedding."),
    level: float = typer.Option(0.9, help="Interval level."),
    delta: float = typer.Option(1e-3, help="Huber delta of the Approach 3 objective."),
    degree: int = typer.Option(2, help="IsoFLOP profile: 2 (parabola) or 3 (cubic)."),
    seed: int = typer.Option(0, help="Bootstrap seed."),
    workers: Optional[int] = typer.Option(None, help="Processes for the bootstrap (default: all cores)."),
    out: Optional[str] = typer.Option(None, help="Folder for law.json, fit.json and plots "
                                      "(default: RUNS-fit/, or SWEEP_DIR/fit/)."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Skip the plots."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Fit a scaling law to finished runs (Chinchilla Approaches 1-3, bootstrap intervals)."""
    from pathlib import Path

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from flopwise.fsutil import atomic_write_text
    from flopwise.laws.fit import fit_runs, law_json, public
    from flopwise.laws.runs import load_runs

    runs = load_runs(runs_path, convention.replace("-", "_"))
    budget_list = [_float(b, "--budgets") for b in budgets.split(",")] if budgets else ()
    src = Path(runs_path)
    out_dir = Path(out) if out else (src / "fit" if src.is_dir() else src.with_name(src.stem + "-fit"))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=Console(stderr=True), disable=quiet or as_json,
                  transient=True) as bar:
        tasks: dict = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done)

        result = fit_runs(runs, approach=approach, n_boot=bootstrap, holdout_largest=holdout_largest,
                          budgets=budget_list, level=level, seed=seed, delta=delta, degree=degree,
                          workers=workers, progress=progress)
    law = law_json(result, str(src))
    atomic_write_text(out_dir / "law.json", json.dumps(law, indent=2) + "\n")
    atomic_write_text(out_dir / "fit.json", json.dumps(public(result), indent=2) + "\n")
    plots = [] if no_plots else _plots(runs, result, out_dir)
    if as_json:
        print(json.dumps({**public(result), "law_file": str(out_dir / "law.json"), "plots": plots}, indent=2))
        return
    print_fit(public(result), out_dir, plots)


def _plots(runs, result, out_dir) -> list[str]:
    from flopwise.report.plots import plot_fit

    return plot_fit(runs, result, out_dir)


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

    console.print(f"[bold]{r['n_runs']} runs[/bold], N counted as {r['n_convention']} parameters")
    if "E" in r:
        level = f"{r['level']:.0%}"
        t = Table(title=f"Approach 3: L = E + A/N^α + B/D^β  (Huber δ={r['delta']:g}, objective "
                        f"{r['objective']:.4g})")
        for col in ("parameter", "estimate", f"{level} interval", "s.e."):
            t.add_column(col, justify="right")
        for key in ("E", "A", "B", "alpha", "beta", "a", "b"):
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
    if "approach1" in r and r["approach1"].get("a") is not None:
        a1 = r["approach1"]
        console.print(f"Approach 1 (curve envelope): N_opt ∝ C^{a1['a']:.3f}, D_opt ∝ C^{a1['b']:.3f}")
    if "holdout" in r:
        h = r["holdout"]
        cov = f", {h['level']:.0%} interval covers {h['coverage']:.0%} of them" if "coverage" in h else ""
        console.print(Panel(
            f"Fitted without the {h['k']} largest budget(s) ({', '.join(f'{c:.3g}' for c in h['held_out_budgets'])} "
            f"FLOPs), the law predicts their {h['n_test']} runs' losses with mean |error| "
            f"[bold]{h['mean_abs_rel_error']:.2%}[/bold] (max {h['max_abs_rel_error']:.2%}, mean signed "
            f"{h['mean_rel_error']:+.2%}){cov}.", title="Extrapolation check: the number to trust"))
    for w in r["warnings"]:
        console.print(f"[yellow]warning: {w}[/yellow]")
    console.print(f"[dim]law: {out_dir / 'law.json'} (use: flopwise plan --law {out_dir / 'law.json'}); "
                  f"details: {out_dir / 'fit.json'}; plots: {len(plots)} files[/dim]")


@app.command()
def prepare(
    paths: Optional[list[str]] = typer.Argument(None, help="Text files, folders of them, or JSONL with a 'text' "
                                                "field (none: the bundled TinyStories sample)."),
    out: Optional[str] = typer.Option(None, help="Folder for the prepared corpus (default: the cache)."),
    vocab_size: int = typer.Option(4096, help="Tokenizer vocabulary size."),
    val: Optional[list[str]] = typer.Option(None, help="Validation text (default: split off documents)."),
    val_fraction: float = typer.Option(0.05, help="Fraction of documents held out when --val is not given."),
    seed: int = typer.Option(0, help="Seed of the validation split."),
    as_json: bool = typer.Option(False, "--json", help="Print the corpus' meta.json."),
) -> None:
    """Text -> SentencePiece BPE tokenizer -> train/validation token files (cached by content hash)."""
    from flopwise.data.prepare import prepare as prepare_corpus

    with console.status("preparing corpus (tokenizer training, encoding)…"):
        corpus = prepare_corpus(paths or None, out, vocab_size, val, val_fraction, seed,
                                log=lambda m: console.print(f"[yellow]{m}[/yellow]"))
    if as_json:
        print(json.dumps({**corpus.meta, "path": str(corpus.path)}, indent=2))
        return
    m = corpus.meta
    console.print(f"prepared {corpus.path}: {m['n_tokens_train']:,} train tokens ({m['n_docs_train']:,} documents), "
                  f"{m['n_tokens_val']:,} validation tokens, vocab {m['vocab_size']}, "
                  f"{m['bytes_train'] / max(1, m['n_tokens_train']):.2f} bytes/token")


def _model_config(config: Optional[str], n_params: Optional[float], plan_doc: Optional[dict], vocab: int,
                  seq_len: int):
    from flopwise.laws.shape import suggest_shape
    from flopwise.model.llama import ModelConfig

    given = [x for x in (config, n_params, plan_doc) if x is not None]
    if len(given) > 1:
        raise FlopwiseError("give the model once: --config, --n-params or --plan")
    if config is not None:
        try:
            d = json.loads(open(config).read())
        except (OSError, json.JSONDecodeError) as e:
            raise FlopwiseError(f"cannot read --config {config}: {e}") from None
        d = d.get("model", d.get("shape", d))
        mc = ModelConfig.from_dict(d)
        if mc.vocab_size != vocab:
            raise FlopwiseError(f"--config has vocab_size {mc.vocab_size} but the corpus has {vocab}: "
                                "edit the config or prepare the corpus with --vocab-size")
        return mc
    if plan_doc is not None:
        shape = plan_doc["shape"]
        if shape["vocab_size"] == vocab:
            return ModelConfig.from_dict(shape)
        n_params = plan_doc["n_params"]
        seq_len = shape.get("seq_len", seq_len)
        console.print(f"[dim]note: the plan's shape has vocab {shape['vocab_size']}, the corpus {vocab}: "
                      f"reshaping for {n_params:.3g} parameters[/dim]")
    if n_params is None:
        raise FlopwiseError("no model given: use --n-params 1e6, --config FILE or --plan FILE")
    return ModelConfig(**suggest_shape(float(n_params), vocab_size=vocab, seq_len=seq_len).to_dict())


def _read_plan(path: str) -> dict:
    from flopwise.laws.plan import PLAN_VERSION

    try:
        doc = json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as e:
        raise FlopwiseError(f"cannot read --plan {path}: {e}; "
                            "write it with 'flopwise plan --json > plan.json'") from None
    if not isinstance(doc, dict) or "n_tokens" not in doc or "shape" not in doc:
        raise FlopwiseError(f"{path} is not a plan: write it with 'flopwise plan --json > plan.json'")
    if doc.get("plan_version") != PLAN_VERSION:
        raise FlopwiseError(f"{path} is a plan of version {doc.get('plan_version')}, this flopwise reads version "
                            f"{PLAN_VERSION}: re-run 'flopwise plan --json'")
    return doc


@app.command()
def train(
    run: Optional[str] = typer.Argument(None, metavar="[RUN_DIR]", help="Resume this run directory."),
    data: Optional[str] = typer.Option(None, help="Prepared corpus folder, or text to prepare (default: bundled)."),
    n_params: Optional[float] = typer.Option(None, help="Target parameter count; the shape is suggested."),
    config: Optional[str] = typer.Option(None, help="Model config JSON (fields of ModelConfig)."),
    tokens: Optional[float] = typer.Option(None, help="Training tokens D."),
    flops: Optional[float] = typer.Option(None, help="Training FLOPs (exact count); D follows."),
    plan_file: Optional[str] = typer.Option(None, "--plan", help="A plan from 'flopwise plan --json'."),
    out: Optional[str] = typer.Option(None, help="Run directory to create."),
    seq_len: int = typer.Option(256, help="Context length (with --n-params)."),
    vocab_size: int = typer.Option(4096, help="Vocabulary when --data needs preparing."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: by compute, DeepSeek LLM rule)."),
    batch_tokens: Optional[int] = typer.Option(None, help="Global batch in tokens (default: by compute)."),
    micro_batch: int = typer.Option(16, help="Sequences per forward pass; accumulation covers the rest."),
    schedule: str = typer.Option("cosine", help="cosine or wsd."),
    cooldown_fraction: float = typer.Option(0.2, help="WSD: fraction of steps in the cooldown."),
    cooldown_shape: str = typer.Option("linear", help="WSD cooldown: linear or 1-sqrt."),
    precision: str = typer.Option("auto", help="auto, bf16 or fp32."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    ckpt_every: int = typer.Option(0, help="Checkpoint every K steps (0: about 20 per run)."),
    eval_every: int = typer.Option(0, help="Evaluate every K steps (0: about 10 per run)."),
    seed: int = typer.Option(0, help="Seed for init and data order."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print final.json."),
) -> None:
    """Train a model with its schedule matched to its token budget; 'flopwise train RUN_DIR' resumes."""
    from flopwise.data.prepare import resolve_corpus
    from flopwise.laws.flops import training_flops_per_token
    from flopwise.train import distributed as dist
    from flopwise.train.trainer import TrainConfig, new_run
    from flopwise.train.trainer import train as run_training

    rank, _ = dist.setup()
    if run is not None and out is None and (Path(run) / "config.json").exists():
        run_dir = Path(run)
    else:
        if run is not None and out is None:
            out = run
        if out is None:
            raise FlopwiseError("no run directory: give --out RUN_DIR for a new run, or RUN_DIR to resume one")
        run_dir = Path(out)
        if rank == 0 and not (run_dir / "config.json").exists():
            corpus = resolve_corpus(data, vocab_size, log=lambda m: console.print(f"[yellow]{m}[/yellow]"))
            plan_doc = _read_plan(plan_file) if plan_file else None
            mc = _model_config(config, n_params, plan_doc, corpus.vocab_size, seq_len)
            budgets = [x for x in (tokens, flops, plan_doc) if x is not None]
            if len(budgets) != 1:
                raise FlopwiseError("give the training budget once: --tokens, --flops or --plan")
            if flops is not None:
                n_tokens = flops / training_flops_per_token(mc)
            else:
                n_tokens = tokens if tokens is not None else plan_doc["n_tokens"]
            if not (n_tokens == n_tokens and 0 < n_tokens < 1e15):
                raise FlopwiseError(f"the token budget must be a positive number, got {n_tokens}")
            tc = TrainConfig(n_tokens=int(n_tokens), lr=lr, batch_tokens=batch_tokens, micro_batch=micro_batch,
                             schedule=schedule, cooldown_fraction=cooldown_fraction, cooldown_shape=cooldown_shape,
                             precision=precision, compile=compile_model, device=device, ckpt_every=ckpt_every,
                             eval_every=eval_every, seed=seed)
            new_run(run_dir, mc, tc, corpus)
        elif (run_dir / "config.json").exists() and rank == 0 and any(
                x is not None for x in (n_params, config, tokens, flops, plan_file)):
            raise FlopwiseError(f"{run_dir} already holds a run: resume it with 'flopwise train {run_dir}' "
                                "(without model or budget options) or choose another --out")
    dist.barrier()
    final = run_training(run_dir, quiet=quiet or as_json, log=console.print)
    if as_json:
        print(json.dumps(final, indent=2))
    elif rank == 0:
        console.print(f"done: {run_dir}  val loss {final['val_loss']:.4f} nats/token, {final['val_bpb']:.4f} "
                      f"bits/byte, {final['epochs']:.2f} epochs, {final['wall_seconds']:.0f} s")


@app.command("eval")
def eval_cmd(
    run: str = typer.Argument(..., metavar="RUN_DIR", help="A run directory (its latest checkpoint)."),
    data: Optional[str] = typer.Option(None, help="Prepared corpus (default: the run's own)."),
    windows: int = typer.Option(256, help="Validation windows of the run's context length."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Validation loss (nats/token) and bits per byte of a run on a prepared corpus."""
    import numpy as np

    from flopwise.data.prepare import open_corpus
    from flopwise.data.tokenizer import token_byte_lengths
    from flopwise.train.batches import eval_windows
    from flopwise.train.trainer import evaluate, load_model, pick_device, pick_precision, read_run_config

    mc, tc, cfg = read_run_config(run)
    corpus = open_corpus(data or cfg["data"]["path"])
    if corpus.vocab_size != mc.vocab_size:
        raise FlopwiseError(f"the corpus' vocab ({corpus.vocab_size}) differs from the model's ({mc.vocab_size}): "
                            "evaluate on data prepared with the run's tokenizer")
    device = pick_device("auto")
    model = load_model(run, device)
    w = eval_windows(corpus.tokens("val"), mc.seq_len, windows)
    loss, bpb = evaluate(model, w, 16, pick_precision("auto", device), device,
                         np.array(token_byte_lengths(corpus.tokenizer())))
    result = {"run": run, "data": str(corpus.path), "val_loss": loss, "val_bpb": bpb,
              "val_tokens": int(w[:, 1:].size)}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        console.print(f"{run}: val loss {loss:.4f} nats/token, {bpb:.4f} bits/byte over {result['val_tokens']:,} "
                      "tokens")


@app.command()
def laws(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """List the published scaling laws flopwise knows, with citations."""
    from flopwise.laws.law import REGISTRY

    if as_json:
        print(json.dumps({k: v.to_dict() for k, v in REGISTRY.items()}, indent=2))
        return
    t = Table(title="Scaling laws")
    for col in ("name", "form", "N convention", "constants", "citation"):
        t.add_column(col)
    for name, law in REGISTRY.items():
        if law.form == "power":
            consts = f"N_opt = {law.n_ref:.3g} (C / {law.flops_ref:.3g})^{law.a}"
        else:
            consts = f"E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} α={law.alpha:.4g} β={law.beta:.4g}"
        t.add_row(name, law.form, law.n_convention, consts, law.citation)
    console.print(t)


@hw_app.command("probe")
def hw_probe(device: Optional[str] = typer.Option(None, help="torch device (default: cuda if present, else cpu)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Measure this machine's matmul peak (fp32, bf16) and memory bandwidth; saved for MFU."""
    from flopwise.train.probe import probe, save_probe

    with console.status("measuring matmul peaks and memory bandwidth…"):
        result = probe(device)
    path = save_probe(result)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"{result['device']} ({result['device_type']}, {result['threads']} threads)")
    console.print(f"  fp32 matmul  {result['fp32_flops'] / 1e9:,.1f} GFLOP/s")
    console.print(f"  bf16 matmul  {result['bf16_flops'] / 1e9:,.1f} GFLOP/s")
    console.print(f"  bandwidth    {result['bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s (copy, read + write)")
    console.print(f"[dim]saved to {path}; plan with --gpu local[/dim]")


@hw_app.command("list")
def hw_list() -> None:
    """List GPU and device presets with their sources."""
    from flopwise.laws.hardware import DEVICES, GPUS

    t = Table(title="GPUs")
    for col in ("name", "bf16 TFLOP/s", "memory GB", "GB/s", "W", "$/h", "source"):
        t.add_column(col)
    for g in GPUS.values():
        t.add_row(g.name, f"{g.peak_flops / 1e12:g}", f"{g.memory_bytes / 1e9:g}",
                  f"{g.bandwidth_bytes_per_s / 1e9:g}", f"{g.power_watts:g}", f"{g.price_per_hour:.2f}", g.source)
    console.print(t)
    t = Table(title="Devices")
    for col in ("name", "memory GB", "GB/s", "source"):
        t.add_column(col)
    for dv in DEVICES.values():
        t.add_row(dv.name, f"{dv.memory_bytes / 1e9:g}", f"{dv.bandwidth_bytes_per_s / 1e9:g}", dv.source)
    console.print(t)


def main() -> None:
    try:
        app()
    except FlopwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
