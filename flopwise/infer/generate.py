"""CPU-first generation: a preallocated KV cache, sampling, stop strings, streaming, batches.

A batch of prompts is left-padded and the pad keys are masked: rotary embeddings make attention
depend only on relative positions, so a uniform shift of a row's positions changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import resource
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from flopwise.data.tokenizer import BOS_ID, EOS_ID
from flopwise.errors import FlopwiseError
from flopwise.infer.native import NativeStep, NativeUnavailable, library
from flopwise.model.llama import Llama, apply_rope

COMPILE_MODES = ("auto", "on", "off")


@dataclass
class Sampling:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_new_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text (CTRL's rule)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # decode the whole budget (benchmarks)

    def check(self) -> None:
        if self.temperature < 0:
            raise FlopwiseError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FlopwiseError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise FlopwiseError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise FlopwiseError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 1:
            raise FlopwiseError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")


def sample_next(logits: torch.Tensor, s: Sampling, history: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V); ``history`` (B, T) feeds the repetition penalty."""
    if s.temperature <= 0 and not s.ignore_eos and (s.repetition_penalty == 1.0 or history is None):
        return logits.argmax(-1)  # greedy, nothing to edit: no copy
    logits = logits.float().clone()  # a normal tensor (not an inference-mode one) that may be edited in place
    if s.ignore_eos:
        logits[:, EOS_ID] = float("-inf")
    if s.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = torch.gather(logits, 1, history)
        seen = torch.where(seen > 0, seen / s.repetition_penalty, seen * s.repetition_penalty)
        logits = logits.scatter(1, history, seen)
    if s.temperature <= 0:
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k and s.top_k < logits.shape[-1]:
        kth = torch.topk(logits, s.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > s.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


class DecodeBlock(nn.Module):
    """A block with Q, K, V fused into one projection and gate, up into another: fewer, larger matmuls
    per decoded token (a batch-1 decode step is dominated by per-call overhead and weight reads)."""

    def __init__(self, layer):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = layer.n_heads, layer.n_kv_heads, layer.head_dim
        self.attn_norm, self.mlp_norm, self.wo, self.w_down = layer.attn_norm, layer.mlp_norm, layer.wo, layer.w_down
        self.qkv = _fused([layer.wq, layer.wk, layer.wv])
        self.gate_up = _fused([layer.w_gate, layer.w_up])
        self.d_ff = layer.w_up.weight.shape[0]


def _fused(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([lin.weight.detach() for lin in linears], 0)
    out = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        out.weight.copy_(w)
    return out


class DecodeModel(nn.Module):
    def __init__(self, model: Llama):
        super().__init__()
        self.config = model.config
        self.embed, self.norm, self.head = model.embed, model.norm, model.head
        self.layers = nn.ModuleList(DecodeBlock(layer) for layer in model.layers)
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def new_cache(self, batch: int, dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Keys and values, a tensor a layer of one shape (batch, kv heads, context, head dim), zeros."""
        c = self.config
        shape = (batch, c.n_kv_heads, c.seq_len, c.head_dim)
        return ([torch.zeros(shape, dtype=dtype) for _ in range(c.n_layers)],
                [torch.zeros(shape, dtype=dtype) for _ in range(c.n_layers)])


class Engine:
    """A model prepared for decoding: inference mode, KV caches reused across calls.

    ``compile``: auto and on decode through the C step (``step.c``, compiled once per machine with its C
    compiler: ``flopwise.infer.native``) for fp32 and int8 weights, every batch size; prefill stays in PyTorch.
    off, bf16, or a machine where the step does not build decode with PyTorch alone (on says why in one line on
    ``log``; auto too, once per engine)."""

    def __init__(self, model: Llama, sp, dtype: str = "fp32", compile: str = "auto", log=None):
        if compile not in COMPILE_MODES:
            raise FlopwiseError(f"--compile must be {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.sp, self.dtype = sp, dtype
        self.config = model.config
        self.log = log or (lambda m: print(m, file=sys.stderr))
        native = compile != "off" and self._native_builds(dtype, loud=compile == "on")
        # a private copy: casting or quantising must not change the caller's model. With the C step the fp32
        # weights stay (out, in), the layout it reads (prefill's matmuls read either equally well).
        self.model = prepare_model(DecodeModel(copy.deepcopy(model).eval()).eval(), dtype, transpose=not native)
        self.native = None
        if native:
            try:
                self.native = NativeStep(self.model)
            except NativeUnavailable as e:
                self.log(f"note: {e}; decoding with PyTorch")
                self.model = prepare_model(DecodeModel(copy.deepcopy(model).eval()).eval(), dtype)
            if self.native is not None and not self.native.lib.fw_build() & 1:
                self.log("note: the C decode step was built without OpenMP (this compiler has none): one thread")
        self.cache = None  # grows to the largest batch seen, rows sliced off for smaller ones
        self._views = None

    @property
    def compiled(self) -> bool:
        """Whether tokens decode through the C step."""
        return self.native is not None

    def _native_builds(self, dtype: str, loud: bool) -> bool:
        if dtype not in ("fp32", "int8"):
            if loud:
                self.log(f"note: the C decode step reads fp32 or int8 weights; {dtype} decodes with PyTorch")
            return False
        try:
            library()
            return True
        except NativeUnavailable as e:
            self.log(f"note: {e}; decoding with PyTorch (slower)")
            return False

    # -- tokens --
    def encode_prompt(self, prompt: str) -> list[int]:
        return [BOS_ID] + self.sp.encode(prompt)

    def _cache(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        act = torch.bfloat16 if self.dtype == "bf16" else torch.float32
        if self.cache is None or self.cache[0][0].shape[0] < batch:
            self.cache, self._views = self.model.new_cache(batch, dtype=act), None
        if self.cache[0][0].shape[0] == batch:
            return self.cache
        if self._views is None or self._views[0] != batch:
            self._views = (batch, tuple([t[:batch] for t in kv] for kv in self.cache))
        return self._views[1]

    @torch.inference_mode()
    def _decode(self, tokens: torch.Tensor, pos: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, vocab) after one new token per row (B, 1) at ``pos``: the C step where it is on, writing
        into the first B rows of the same cache the prefill wrote, else PyTorch."""
        if self.native is None:
            return self._forward(tokens, pos, None if key_mask is None else key_mask[:, :pos + 1])
        self._cache(tokens.shape[0])
        if self.native.cache is not self.cache:  # a new (larger) cache: point the C structs at it
            self.native.bind(self.cache)
        return self.native(tokens, pos, key_mask)

    @torch.inference_mode()
    def _forward(self, tokens: torch.Tensor, start: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits of the last position; ``key_mask`` (B, start + T) marks real (non-pad) tokens."""
        m, b, t = self.model, tokens.shape[0], tokens.shape[1]
        keys, values = self._cache(b)
        cos, sin = m.rope_cos[start:start + t], m.rope_sin[start:start + t]
        x = m.embed(tokens)
        if t == 1 and key_mask is None:
            mask = None  # one new token sees every cached key
        else:
            causal = torch.ones(t, start + t, dtype=torch.bool).tril(diagonal=start)
            mask = causal[None, None] if key_mask is None else causal[None, None] & key_mask[:, None, None, :]
            if key_mask is not None:  # a pad query sees itself, so no row is fully masked (no NaN in the cache)
                mask = mask | torch.eye(t, start + t, dtype=torch.bool).roll(start, 1)[None, None]
        for layer, kc, vc in zip(m.layers, keys, values, strict=True):
            hd, nh, nkv = layer.head_dim, layer.n_heads, layer.n_kv_heads
            qkv = layer.qkv(_rms(x, layer.attn_norm)).view(b, t, nh + 2 * nkv, hd).transpose(1, 2)
            qk = apply_rope(qkv[:, :nh + nkv], cos, sin)  # q and k rotated in one pass
            q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv:]
            kc[:, :, start:start + t] = k
            vc[:, :, start:start + t] = v
            if t == 1:
                y = _decode_attention(q, kc[:, :, :start + 1], vc[:, :, :start + 1], key_mask)
            else:
                y = F.scaled_dot_product_attention(q, kc[:, :, :start + t], vc[:, :, :start + t], attn_mask=mask,
                                                   enable_gqa=nkv != nh)
            x = x + layer.wo(y.transpose(1, 2).reshape(b, t, -1))
            gu = layer.gate_up(_rms(x, layer.mlp_norm))
            x = x + layer.w_down(F.silu(gu[..., :layer.d_ff]) * gu[..., layer.d_ff:])
        return m.head(_rms(x[:, -1], m.norm))

    def stream_ids(self, prompts: list[list[int]], s: Sampling) -> Iterator[torch.Tensor]:
        """Yield the next token of every row, step by step, until all rows hit eos or the budget."""
        s.check()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise FlopwiseError("empty prompt")
        width = max(len(p) for p in prompts)
        ctx = self.config.seq_len
        if width >= ctx:
            raise FlopwiseError(f"the prompt has {width} tokens; the model's context is {ctx}: shorten it")
        budget = min(s.max_new_tokens, ctx - width)
        b = len(prompts)
        tokens = torch.full((b, width), EOS_ID, dtype=torch.long)
        real = torch.zeros(b, ctx, dtype=torch.bool)
        for i, p in enumerate(prompts):
            tokens[i, width - len(p):] = torch.tensor(p)
            real[i, width - len(p):] = True
        real[:, width:] = True
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        key_mask = None if all(len(p) == width for p in prompts) else real
        logits = self._forward(tokens, 0, None if key_mask is None else key_mask[:, :width])
        history = tokens.masked_fill(~real[:, :width], BOS_ID)  # pads are not text: no repetition penalty on them
        done = torch.zeros(b, dtype=torch.bool)
        for i in range(budget):
            nxt = sample_next(logits, s, history if s.repetition_penalty != 1.0 else None, gen)
            nxt = torch.where(done, torch.full_like(nxt, EOS_ID), nxt)
            yield nxt
            done |= nxt == EOS_ID
            if bool(done.all()) or i == budget - 1:
                return
            history = torch.cat([history, nxt[:, None]], 1)
            logits = self._decode(nxt[:, None], width + i, key_mask)

    def stream_text(self, prompt: str | list[int], s: Sampling, info: dict | None = None) -> Iterator[str]:
        """Decoded text pieces as they are generated; stops at eos or a stop string (not yielded).

        ``prompt`` is text (encoded after a bos) or token ids. ``info`` receives ``finish_reason``
        ('stop' or 'length'), ``prompt_tokens`` and ``completion_tokens``.
        """
        prompt_ids = self.encode_prompt(prompt) if isinstance(prompt, str) else prompt
        if info is not None:
            info.update(finish_reason="length", prompt_tokens=len(prompt_ids), completion_tokens=0)
        for _, piece, done in self.stream_texts([prompt_ids], [s]):
            if piece:
                yield piece
            if done is not None and info is not None:
                info.update(done)

    def stream_texts(self, prompts: list[list[int]], samplings: list[Sampling]
                     ) -> Iterator[tuple[int, str | None, dict | None]]:
        """Several prompts decoded as one batch, each with its own token budget and stop strings (the other
        sampling fields must agree: see ``batchable``). Yields (row, text piece, None) as text arrives and
        (row, None, info) once when a row ends; info as in stream_text. Ends when every row has ended."""
        shared = dataclasses.replace(samplings[0], max_new_tokens=max(x.max_new_tokens for x in samplings))
        rows = [_TextRow(self.sp, p, x) for p, x in zip(prompts, samplings, strict=True)]
        live = len(rows)
        for nxt in self.stream_ids(prompts, shared):
            for i, row in enumerate(rows):
                if row.info["finish_reason"] is None:
                    piece = row.add(int(nxt[i]))
                    if piece:
                        yield i, piece, None
                    if row.info["finish_reason"] is not None:
                        live -= 1
                        yield i, None, row.info
            if not live:
                return
        for i, row in enumerate(rows):  # the context ran out before a row's budget
            if row.info["finish_reason"] is None:
                piece = row.finish("length")
                if piece:
                    yield i, piece, None
                yield i, None, row.info

    def generate(self, prompts: list[str], s: Sampling) -> list[str]:
        """Completions of a batch of prompts (stop strings cut)."""
        outs: list[list[int]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        for nxt in self.stream_ids([self.encode_prompt(p) for p in prompts], s):
            for i, t in enumerate(nxt.tolist()):
                if not finished[i]:
                    if t == EOS_ID:
                        finished[i] = True
                    else:
                        outs[i].append(t)
        texts = [self.sp.decode(o) for o in outs]
        return [t[:c] if (c := _first_stop(t, s.stop)) is not None else t for t in texts]

    def bench(self, prompt_tokens: int = 32, new_tokens: int = 128, batch: int = 1) -> dict:
        """Prompt and decode tokens/s (greedy, no early stop) and peak resident memory."""
        prompt = [bench_prompt(self.config.vocab_size, prompt_tokens)] * batch
        new_tokens = min(new_tokens, self.config.seq_len - prompt_tokens)
        s = Sampling(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
        for _ in self.stream_ids(prompt, Sampling(max_new_tokens=4, temperature=0)):  # warm-up
            pass
        t0 = time.perf_counter()
        self._forward(torch.tensor(prompt), 0, None)
        t_prompt = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = sum(1 for _ in self.stream_ids(prompt, s))
        t_all = time.perf_counter() - t0
        decode = batch * max(n - 1, 1) / max(t_all - t_prompt, 1e-9)
        return {"prompt_tok_per_s": batch * prompt_tokens / t_prompt, "decode_tok_per_s": decode, "new_tokens": n,
                "batch": batch, "dtype": self.dtype, "compiled": self.compiled,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_prompt(vocab_size: int, tokens: int) -> list[int]:
    """A fixed prompt of ``tokens`` ids (bos, then a spread of ordinary ids) for timing a decoder."""
    return [BOS_ID] + [3 + (i * 7) % (vocab_size - 3) for i in range(tokens - 1)]


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """RMSNorm in one fused op, in fp32 as the training-time module computes it."""
    if x.dtype == torch.float32 and norm.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)
    return F.rms_norm(x.float(), (x.shape[-1],), norm.weight.float(), norm.eps).to(x.dtype)


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None):
    """Attention of one new query per row over the cache, as plain matmuls: for a single query,
    CPU SDPA kernels spend ~1 ms on set-up that this does in microseconds. Heads share K/V in groups."""
    b, nh, _, hd = q.shape
    nkv = k.shape[1]
    qg = q.view(b, nkv, nh // nkv, hd)
    scores = (qg @ k.transpose(-1, -2)).float() * (1.0 / math.sqrt(hd))  # (b, nkv, group, T)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    y = scores.softmax(-1).to(v.dtype) @ v  # (b, nkv, group, hd)
    return y.view(b, nh, 1, hd)


def batchable(a: Sampling, b: Sampling) -> bool:
    """Whether two requests may decode in one batch: the same token choice rule and no seed. A seeded request
    must give exactly the text it gives alone; a batch draws its random numbers for every row at once, and
    its matrix products round differently from a single row's (greedy text can differ at a near-tie)."""
    same = dataclasses.replace(a, max_new_tokens=0, stop=[]) == dataclasses.replace(b, max_new_tokens=0, stop=[])
    return same and a.seed is None and b.seed is None


class _TextRow:
    """One row's text as its tokens arrive: its budget, eos, stop strings (cut, never sent), and pieces
    held back while they could still become a stop string or an incomplete UTF-8 sequence."""

    def __init__(self, sp, prompt: list[int], s: Sampling):
        self.sp, self.s, self.ids, self.sent = sp, s, [], 0
        self.hold = max((len(x) for x in s.stop), default=0)
        self.info = {"finish_reason": None, "prompt_tokens": len(prompt), "completion_tokens": 0}

    def add(self, token: int) -> str | None:
        self.info["completion_tokens"] += 1
        if token == EOS_ID:
            return self.finish("stop")
        self.ids.append(token)
        text = self.sp.decode(self.ids)
        cut = _first_stop(text, self.s.stop)
        if cut is not None:
            self.info["finish_reason"] = "stop"
            piece, self.sent = text[self.sent:cut] if cut > self.sent else None, max(cut, self.sent)
            return piece
        if self.info["completion_tokens"] >= self.s.max_new_tokens:
            return self.finish("length", text)
        safe = len(text) - self.hold  # hold back what could be the start of a stop string
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence from byte tokens
            safe = min(safe, len(text.rstrip("\ufffd")))
        if safe > self.sent:
            piece, self.sent = text[self.sent:safe], safe
            return piece
        return None

    def finish(self, reason: str, text: str | None = None) -> str | None:
        self.info["finish_reason"] = reason
        text = self.sp.decode(self.ids) if text is None else text
        piece, self.sent = (text[self.sent:] if len(text) > self.sent else None), len(text)
        return piece


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(x) for x in stops if x) if i >= 0]
    return min(hits) if hits else None


def _split_matmul(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """x (..., in) times a transposed weight cut into column blocks (parts, in, out / parts)."""
    if weight_t.shape[0] == 1:
        return x @ weight_t[0]
    rows = x.reshape(1, -1, x.shape[-1]).expand(weight_t.shape[0], -1, -1)
    y = torch.bmm(rows, weight_t)  # (parts, rows, out / parts): one block a thread
    return y.transpose(0, 1).reshape(*x.shape[:-1], -1)


class TLinear(nn.Module):
    """y = x W^T for decoding, W stored transposed, (in, out), and cut into ``parts`` column blocks,
    (parts, in, out / parts), so that one batched matmul runs each block on its own thread. For a single row
    of x, CPU BLAS reads a transposed matrix up to 3x faster than nn.Linear's (out, in) one, and runs a
    plain matrix-vector product on one thread whatever the thread count (measured on a 2-core EPYC, all
    the GEMVs of a 15M model: 3.1 ms as x @ W on 1 or 2 threads, 1.9 ms cut in two)."""

    def __init__(self, lin: nn.Linear, parts: int = 1):
        super().__init__()
        w = lin.weight.detach().t()
        n_in, n_out = w.shape
        parts = parts if parts > 1 and n_out % parts == 0 else 1
        self.weight_t = nn.Parameter(w.reshape(n_in, parts, n_out // parts).transpose(0, 1).contiguous(),
                                     requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _split_matmul(x, self.weight_t)


def _transpose_linears(module: nn.Module, parts: int) -> nn.Module:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, TLinear(child, parts))
        else:
            _transpose_linears(child, parts)
    return module


def prepare_model(model: nn.Module, dtype: str, transpose: bool = True) -> nn.Module:
    """fp32 (``transpose``: as TLinears, for PyTorch's decoding; else nn.Linear's (out, in), for the C step);
    bf16 weights; int8: dynamically quantized linear layers (weights int8 per channel, symmetric)."""
    parts = torch.get_num_threads()  # the threads decoding will run on (the CLI sets them first)
    if dtype == "fp32":
        return _transpose_linears(model.float(), parts) if transpose else model.float()
    if dtype == "bf16":  # nn.Linear's bf16 kernel (oneDNN): 1.3x faster than x @ W^T at 110M, 1.15x slower at 15M
        return model.to(torch.bfloat16)
    if dtype == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # imported under the filter: torch.ao.quantization warns of its deprecation on import
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            return quantize_dynamic(model.float(), {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
    raise FlopwiseError(f"unknown runtime dtype {dtype!r}: choose fp32, bf16 or int8")
