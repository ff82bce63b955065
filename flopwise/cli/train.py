"""flopwise prepare, train and eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from flopwise.cli.app import app, console, set_threads, threads_option
from flopwise.config import TrainConfig
from flopwise.data.prepare import open_corpus, resolve_corpus
from flopwise.data.prepare import prepare as prepare_corpus
from flopwise.data.tokenizer import load_tokenizer, token_byte_lengths
from flopwise.errors import FlopwiseError
from flopwise.laws.flops import training_flops_per_token
from flopwise.laws.shape import suggest_shape


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
    from flopwise.model.llama import ModelConfig  # torch: loaded by the command, not at start-up

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
    from flopwise.laws.plan import PLAN_VERSION  # scipy: loaded by the command, not at start-up

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


T = TrainConfig(n_tokens=0)  # the defaults shown and used


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
    micro_batch: int = typer.Option(T.micro_batch, help="Sequences per forward pass; accumulation covers the rest."),
    schedule: str = typer.Option(T.schedule, help="cosine or wsd."),
    optimizer: str = typer.Option(T.optimizer, help="adamw, or muon: Muon for the blocks' hidden matrices and "
                                  "AdamW for embeddings, head and gains, at the same learning rate."),
    cooldown_fraction: float = typer.Option(T.cooldown_fraction, help="WSD: fraction of steps in the cooldown."),
    cooldown_shape: str = typer.Option(T.cooldown_shape, help="WSD cooldown: linear or 1-sqrt."),
    precision: str = typer.Option(T.precision, help="auto, bf16 or fp32."),
    compile_model: str = typer.Option(T.compile, "--compile", help="auto (torch.compile on a CPU where the run is "
                                      "long enough to repay compiling), on or off."),
    device: str = typer.Option(T.device, help="auto, cpu or cuda."),
    ckpt_every: int = typer.Option(T.ckpt_every, help="Checkpoint every K steps (0: about 20 per run)."),
    eval_every: int = typer.Option(T.eval_every, help="Evaluate every K steps (0: about 10 per run)."),
    seed: int = typer.Option(T.seed, help="Seed for init and data order."),
    threads: int = threads_option(),
    quiet: bool = typer.Option(False, "--quiet", help="No progress output."),
    as_json: bool = typer.Option(False, "--json", help="Print final.json."),
) -> None:
    """Train a model with its schedule matched to its token budget; 'flopwise train RUN_DIR' resumes."""
    # torch-heavy modules load when the command runs, so the CLI starts fast for plan and fit
    from flopwise.run import new_run
    from flopwise.train import distributed as dist
    from flopwise.train.trainer import train as run_training

    set_threads(threads)
    rank, _ = dist.setup()
    if out is None and run is None:
        raise FlopwiseError("no run directory: give --out RUN_DIR for a new run, or RUN_DIR to resume one")
    run_dir = Path(out or run)
    if rank == 0 and (run_dir / "config.json").exists():
        if any(x is not None for x in (n_params, config, tokens, flops, plan_file)):
            raise FlopwiseError(f"{run_dir} already holds a run: resume it with 'flopwise train {run_dir}' "
                                "(without model or budget options) or choose another --out")
    elif rank == 0:
        corpus = resolve_corpus(data, vocab_size, log=lambda m: console.print(f"[yellow]{m}[/yellow]"))
        plan_doc = _read_plan(plan_file) if plan_file else None
        mc = _model_config(config, n_params, plan_doc, corpus.vocab_size, seq_len)
        if len([x for x in (tokens, flops, plan_doc) if x is not None]) != 1:
            raise FlopwiseError("give the training budget once: --tokens, --flops or --plan")
        n_tokens = (flops / training_flops_per_token(mc) if flops is not None else
                    tokens if tokens is not None else plan_doc["n_tokens"])
        if not (n_tokens == n_tokens and 0 < n_tokens < 1e15):
            raise FlopwiseError(f"the token budget must be a positive number, got {n_tokens}")
        tc = TrainConfig(n_tokens=int(n_tokens), lr=lr, batch_tokens=batch_tokens, micro_batch=micro_batch,
                         schedule=schedule, optimizer=optimizer, cooldown_fraction=cooldown_fraction,
                         cooldown_shape=cooldown_shape,
                         precision=precision, compile=compile_model, device=device, ckpt_every=ckpt_every,
                         eval_every=eval_every, seed=seed, threads=threads)
        new_run(run_dir, mc, tc, corpus)
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
    from flopwise.train.batches import eval_windows
    from flopwise.train.probe import pick_device, pick_precision, use_threads
    from flopwise.train.trainer import evaluate
    from flopwise.train.tune import evaluate_instructions

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


