"""flopwise from Python: the planner, the fitter, corpus preparation and training as plain functions that
return what the CLI prints with ``--json``.

    import flopwise as fw

    p = fw.plan(flops=1e21)                        # dict: n_params, n_tokens, shape, loss, time, cost, ...
    runs = fw.load_runs("sweep/")                   # Runs: arrays of n_params, n_tokens, loss, flops
    law = fw.fit(runs, bootstrap=200)               # dict: fit.json's content (a, b, law, intervals, verdict)
    corpus = fw.prepare(["my.jsonl"], vocab_size=2048)  # dict: meta.json and the corpus path
    final = fw.train("run/", data=corpus["path"], n_params=2e5, tokens=4e6)  # dict: final.json

Errors are ``flopwise.FlopwiseError`` with the message the CLI would print. Torch loads only in
``train``, so planning and fitting work in an install without it (``pip install flopwise``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flopwise.config import TrainConfig
from flopwise.data.prepare import DEFAULT_TOKENIZER_SAMPLE_MB, DEFAULT_VOCAB_SIZE, resolve_corpus
from flopwise.data.prepare import prepare as prepare_corpus
from flopwise.errors import FlopwiseError
from flopwise.fsutil import check_output_dir
from flopwise.laws.law import DEFAULT_LAW
from flopwise.laws.runs import Runs, runs_from_records
from flopwise.laws.runs import load_runs as _load_runs

__all__ = ["plan", "load_runs", "fit", "prepare", "train", "FlopwiseError"]


def plan(flops: float | None = None, *, law: str = DEFAULT_LAW, gpu: str | None = None, gpus: int = 1,
         hours: float | None = None, dollars: float | None = None, mfu: float = 0.4,
         price_per_hour: float | None = None, **options) -> dict:
    """The compute-optimal plan for a budget given as ``flops``, or as ``hours`` or ``dollars`` on ``gpus`` x
    ``gpu``; ``options`` are make_plan's (inference_tokens, unique_tokens, device, bits, max_memory_bytes,
    vocab_size, seq_len, exact_flops, pue, carbon_kg_per_kwh). Same dict as ``flopwise plan --json``."""
    from flopwise.laws.plan import budget_flops, make_plan

    budget = budget_flops(flops, gpu, gpus, hours, dollars, mfu, price_per_hour)
    return make_plan(budget, law, gpu=gpu or "h100", n_gpus=gpus, mfu=mfu, price_per_hour=price_per_hour, **options)


def load_runs(source, convention: str = "total") -> Runs:
    """Runs from a CSV/JSONL table or a sweep folder (a path), or from records (a list of dicts, or a pandas
    DataFrame) with n_params, n_tokens and loss. ``convention``: what N counts (total or non_embedding)."""
    if isinstance(source, Runs):
        return source.in_convention(convention) if convention != "total" else source
    if isinstance(source, (str, Path)):
        return _load_runs(source, convention)
    if hasattr(source, "to_dict"):  # a pandas DataFrame
        source = source.to_dict("records")
    if isinstance(source, (list, tuple)):
        return runs_from_records(list(source), "runs", convention)
    raise FlopwiseError(f"runs must be a path, a list of records or a DataFrame, got {type(source).__name__}")


def fit(runs, *, approach: str = "all", bootstrap: int = 1000, holdout_largest: int = 0, budgets=(),
        forms=None, level: float = 0.9, seed: int = 0, workers: int | None = None,
        out: str | Path | None = None) -> dict:
    """Fit a scaling law (Approaches 1-3, bootstrap intervals, trust checks) to ``runs`` (anything
    ``load_runs`` takes). Same dict as ``flopwise fit --json``; with ``out``, law.json and fit.json are
    written there too (``law_file`` in the result) and ``fw.plan(law=result["law_file"])`` plans with it."""
    from flopwise.laws.fit import default_forms, fit_runs, public, save_fit
    from flopwise.laws.forms import parse_forms

    source = str(Path(runs).absolute()) if isinstance(runs, (str, Path)) else "runs"
    runs = load_runs(runs)
    form_list = default_forms(runs, approach) if forms is None else parse_forms(",".join(forms) if isinstance(
        forms, (list, tuple)) else forms)
    result = fit_runs(runs, approach=approach, n_boot=bootstrap, holdout_largest=holdout_largest, budgets=budgets,
                      level=level, seed=seed, workers=workers, forms=form_list,
                      conventions=[c for c in runs.conventions if c != "total"])
    doc = public(result)
    if out is not None:
        check_output_dir(Path(out), "out", lambda p: (p / "fit.json").exists())
        save_fit(result, source, out)
        doc["law_file"] = str(Path(out) / "law.json")
    return doc


def prepare(paths=None, out: str | Path | None = None, *, vocab_size: int | None = None, val=None,
            val_fraction: float = 0.05, seed: int = 0, text_field: str = "text", tokenizer: str | Path | None = None,
            tokenizer_sample_mb: float = DEFAULT_TOKENIZER_SAMPLE_MB, quiet: bool = True, log=print) -> dict:
    """Prepare a corpus (text, JSONL, Parquet, Arrow, saved datasets; see flopwise.data.sources) into ``out``
    or the cache. Same dict as ``flopwise prepare --json``: meta.json with ``path``."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    val = [val] if isinstance(val, (str, Path)) else val
    corpus = prepare_corpus(paths, out, vocab_size, val, val_fraction, seed, log=log, text_field=text_field,
                            tokenizer=tokenizer, tokenizer_sample_mb=tokenizer_sample_mb, quiet=quiet)
    return {**corpus.meta, "path": str(corpus.path)}


def train(out: str | Path, *, data: str | Path | None = None, n_params: float | None = None,
          plan: dict | None = None, tokens: float | None = None, flops: float | None = None, seq_len: int = 256,
          vocab_size: int = DEFAULT_VOCAB_SIZE, quiet: bool = True, **options) -> dict:
    """Train a model into the run folder ``out`` and return its final.json (resuming when ``out`` holds a run).

    The model is ``plan["shape"]`` (a dict from ``plan``) or a shape suggested for ``n_params``; the token
    budget is ``tokens``, ``flops`` or the plan's. ``data``: a prepared corpus, or text to prepare (default
    the bundled sample). ``options`` are TrainConfig's fields (lr, batch_tokens, schedule, optimizer,
    precision, compile, device, seed, threads, ...)."""
    from flopwise.laws.flops import training_flops_per_token
    from flopwise.laws.shape import suggest_shape
    from flopwise.model.llama import ModelConfig
    from flopwise.run import is_run, never_trained, new_run
    from flopwise.training.trainer import train as run_training

    out = Path(out)
    starting = n_params is not None or plan is not None
    if is_run(out) and not never_trained(out):
        if starting or options or data is not None:
            raise FlopwiseError(f"{out} already holds a run: resume it with train({str(out)!r}) alone, or choose "
                                "another folder")
        return run_training(out, quiet=quiet)
    if not starting:
        raise FlopwiseError("give n_params= or plan= for a new run")
    if sum(x is not None for x in (tokens, flops)) + (plan is not None and tokens is None and flops is None) != 1:
        raise FlopwiseError("give one token budget: tokens= or flops= (or a plan, which carries its own)")
    if "n_tokens" in options:
        raise FlopwiseError("give the token budget as tokens= (or flops=), not n_tokens=")
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise FlopwiseError(f"unknown training option(s) {', '.join(unknown)}: see flopwise.config.TrainConfig")
    tc = TrainConfig(n_tokens=1, **options)
    tc.check()
    check_output_dir(out, "out", lambda p: never_trained(p))
    if plan is not None:
        vocab_size = plan["shape"]["vocab_size"]
    corpus = resolve_corpus(data, vocab_size, log=print)
    if plan is not None:
        if plan["shape"]["vocab_size"] != corpus.vocab_size:
            raise FlopwiseError(f"the plan's shape has vocab {plan['shape']['vocab_size']} but the corpus has "
                                f"{corpus.vocab_size}: prepare the corpus at the plan's vocabulary")
        mc = ModelConfig.from_dict(plan["shape"])
    else:
        mc = ModelConfig(**suggest_shape(float(n_params), vocab_size=corpus.vocab_size, seq_len=seq_len).to_dict())
    n_tokens = (flops / training_flops_per_token(mc) if flops is not None else
                tokens if tokens is not None else plan["n_tokens"])
    new_run(out, mc, dataclasses.replace(tc, n_tokens=int(n_tokens)), corpus, log=print)
    return run_training(out, quiet=quiet)
