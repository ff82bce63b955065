"""flopwise generate and chat: the CPU runtime from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from flopwise.cli.app import app, console, require, set_threads, threads_option, warn
from flopwise.data.instructions import STOP_STRINGS, chat_prompt_ids, render_prompt
from flopwise.data.tokenizer import load_tokenizer
from flopwise.errors import FlopwiseError


def _sampling_rules(max_tokens: int, temperature: float, top_k: int, top_p: float = 1.0,
                    repetition_penalty: float = 1.0) -> None:
    require(("--max-tokens", max_tokens, 1 <= max_tokens <= 1 << 20, "between 1 and 1048576"),
            ("--temperature", temperature, 0 <= temperature <= 100, "between 0 (greedy) and 100"),
            ("--top-k", top_k, top_k >= 0, "at least 0 (0: all tokens)"),
            ("--top-p", top_p, 0 < top_p <= 1, "in (0, 1] (1: off)"),
            ("--repetition-penalty", repetition_penalty, 0 < repetition_penalty <= 100, "in (0, 100] (1: off)"))


BACKENDS = ("flopwise", "llama.cpp")


def backend_option():
    return typer.Option("flopwise", help="flopwise (its own CPU engine) or llama.cpp (needs llama-cpp-python; a run "
                        "is exported to a cached GGUF at --dtype: f32, f16 for bf16, q8_0 for int8).")


def compile_option():
    return typer.Option("auto", "--compile", help="Decode through flopwise's C step (fp32 and int8; compiled once per "
                        "machine with its C compiler, ~1 s): auto or on (a note says when it cannot, and on also "
                        "for bf16), or off (PyTorch alone).")


def _engine(run: str, dtype: str, threads: int, backend: str = "flopwise", compile_mode: str = "auto"):
    """An engine for a run directory or a .gguf file (dequantised into flopwise's model, or run by llama.cpp),
    on --threads."""
    # torch-heavy modules load when the command runs, so the CLI starts fast for plan and fit
    from flopwise.infer.generate import Engine
    from flopwise.run import load_model
    from flopwise.training.probe import use_threads

    require(("--dtype", dtype, dtype in ("fp32", "bf16", "int8"), "fp32, bf16 or int8"),
            ("--backend", backend, backend in BACKENDS, " or ".join(BACKENDS)),
            ("--compile", compile_mode, compile_mode in ("auto", "on", "off"), "auto, on or off"))
    n_threads = set_threads(threads)
    if not Path(run).exists():
        raise FlopwiseError(f"{run} does not exist: give a run directory or a .gguf file")
    if Path(run).is_file() and not run.endswith(".gguf"):
        raise FlopwiseError(f"{run} is not a run directory or a .gguf file")
    use_threads(n_threads)
    if backend == "llama.cpp":
        from flopwise.infer.llamacpp import LlamaCppEngine

        return LlamaCppEngine.open(run, dtype, n_threads, log=warn)
    if Path(run).is_file():
        from flopwise.infer.gguf_load import load_gguf

        model, sp = load_gguf(run)
        return Engine(model, sp, dtype, compile_mode, log=warn)
    return Engine(load_model(run), load_tokenizer(Path(run) / "tokenizer.model"), dtype, compile_mode, log=warn)


@app.command()
def generate(
    run: str = typer.Argument(..., metavar="RUN|FILE", help="A run directory or a .gguf file."),
    prompt: Optional[list[str]] = typer.Option(None, help="Prompt text (repeat for a batch; none: read stdin)."),
    max_tokens: int = typer.Option(128, help="New tokens at most."),
    temperature: float = typer.Option(0.8, help="0 is greedy."),
    top_k: int = typer.Option(40, help="Sample from the k most likely tokens (0: all)."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (1: off)."),
    repetition_penalty: float = typer.Option(1.0, help="> 1 discourages repeats."),
    stop: Optional[list[str]] = typer.Option(None, help="Stop string (repeatable)."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed (same seed, same text)."),
    dtype: str = typer.Option("fp32", help="Runtime weights: fp32, bf16 or int8."),
    backend: str = backend_option(),
    compile_mode: str = compile_option(),
    threads: int = threads_option(),
    instruct: bool = typer.Option(False, "--instruct", help="Wrap the prompt in the Alpaca template."),
    bench: bool = typer.Option(False, "--bench", help="Print prompt and decode tokens/s and peak memory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Generate text from a run (temperature 0 is greedy); streams a single prompt."""
    from flopwise.infer.generate import Sampling  # torch: loaded by the command, not at start-up

    _sampling_rules(max_tokens, temperature, top_k, top_p, repetition_penalty)
    eng = _engine(run, dtype, threads, backend, compile_mode)
    if bench:
        r = eng.bench()
        print(json.dumps(r, indent=2)) if as_json else console.print(
            f"{r['dtype']}{', C step' if r.get('compiled') else ''}: prompt {r['prompt_tok_per_s']:,.0f} tok/s, "
            f"decode {r['decode_tok_per_s']:,.1f} tok/s "
            f"(batch {r['batch']}, {r['new_tokens']} new tokens), peak RSS {r['peak_rss_mb']:,.0f} MB")
        return
    prompts = prompt or [sys.stdin.read()]
    if instruct:
        prompts = [render_prompt(p) for p in prompts]
    s = Sampling(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 repetition_penalty=repetition_penalty, seed=seed,
                 stop=list(stop or []) + (list(STOP_STRINGS) if instruct else []))
    if not any(p.strip() for p in prompts):
        raise FlopwiseError("empty prompt: give --prompt TEXT or text on stdin")
    ctx = eng.config.seq_len
    longest = max(len(eng.encode_prompt(p)) for p in prompts)
    if longest >= ctx:
        raise FlopwiseError(f"the prompt is {longest} tokens, the model's context {ctx}: give a shorter prompt")
    if longest + max_tokens > ctx:
        warn(f"note: the context is {ctx} tokens, so at most {ctx - longest} new tokens follow this prompt")
    if len(prompts) == 1 and not as_json:
        for piece in eng.stream_text(prompts[0], s):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    texts = eng.generate(prompts, s)
    if as_json:
        print(json.dumps([{"prompt": p, "completion": t} for p, t in zip(prompts, texts, strict=True)], indent=2))
    else:
        for t in texts:
            console.print(t, highlight=False)
            console.rule()


@app.command()
def chat(
    run: str = typer.Argument(..., metavar="RUN|FILE", help="A (tuned) run directory or a .gguf file."),
    max_tokens: int = typer.Option(200, help="New tokens per reply at most."),
    temperature: float = typer.Option(0.7, help="0 is greedy."),
    top_k: int = typer.Option(40, help="Sample from the k most likely tokens."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed."),
    system: Optional[str] = typer.Option(None, help="Replace the Alpaca preamble."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or int8."),
    backend: str = backend_option(),
    compile_mode: str = compile_option(),
    threads: int = threads_option(),
) -> None:
    """Chat in the terminal with the Alpaca template; replies stream token by token. Ctrl-D or /exit ends."""
    from flopwise.infer.generate import Sampling  # torch: loaded by the command, not at start-up

    _sampling_rules(max_tokens, temperature, top_k)
    eng = _engine(run, dtype, threads, backend, compile_mode)
    ctx = eng.config.seq_len
    console.print(f"[dim]{run}: context {ctx} tokens; /reset clears the history, /exit or Ctrl-D ends[/dim]")
    history: list[tuple[str, str]] = []  # (user, reply) of earlier turns

    def encode(turns: list[tuple[str, str]], user: str) -> list[int]:
        msgs = [{"role": "system", "content": system}] if system is not None else []
        for u, r in turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": r}]
        return chat_prompt_ids(eng.sp, msgs + [{"role": "user", "content": user}])

    while True:
        try:
            user = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if user.strip() in ("/exit", "/quit"):
            return
        if user.strip() == "/reset":
            history = []
            continue
        if not user.strip():
            continue
        ids = encode(history, user)
        while history and len(ids) + 16 > ctx:  # forget the oldest turns to leave room for a reply
            history.pop(0)
            ids = encode(history, user)
        if len(ids) >= ctx:
            console.print(f"[red]that message is too long for the context of {ctx} tokens[/red]")
            continue
        s = Sampling(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed,
                     stop=list(STOP_STRINGS))
        sys.stdout.write("model> ")
        reply = []
        for piece in eng.stream_text(ids, s):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append((user, "".join(reply).strip()))


@app.command()
def export(
    run: str = typer.Argument(..., metavar="RUN", help="A trained or tuned run directory."),
    fmt: str = typer.Option(..., "--format", help="hf (transformers folder) or gguf (llama.cpp / ollama file)."),
    quant: str = typer.Option("f32", help="GGUF weights: f32, f16, q8_0 or q4_0."),
    out: str = typer.Option(..., help="Output folder (hf) or .gguf file (gguf; a Modelfile goes beside it)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Export a run to Hugging Face (safetensors) or GGUF, written atomically."""
    from flopwise.infer.export import QUANTS, export_gguf, export_hf  # torch: loaded by the command

    if fmt not in ("hf", "gguf"):
        raise FlopwiseError(f"unknown --format {fmt!r}: choose hf or gguf")
    if quant not in QUANTS:
        raise FlopwiseError(f"unknown --quant {quant!r}: choose one of {', '.join(QUANTS)}")
    if fmt == "hf":
        if quant != "f32":
            raise FlopwiseError("--quant applies to GGUF; the Hugging Face export is f32 safetensors")
        path = export_hf(run, out)
        size = (path / "model.safetensors").stat().st_size
        result = {"path": str(path), "format": "hf", "bytes": size}
        if as_json:
            print(json.dumps(result, indent=2))
        else:
            console.print(f"wrote {path}/ (model.safetensors {size / 1e6:.2f} MB, config.json, tokenizer files); "
                          f"load with transformers.AutoModelForCausalLM.from_pretrained('{path}')")
        return
    result = export_gguf(run, out, quant, log=lambda m: console.print(f"[yellow]{m}[/yellow]"))
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        p = Path(result["path"])
        console.print(f"wrote {p} ({quant}, {result['bytes'] / 1e6:.2f} MB, {result['bits_per_weight']:.2f} bits per "
                      f"weight over {result['n_weights']:,} weights) and {result['modelfile']}")


@app.command()
def serve(
    run: str = typer.Argument(..., metavar="RUN|FILE", help="A trained or tuned run directory, or a .gguf file."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8000, help="TCP port."),
    dtype: str = typer.Option("fp32", help="fp32, bf16 or int8."),
    backend: str = backend_option(),
    compile_mode: str = compile_option(),
    threads: int = threads_option(),
    max_queue: int = typer.Option(32, help="Requests waiting at most; more get 503."),
    name: Optional[str] = typer.Option(None, help="Model id in the API (default: the run folder's name)."),
) -> None:
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions (stream: true as SSE), /v1/models."""
    from flopwise.infer.server import serve as run_server  # torch, fastapi: loaded by the command

    require(("--port", port, 0 < port < 65536, "between 1 and 65535"),
            ("--max-queue", max_queue, max_queue >= 1, "at least 1"))
    _check_port(host, port)
    eng = _engine(run, dtype, threads, backend, compile_mode)
    model_name = name or Path(run).resolve().name
    console.print(f"serving {model_name} on http://{host}:{port}/v1 (context {eng.config.seq_len} tokens)")
    run_server(eng, model_name, host, port, max_queue)


def _check_port(host: str, port: int) -> None:
    """Refuse a port something else listens on before the model loads (and before 'serving on' is printed)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except socket.gaierror:
        raise FlopwiseError(f"cannot resolve --host {host!r}: give an address such as 127.0.0.1 or 0.0.0.0") from None
    except OSError as e:
        raise FlopwiseError(f"cannot listen on {host}:{port} ({e.strerror or e}; is it in use?): choose another "
                            "--port or --host") from None
