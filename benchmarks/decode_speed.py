"""Decode speed: flopwise's CPU runtime against Hugging Face generate and llama.cpp (if installed).

One invocation, same machine, same weights (random: speed does not depend on training), batch 1,
a 16-token prompt, 128 new tokens, greedy, eos ignored so every run decodes the whole budget.
Models: ~15M parameters (6 layers, d_model 288, vocab 32000, llama2.c's "stories15M" shape)
and ~110M (12 layers, d_model 768). Rows: HF generate (fp32); flopwise at each dtype with PyTorch
alone ("torch", --compile off) and, for fp32 and int8, through its C decode step ("C step", the
default); llama.cpp at f32, f16 and q8_0 (its logits read back and argmax-ed each token, as a
decoder must). Ratios: against HF, and against llama.cpp at the same precision (fp32: f32, bf16:
f16, int8: q8_0). The ceiling is memory bandwidth over the weight bytes each token reads (bandwidth
measured here with a large array copy). Then the OpenAI server's throughput (15M, fp32) with 1, 4
and 16 clients streaming at once, through PyTorch alone and through the C step.

    python benchmarks/decode_speed.py [--only 15m|110m] [--tokens 128] [--threads N] [--no-compile] [--no-server]
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flopwise.infer.generate import Engine, Sampling  # noqa: E402
from flopwise.model.llama import Llama, ModelConfig  # noqa: E402

SHAPES = {
    "15m": ModelConfig(vocab_size=32000, d_model=288, n_layers=6, n_heads=6, n_kv_heads=6, d_ff=768, seq_len=256,
                       tie_embeddings=True),
    "110m": ModelConfig(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=2048,
                        seq_len=1024, tie_embeddings=True),
}
PROMPT = 16


def bandwidth_gb_s() -> float:
    """Memory read+write bandwidth from copying a 512 MB array (best of 5)."""
    a = np.ones(64 * 2**20, dtype=np.float64)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def weight_bytes_per_token(mc: ModelConfig, bytes_per_weight: float) -> float:
    """Bytes of matrices read per decoded token: every linear layer plus the output head (the embedding
    is a row lookup)."""
    d, f, kv = mc.d_model, mc.d_ff, mc.n_kv_heads * mc.head_dim
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f
    return (mc.n_layers * per_layer + mc.vocab_size * d) * bytes_per_weight


def time_flopwise(model: Llama, dtype: str, new_tokens: int, compile: str = "off") -> tuple[float, float]:
    """(tokens/s, seconds the first call took beyond a warm one). compile off: PyTorch alone; on: the C step
    (built once per machine, before this is timed)."""
    eng = Engine(model, sp=None, dtype=dtype, compile=compile, log=lambda m: print("   ", m))
    prompt = [[1] + list(range(10, 10 + PROMPT - 1))]
    s = Sampling(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    for _ in eng.stream_ids(prompt, Sampling(max_new_tokens=8, temperature=0, ignore_eos=True)):
        pass
    first = time.perf_counter() - t
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        n = sum(1 for _ in eng.stream_ids(prompt, s))
        best = max(best, n / (time.perf_counter() - t))
    if compile == "on" and eng.native is None:
        return float("nan"), first
    return best, max(0.0, first - 8 / best)


def time_hf(model: Llama, new_tokens: int) -> float | None:
    try:
        import transformers
    except ImportError:
        return None
    from flopwise.infer.export import hf_config, hf_state_dict

    cfg = {k: v for k, v in hf_config(model.config).items() if k not in ("architectures", "model_type")}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    hf.load_state_dict(hf_state_dict(model), strict=False)
    if model.config.tie_embeddings:
        hf.tie_weights()
    x = torch.tensor([[1] + list(range(10, 10 + PROMPT - 1))])
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
              pad_token_id=0)
    with torch.no_grad():
        hf.generate(x, max_new_tokens=8, do_sample=False, pad_token_id=0)
        best = 0.0
        for _ in range(2):
            t = time.perf_counter()
            out = hf.generate(x, **kw)
            best = max(best, (out.shape[1] - x.shape[1]) / (time.perf_counter() - t))
    return best


def time_llama_cpp(model: Llama, quant: str, new_tokens: int, threads: int) -> float | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    from flopwise.infer.export import write_gguf

    v = model.config.vocab_size
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    tokens += [f"\u2581t{i}".encode() for i in range(v - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (v - 259)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        write_gguf(model, (tokens, [0.0] * v, types), path, quant, "bench")
        llm = llama_cpp.Llama(str(path), n_ctx=model.config.seq_len, n_threads=threads, verbose=False,
                              use_extra_bufts=False)
        prompt = [1] + list(range(300, 300 + PROMPT - 1))
        best = 0.0
        for _ in range(3):
            llm.reset()
            t = time.perf_counter()
            llm.eval(prompt)
            n = 0
            for _ in range(new_tokens):  # the logits read back and argmax-ed, as a decoder must
                row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
                tok = int(np.argmax(np.ctypeslib.as_array(row, shape=(v,))))
                llm.eval([tok])
                n += 1
            best = max(best, n / (time.perf_counter() - t))
        return best


class DigitTokenizer:
    """The served model's tokenizer here: the benchmark's prompts are digits, a token each; any id decodes
    to one character, so every generated token is a streamed piece."""

    def encode(self, text: str) -> list[int]:
        return [10 + int(c) for c in text if c.isdigit()]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def _serve(port: int, threads: int, compile: str) -> None:
    """The server process: the 15M model (seed 0, fp32) behind flopwise's OpenAI app."""
    from flopwise.infer.server import serve

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    eng = Engine(Llama(SHAPES["15m"]).eval(), sp=DigitTokenizer(), dtype="fp32", compile=compile)
    serve(eng, "bench", port=port, max_queue=64, log_level="warning")  # as 'flopwise serve' runs it


def server_throughput(clients: list[int], new_tokens: int, threads: int, compile: str) -> list[float]:
    """Completion tokens per second of the server (in its own process, as in use) with each number of
    clients streaming requests at once."""
    import multiprocessing
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, threads, compile), daemon=True)
    proc.start()
    url = f"http://127.0.0.1:{port}/v1"
    while True:
        try:
            httpx.get(f"{url}/models", timeout=1)
            break
        except httpx.TransportError:
            if not proc.is_alive():
                raise RuntimeError("the server process ended before it served") from None
            time.sleep(0.2)

    def one(i: int) -> int:
        body = {"prompt": "1234567890123456"[: PROMPT - 1], "max_tokens": new_tokens, "temperature": 0,
                "stream": True}
        n = 0
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                n += line.startswith('data: {"id"') and '"text": ""' not in line
        return n

    try:
        one(0)  # warm-up
        rates = []
        for n in clients:
            t = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                tokens = sum(pool.map(one, range(n)))
            rates.append(tokens / (time.perf_counter() - t))
        return rates
    finally:
        proc.terminate()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-compile", action="store_true", help="skip the C step's rows")
    ap.add_argument("--no-server", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = bandwidth_gb_s()
    print(f"torch {torch.__version__}, {args.threads} threads, measured memory bandwidth {bw:.1f} GB/s, "
          f"batch 1, prompt {PROMPT}, {args.tokens} new tokens (tokens/s, best of 3)")
    same = {"fp32": "llama.cpp f32", "bf16": "llama.cpp f16", "int8": "llama.cpp q8_0"}
    for name, mc in SHAPES.items():
        if args.only and name != args.only:
            continue
        torch.manual_seed(0)
        model = Llama(mc).eval()
        n = model.n_params()
        print(f"\n== {name}: {n / 1e6:.1f}M parameters ({mc.n_layers} layers, d_model {mc.d_model}, vocab "
              f"{mc.vocab_size})")
        rows = [("hf generate fp32", time_hf(model, args.tokens), 4, None)]
        for dtype, bpw in (("fp32", 4), ("bf16", 2), ("int8", 1)):
            tps, _ = time_flopwise(copy.deepcopy(model), dtype, args.tokens, compile="off")
            rows.append((f"flopwise {dtype} torch", tps, bpw, None))
            if not args.no_compile and dtype != "bf16":  # the C step reads fp32 and int8 weights
                tps, seconds = time_flopwise(copy.deepcopy(model), dtype, args.tokens, compile="on")
                rows.append((f"flopwise {dtype} C step", tps, bpw, seconds))
        for quant, bpw in (("f32", 4), ("f16", 2), ("q8_0", 34 / 32)):
            rows.append((f"llama.cpp {quant}", time_llama_cpp(model, quant, args.tokens, args.threads), bpw, None))
        rate = {label: tps for label, tps, _, _ in rows}
        hf = rate["hf generate fp32"]
        print(f"{'runtime':<26}{'tok/s':>9}{'vs HF':>8}{'vs llama.cpp':>14}{'ceiling':>9}  first call")
        for label, tps, bpw, seconds in rows:
            if tps is None or tps != tps:
                print(f"{label:<26}{'n/a':>9}")
                continue
            ceiling = bw * 1e9 / weight_bytes_per_token(mc, bpw)
            vs_hf = f"{tps / hf:.2f}x" if hf else "n/a"
            ref = rate.get(same.get(label.split()[1], "")) if label.startswith("flopwise") else None
            vs_cpp = f"{tps / ref:.2f}x" if ref else ""
            print(f"{label:<26}{tps:>9.1f}{vs_hf:>8}{vs_cpp:>14}{ceiling:>9.0f}  "
                  + (f"{seconds:.0f} s" if seconds is not None else ""))
    if not args.no_server and (not args.only or args.only == "15m"):
        print("\n== flopwise serve (15M, fp32, 64 new tokens a request, streamed, clients in another process): "
              "completion tokens/s")
        counts = [1, 4, 16]
        modes = ["off"] if args.no_compile else ["off", "on"]
        rates = {mode: server_throughput(counts, 64, args.threads, mode) for mode in modes}
        print(f"{'clients':>7}" + "".join(f"{'torch' if m == 'off' else 'C step':>10}" for m in modes))
        for i, clients in enumerate(counts):
            print(f"{clients:>7}" + "".join(f"{rates[m][i]:>10.1f}" for m in modes))


if __name__ == "__main__":
    main()
