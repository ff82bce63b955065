"""flopwise tune: Alpaca-style instruction tuning of a trained run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flopwise.cli.app import app, console, given, log_to_option, require, set_threads, threads_option, warn
from flopwise.config import TuneOptions
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text, check_output_dir

D = TuneOptions()  # the defaults shown and used


def _report_line(name: str, r: dict) -> str:
    def of(n: int) -> str:  # fewer than asked: the held-out set has no more examples of that task
        return f"of {n}" + (" (all held out)" if n < r.get("asked_per_task", n) else "")

    parts = [f"{name:<6} response loss {r['response_loss']:.4f}"]
    if "words_included" in r:
        parts.append(f"words included {r['words_included']:.0%} {of(r['words_n'])} (each word {r['word_rate']:.0%})")
    if "continuation_ok" in r:
        parts.append(f"continuation ok {r['continuation_ok']:.0%} {of(r['continuation_n'])}")
    return "  ".join(parts)


@app.command()
def tune(
    ctx: typer.Context,
    base: Optional[str] = typer.Argument(None, metavar="BASE_RUN", help="The trained run to tune."),
    out: str = typer.Option(..., help="Run directory for the tuned model (given alone: resume it)."),
    data: Optional[str] = typer.Option(None, help="Alpaca JSON/JSONL or chat JSONL (default: the bundled set "
                                       "derived from TinyStories)."),
    eval_data: Optional[str] = typer.Option(None, help="Held-out examples (default: 5% split off --data)."),
    lora: bool = typer.Option(False, "--lora", help="Train LoRA adapters on the frozen model (merged on export)."),
    rank: int = typer.Option(8, help="LoRA rank."),
    alpha: float = typer.Option(D.lora_alpha, help="LoRA alpha (the update is scaled by alpha / rank)."),
    targets: str = typer.Option(",".join(D.lora_targets), help="LoRA target projections."),
    epochs: float = typer.Option(D.epochs, help="Passes over the training examples."),
    max_steps: Optional[int] = typer.Option(D.max_steps, help="Optimizer steps (overrides --epochs)."),
    lr: Optional[float] = typer.Option(D.lr, help="Peak learning rate (default: base rate / 10; LoRA: base rate)."),
    batch_size: int = typer.Option(D.batch_size, help="Examples per optimizer step."),
    seed: int = typer.Option(D.seed, help="Seed of data order, held-out split, LoRA init and evaluation sampling."),
    threads: int = threads_option(),
    log_to: str = log_to_option(),
    behaviour_n: int = typer.Option(100, help="Generations per behavioural task in the before/after evaluation "
                                    "(0: response loss only)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print the before/after evaluation as JSON."),
) -> None:
    """Instruction-tune BASE_RUN (full or LoRA), with its evaluation before and after."""
    # torch-heavy modules load when a command needs them, so 'flopwise plan' and 'fit' start fast
    from flopwise.run import is_run, is_tuning, load_model, never_trained, read_run_config, run_lock
    from flopwise.training.trainer import train as run_training
    from flopwise.training.tune import new_tune_run, tune_report

    out_dir = Path(out)
    log = (lambda m: None) if as_json else warn
    opts = TuneOptions(lora_rank=rank if lora else 0, lora_alpha=alpha,
                       lora_targets=[t.strip() for t in targets.split(",") if t.strip()] if lora else D.lora_targets,
                       epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, seed=seed, log_to=log_to)
    lora_only = given(ctx, "rank", "alpha", "targets")
    require(("--behaviour-n", behaviour_n, behaviour_n >= 0, "at least 0 (0: response loss only)"))
    if lora_only and not lora:
        raise FlopwiseError(f"{', '.join(lora_only)} configure LoRA: add --lora (without it the whole model is tuned)")
    if lora:
        require(("--rank", rank, rank >= 1, "at least 1"))
    opts.check()
    if is_run(out_dir) and not is_tuning(read_run_config(out_dir)[2]):
        raise FlopwiseError(f"{out_dir} is a pre-training run, not a tuning run: choose another --out")
    check_output_dir(out_dir, "--out", lambda p: is_run(p) or never_trained(p))
    set_threads(threads)
    changed = given(ctx, "base", "data", "eval_data", "lora", "rank", "alpha", "targets", "epochs", "max_steps",
                    "lr", "batch_size", "seed", "log_to")
    exists = is_run(out_dir)
    if exists and changed and not never_trained(out_dir):
        raise FlopwiseError(f"{out_dir} already holds a tuning run: resume it with 'flopwise tune --out {out_dir}' "
                            f"alone ({', '.join(changed)} apply to a new run), or choose another --out")
    if not exists or changed:  # a new run (one that never trained a step is replaced by it)
        if base is None:
            raise FlopwiseError("no base run: 'flopwise tune BASE_RUN --out RUN_DIR' (or --out alone to resume)")
        with console.status("encoding instruction data…"):
            new_tune_run(out_dir, base, data, eval_data, opts, log=log)
    _, tc, cfg = read_run_config(out_dir)
    report_path = out_dir / "tune_eval.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    if "behaviour_n" in report and not given(ctx, "behaviour_n"):
        behaviour_n = report["behaviour_n"]  # a resumed tuning evaluates as its start was told to
    report["behaviour_n"] = behaviour_n
    if "base" not in report:
        # held, so that no other start takes the folder for a failed one meanwhile (the trainer takes it after)
        with run_lock(out_dir), console.status("evaluating the base model on the held-out examples…"):
            report["base"] = tune_report(load_model(tc.init_weights), out_dir, behaviour_n, seed)
            _save(report_path, report)
    if not as_json:
        console.print(f"data: {cfg['data']['source']}, {cfg['data']['n_train']:,} train / "
                      f"{cfg['data']['n_heldout']:,} held-out examples; "
                      + (f"LoRA rank {tc.lora_rank}" if tc.lora_rank else "full fine-tuning"))
        console.print(_report_line("base", report["base"]))
    run_training(out_dir, quiet=quiet or as_json, log=console.print)
    if "tuned" not in report:
        with console.status("evaluating the tuned model…"):
            report["tuned"] = tune_report(load_model(out_dir), out_dir, behaviour_n, seed)
        _save(report_path, report)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    if not quiet:  # progress came between: show the base again beside the tuned model
        console.print(_report_line("base", report["base"]))
    console.print(_report_line("tuned", report["tuned"]))
    for s in report["tuned"].get("samples", [])[:2]:
        console.print(f"[dim]{s.get('instruction', s.get('input'))}[/dim]\n  {s['response'][:300]}")
    console.print(f"done: {out_dir} (chat with it: flopwise chat {out_dir})")


def _save(path: Path, report: dict) -> None:
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
