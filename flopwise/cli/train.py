"""flopwise prepare, train and eval."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from flopwise.cli.app import app, console, given, log_to_option, require, set_threads, threads_option, warn
from flopwise.config import TrainConfig
from flopwise.data.prepare import DEFAULT_TOKENIZER_SAMPLE_MB, open_corpus, resolve_corpus
from flopwise.data.prepare import prepare as prepare_corpus
from flopwise.data.tokenizer import load_tokenizer, token_byte_lengths
from flopwise.errors import FlopwiseError
from flopwise.fsutil import check_output_dir
from flopwise.laws.flops import training_flops_per_token
from flopwise.laws.shape import suggest_shape


@app.command()
def prepare(
    paths: Optional[list[str]] = typer.Argument(None, help="Text, JSONL/JSON, Parquet or Arrow files (optionally "
                                                ".gz/.zst/.xz/.bz2), folders of them, or a datasets.save_to_disk "
                                                "folder (none: the bundled TinyStories sample)."),
    out: Optional[str] = typer.Option(None, help="Folder for the prepared corpus (default: the cache)."),
    vocab_size: Optional[int] = typer.Option(None, help="Tokenizer vocabulary size (default 4096; with --tokenizer: "
                                             "the tokenizer's)."),
    val: Optional[list[str]] = typer.Option(None, help="Validation text (default: split off documents)."),
    val_fraction: float = typer.Option(0.05, help="Fraction of documents held out when --val is not given."),
    seed: int = typer.Option(0, help="Seed of the validation split and the tokenizer's sample."),
    text_field: str = typer.Option("text", help="Field (JSON) or column (Parquet, Arrow) that holds the text."),
    tokenizer: Optional[str] = typer.Option(None, help="Reuse this SentencePiece BPE model (e.g. a Llama "
                                            "tokenizer.model) instead of training one."),
    tokenizer_sample_mb: float = typer.Option(DEFAULT_TOKENIZER_SAMPLE_MB, help="Train the tokenizer on a random "
                                              "sample of at most this many million characters of documents."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print the corpus' meta.json."),
) -> None:
    """Text -> SentencePiece BPE tokenizer -> train/validation token files, streamed (cached by content hash)."""
    corpus = prepare_corpus(paths or None, out, vocab_size, val, val_fraction, seed, log=warn, text_field=text_field,
                            tokenizer=tokenizer, tokenizer_sample_mb=tokenizer_sample_mb, quiet=True if quiet else None)
    if as_json:
        print(json.dumps({**corpus.meta, "path": str(corpus.path)}, indent=2))
        return
    m = corpus.meta
    console.print(f"prepared {corpus.path}: {m['n_tokens_train']:,} train tokens ({m['n_docs_train']:,} documents), "
                  f"{m['n_tokens_val']:,} validation tokens, vocab {m['vocab_size']}, "
                  f"{m['bytes_train'] / max(1, m['n_tokens_train']):.2f} bytes/token")


def _model_config(config_doc: Optional[tuple[dict, bool]], n_params: Optional[float], plan_doc: Optional[dict],
                  vocab: int, seq_len: int):
    from flopwise.model.llama import ModelConfig  # torch: loaded by the command, not at start-up

    if config_doc is not None:
        mc = ModelConfig.from_dict(config_doc[0], strict=config_doc[1])
        if mc.vocab_size != vocab:
            raise FlopwiseError(f"--config has vocab_size {mc.vocab_size} but the corpus has {vocab}: prepare the "
                                f"corpus with --vocab-size {mc.vocab_size} (or give the text itself to --data)")
        return mc
    if plan_doc is not None:
        shape = plan_doc["shape"]
        if shape["vocab_size"] != vocab:
            raise FlopwiseError(f"the plan's shape has vocab {shape['vocab_size']} but the corpus has {vocab}: prepare "
                                f"the corpus with --vocab-size {shape['vocab_size']} (or give the text itself to "
                                f"--data), or plan with --vocab-size {vocab}")
        return ModelConfig.from_dict(shape)
    return ModelConfig(**suggest_shape(float(n_params), vocab_size=vocab, seq_len=seq_len).to_dict())


def _read_config(path: str) -> tuple[dict, bool]:
    """The model fields of a --config file (a bare object, a run's config.json or a plan), and whether they must
    all be ModelConfig fields (a plan's shape also carries derived counts)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FlopwiseError(f"cannot read --config {path}: {e}") from None
    strict = not (isinstance(doc, dict) and "shape" in doc and "model" not in doc)
    doc = doc.get("model", doc.get("shape", doc)) if isinstance(doc, dict) else doc
    if not isinstance(doc, dict):
        raise FlopwiseError(f"--config {path} is not a JSON object of model fields (d_model, n_layers, ...)")
    return doc, strict


def _read_plan(path: str) -> dict:
    from flopwise.laws.plan import PLAN_VERSION  # scipy: loaded by the command, not at start-up

    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FlopwiseError(f"cannot read --plan {path}: {e}; "
                            "write it with 'flopwise plan --json > plan.json'") from None
    if not isinstance(doc, dict) or "n_tokens" not in doc or "shape" not in doc:
        raise FlopwiseError(f"{path} is not a plan: write it with 'flopwise plan --json > plan.json'")
    if doc.get("plan_version") != PLAN_VERSION:
        raise FlopwiseError(f"{path} is a plan of version {doc.get('plan_version')}, this flopwise reads version "
                            f"{PLAN_VERSION}: re-run 'flopwise plan --json'")
    return doc


def _check_new_run(tc: TrainConfig, n_params, tokens, flops, seq_len: int, vocab_size: int, models: list) -> None:
    """Every option of a new run, before any file is read or written."""
    tc.check()
    budgets = [x for x in (tokens, flops) if x is not None]
    require(("--n-params", n_params, n_params is None or 1e3 <= n_params <= 1e13, "between 1e3 and 1e13"),
            ("--tokens", tokens, tokens is None or 0 < tokens < 1e15, "a positive number of tokens below 1e15"),
            ("--flops", flops, flops is None or 0 < flops < 1e30, "a positive number of FLOPs below 1e30"),
            ("--seq-len", seq_len, 2 <= seq_len <= 1 << 20, "between 2 and 1048576"),
            ("--vocab-size", vocab_size, 259 <= vocab_size <= 1 << 20, "between 259 and 1048576"))
    if sum(x is not None for x in models) > 1:
        raise FlopwiseError("give the model once: --config, --n-params or --plan")
    if not any(x is not None for x in models):
        raise FlopwiseError("no model given: use --n-params 1e6, --config FILE or --plan FILE")
    if len(budgets) + (models[2] is not None) != 1:
        raise FlopwiseError("give the training budget once: --tokens, --flops or --plan")


T = TrainConfig(n_tokens=0)  # the defaults shown and used


@app.command()
def train(
    ctx: typer.Context,
    run: Optional[str] = typer.Argument(None, metavar="RUN_DIR", help="Resume this run directory."),
    data: Optional[str] = typer.Option(None, help="Prepared corpus folder, or text to prepare (default: bundled)."),
    n_params: Optional[float] = typer.Option(None, help="Target parameter count; the shape is suggested."),
    config: Optional[str] = typer.Option(None, help="Model config JSON (fields of ModelConfig)."),
    tokens: Optional[float] = typer.Option(None, help="Training tokens D."),
    flops: Optional[float] = typer.Option(None, help="Training FLOPs (exact count); D follows."),
    plan_file: Optional[str] = typer.Option(None, "--plan", help="A plan from 'flopwise plan --json'."),
    out: Optional[str] = typer.Option(None, help="Run directory to create."),
    seq_len: int = typer.Option(256, help="Context length (with --n-params)."),
    vocab_size: int = typer.Option(4096, help="Vocabulary when --data needs preparing."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: by compute, DeepSeek LLM rule; "
                                       "Muon's matrices get 4x)."),
    batch_tokens: Optional[int] = typer.Option(None, help="Global batch in tokens (default: by compute)."),
    micro_batch: int = typer.Option(T.micro_batch, help="Sequences per forward pass; accumulation covers the rest."),
    schedule: str = typer.Option(T.schedule, help="cosine or wsd."),
    optimizer: str = typer.Option(T.optimizer, help="muon: Muon for the blocks' hidden matrices and AdamW for "
                                  "embeddings, head and gains; or adamw throughout."),
    cooldown_fraction: float = typer.Option(T.cooldown_fraction, help="WSD: fraction of steps in the cooldown."),
    cooldown_shape: str = typer.Option(T.cooldown_shape, help="WSD cooldown: linear or 1-sqrt."),
    precision: str = typer.Option(T.precision, help="auto, bf16 or fp32."),
    compile_model: str = typer.Option(T.compile, "--compile", help="auto (on a CPU, the fastest of PyTorch eager, "
                                      "the C training step and torch.compile, measured), on (torch.compile) or off "
                                      "(PyTorch eager)."),
    device: str = typer.Option(T.device, help="auto, cpu or cuda."),
    ckpt_every: int = typer.Option(T.ckpt_every, help="Checkpoint every K steps (0: about 20 per run)."),
    eval_every: int = typer.Option(T.eval_every, help="Evaluate every K steps (0: about 10 per run)."),
    seed: int = typer.Option(T.seed, help="Seed for init and data order."),
    threads: int = threads_option(),
    log_to: str = log_to_option(),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print final.json."),
) -> None:
    """Train a model with its schedule matched to its token budget; 'flopwise train RUN_DIR' resumes."""
    # torch-heavy modules load when the command runs, so the CLI starts fast for plan and fit
    from flopwise.run import is_run, never_trained, new_run
    from flopwise.training import distributed as dist
    from flopwise.training.trainer import train as run_training

    if out is not None and run is not None:
        raise FlopwiseError("give RUN_DIR (to resume a run) or --out RUN_DIR (to start one), not both")
    if out is None and run is None:
        raise FlopwiseError("no run directory: give --out RUN_DIR for a new run, or RUN_DIR to resume one")
    run_dir = Path(out or run)
    create = False
    if dist.launched_rank() == 0:  # under torchrun the other ranks wait at the barrier for what rank 0 makes
        new_options = given(ctx, "data", "n_params", "config", "tokens", "flops", "plan_file", "seq_len",
                            "vocab_size", "lr", "batch_tokens", "micro_batch", "schedule", "optimizer",
                            "cooldown_fraction", "cooldown_shape", "precision", "compile_model", "device",
                            "ckpt_every", "eval_every", "seed", "log_to")
        started = is_run(run_dir) and not never_trained(run_dir)
        if run is not None and not is_run(run_dir):
            raise FlopwiseError(f"{run_dir} does not exist: start a run with --out {run_dir}" if not run_dir.exists()
                                else f"{run_dir} is not a run directory (no flopwise config.json): start a run "
                                "with --out NEW_DIR")
        if (run is not None or started) and new_options:
            raise FlopwiseError(f"{run_dir} already holds a run: resume it with 'flopwise train {run_dir}' alone "
                                f"({', '.join(new_options)} apply to a new run), or choose another --out")
        # a new run: --out names a new or empty folder, or a failed start that new options replace
        create = run is None and not started and (bool(new_options) or not is_run(run_dir))
    set_threads(threads)
    rank, _ = dist.setup()
    if rank == 0 and create:
        tc = TrainConfig(n_tokens=1, lr=lr, batch_tokens=batch_tokens, micro_batch=micro_batch, schedule=schedule,
                         optimizer=optimizer, cooldown_fraction=cooldown_fraction, cooldown_shape=cooldown_shape,
                         precision=precision, compile=compile_model, device=device, ckpt_every=ckpt_every,
                         eval_every=eval_every, seed=seed, threads=threads, log_to=log_to)
        _check_new_run(tc, n_params, tokens, flops, seq_len, vocab_size, [config, n_params, plan_file])
        check_output_dir(run_dir, "--out", lambda p: never_trained(p))
        plan_doc = _read_plan(plan_file) if plan_file else None
        config_doc = _read_config(config) if config else None
        model_vocab = (plan_doc["shape"]["vocab_size"] if plan_doc else
                       config_doc[0].get("vocab_size") if config_doc else None)
        if model_vocab and "--vocab-size" not in given(ctx, "vocab_size"):
            vocab_size = model_vocab  # text is prepared at the vocabulary the plan or config was made for
        corpus = resolve_corpus(data, vocab_size, log=warn)
        mc = _model_config(config_doc, n_params, plan_doc, corpus.vocab_size, seq_len)
        n_tokens = (flops / training_flops_per_token(mc) if flops is not None else
                    tokens if tokens is not None else plan_doc["n_tokens"])
        if not n_tokens < 1e15:
            raise FlopwiseError(f"the token budget must be below 1e15, got {n_tokens:.3g}")
        tc = dataclasses.replace(tc, n_tokens=int(n_tokens))
        new_run(run_dir, mc, tc, corpus, log=warn)
    dist.barrier()
    final = run_training(run_dir, quiet=quiet or as_json, log=console.print)
    if as_json:
        print(json.dumps(final, indent=2))
    elif rank == 0:
        console.print(f"done: {run_dir}  val loss {final['val_loss']:.4f} nats/token, {final['val_bpb']:.4f} "
                      f"bits/byte, {final['epochs']:.2f} epochs, {final['wall_seconds']:.0f} s")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False


@app.command("eval")
def eval_cmd(
    run: str = typer.Argument(..., metavar="RUN_DIR", help="A run directory (its latest checkpoint)."),
    data: Optional[str] = typer.Option(None, help="Prepared corpus (default: the run's own)."),
    windows: int = typer.Option(256, help="Validation windows of the run's context length."),
    instructions: Optional[str] = typer.Option(None, help="Alpaca/chat file: held-out response loss, and "
                                               "behavioural scores for records with a 'task' (the bundled set)."),
    behaviour_n: int = typer.Option(100, help="With --instructions: generations per behavioural task."),
    seed: int = typer.Option(0, help="With --instructions: sampling seed."),
    temperature: float = typer.Option(0.8, help="With --instructions: sampling temperature."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    threads: int = threads_option(),
) -> None:
    """Validation loss (nats/token) and bits per byte of a run on a prepared corpus, or its instruction following."""
    # torch-heavy modules load when the command runs, so the CLI starts fast for plan and fit
    from flopwise.run import is_tuning, load_model, read_run_config
    from flopwise.training.batches import eval_windows
    from flopwise.training.probe import pick_device, pick_precision, use_threads
    from flopwise.training.trainer import evaluate
    from flopwise.training.tune import evaluate_instructions

    require(("--windows", windows, windows >= 1, "at least 1"),
            ("--behaviour-n", behaviour_n, behaviour_n >= 0, "at least 0"),
            ("--temperature", temperature, 0 <= temperature <= 100, "between 0 (greedy) and 100"))
    if instructions is not None and not Path(instructions).exists():
        raise FlopwiseError(f"--instructions {instructions} does not exist: give an Alpaca JSON/JSONL or chat file")
    use_threads(set_threads(threads))
    mc, tc, cfg = read_run_config(run)
    if instructions is not None:
        sp = load_tokenizer(Path(run) / "tokenizer.model")
        with console.status("evaluating instructions…"):
            r = evaluate_instructions(load_model(run), sp, instructions, behaviour_n, seed, temperature)
        if as_json:
            print(json.dumps({"run": run, "instructions": instructions, **r}, indent=2))
            return
        line = f"{run}: response loss {r['response_loss']:.4f} nats/token over {r['response_tokens']:,} tokens"
        if "words_included" in r:
            line += f"; words included {r['words_included']:.0%} of {r['words_n']}"
        if "continuation_ok" in r:
            line += f"; continuation ok {r['continuation_ok']:.0%} of {r['continuation_n']}"
        console.print(line + f" (seed {seed}, temperature {temperature})")
        return
    if is_tuning(cfg) and data is None:
        raise FlopwiseError(f"{run} is a tuning run: evaluate it with --instructions FILE "
                            f"(e.g. {Path(run) / 'instructions-heldout.jsonl'}) or --data CORPUS")
    corpus = open_corpus(data or cfg["data"]["path"])
    if not _same_file(corpus.tokenizer_path, Path(run) / "tokenizer.model"):
        raise FlopwiseError(f"{corpus.path} was prepared with another tokenizer than the run's, so its loss would "
                            "mean nothing: evaluate on the run's own corpus (omit --data)")
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


