"""Decode speed: flopwise's CPU runtime against Hugging Face generate (and llama.cpp if installed).

One invocation, same machine, same weights (random: speed does not depend on training), batch 1,
a 16-token prompt, 128 new tokens, greedy, eos ignored so every run decodes the whole budget.
Models: ~15M parameters (6 layers, d_model 288, vocab 32000, llama2.c's "stories15M" shape)
and ~110M (12 layers, d_model 768). The ceiling is memory bandwidth over the weight bytes each
token reads (bandwidth measured here with a large array copy).

    python benchmarks/decode_speed.py [--only 15m|110m] [--tokens 128] [--threads N]
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


def time_flopwise(model: Llama, dtype: str, new_tokens: int) -> float:
    eng = Engine(model, sp=None, dtype=dtype)
    prompt = [[1] + list(range(10, 10 + PROMPT - 1))]
    s = Sampling(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    for _ in eng.stream_ids(prompt, Sampling(max_new_tokens=8, temperature=0, ignore_eos=True)):
        pass
    best = 0.0
    for _ in range(2):
        t = time.perf_counter()
        n = sum(1 for _ in eng.stream_ids(prompt, s))
        best = max(best, n / (time.perf_counter() - t))
    return best


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
        for _ in range(2):
            llm.reset()
            t = time.perf_counter()
            llm.eval(prompt)
            n = 0
            for _ in range(new_tokens):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                llm.eval([tok])
                n += 1
            best = max(best, n / (time.perf_counter() - t))
        return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bw = bandwidth_gb_s()
    print(f"torch {torch.__version__}, {args.threads} threads, measured memory bandwidth {bw:.1f} GB/s, "
          f"batch 1, prompt {PROMPT}, {args.tokens} new tokens (tokens/s, best of 2)")
    for name, mc in SHAPES.items():
        if args.only and name != args.only:
            continue
        torch.manual_seed(0)
        model = Llama(mc).eval()
        n = model.n_params()
        print(f"\n== {name}: {n / 1e6:.1f}M parameters ({mc.n_layers} layers, d_model {mc.d_model}, vocab "
              f"{mc.vocab_size})")
        hf = time_hf(model, args.tokens)
        rows = [("hf generate fp32", hf, 4)]
        for dtype, bpw in (("fp32", 4), ("bf16", 2), ("int8", 1)):
            rows.append((f"flopwise {dtype}", time_flopwise(copy.deepcopy(model), dtype, args.tokens), bpw))
        for quant, bpw in (("f32", 4), ("q8_0", 34 / 32)):
            rows.append((f"llama.cpp {quant}", time_llama_cpp(model, quant, args.tokens, args.threads), bpw))
        fp32 = rows[1][1]
        print(f"{'runtime':<20}{'tok/s':>9}{'vs HF':>8}{'vs fp32':>9}{'ceiling':>9}")
        for label, tps, bpw in rows:
            if tps is None:
                print(f"{label:<20}{'n/a':>9}")
                continue
            ceiling = bw * 1e9 / weight_bytes_per_token(mc, bpw)
            vs_hf = f"{tps / hf:.2f}x" if hf else "n/a"
            print(f"{label:<20}{tps:>9.1f}{vs_hf:>8}{tps / fp32:>8.2f}x{ceiling:>9.0f}")


if __name__ == "__main__":
    main()
