"""CPU-first generation: a preallocated KV cache, sampling, stop strings, streaming, batches.

A batch of prompts is left-padded and the pad keys are masked: rotary embeddings make attention
depend only on relative positions, so a uniform shift of a row's positions changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import resource
import sys
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from flopwise.data.tokenizer import BOS_ID, EOS_ID
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text, cache_root
from flopwise.model.compiling import use_compile_cache
from flopwise.model.llama import Llama, apply_rope

COMPILE_MODES = ("auto", "on", "off")
_STEP_IDS = itertools.count()


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
        """Keys and values, a tensor a layer of one static shape (batch, kv heads, context, head dim). One tensor
        a layer, not one for all: a compiled step that writes into a slice of one big input copies all of it."""
        c = self.config
        shape = (batch, c.n_kv_heads, c.seq_len, c.head_dim)
        return ([torch.zeros(shape, dtype=dtype) for _ in range(c.n_layers)],
                [torch.zeros(shape, dtype=dtype) for _ in range(c.n_layers)])

    def step(self, token: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, keys: list[torch.Tensor],
             values: list[torch.Tensor]) -> torch.Tensor:
        """One decoded token per row at position ``pos`` (1,), over the whole static cache (keys where ``valid``
        (B, context) is false are masked), the cache written in place: every shape is fixed, so this is the
        graph torch.compile captures once (the engine runs it for single prompts). Returns the logits (B, vocab)."""
        b = token.shape[0]
        x = self.embed(token)
        cos, sin = self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos)
        for i, layer in enumerate(self.layers):
            hd, nh, nkv = layer.head_dim, layer.n_heads, layer.n_kv_heads
            qkv = _linear(layer.qkv, _rms(x, layer.attn_norm)).view(b, 1, nh + 2 * nkv, hd).transpose(1, 2)
            qk = apply_rope(qkv[:, :nh + nkv], cos, sin)
            keys[i].index_copy_(2, pos, qk[:, nh:])
            values[i].index_copy_(2, pos, qkv[:, nh + nkv:])
            y = _decode_attention(qk[:, :nh], keys[i], values[i], valid)
            x = x + _linear(layer.wo, y.transpose(1, 2).reshape(b, 1, -1))
            gu = _linear(layer.gate_up, _rms(x, layer.mlp_norm))
            x = x + _linear(layer.w_down, F.silu(gu[..., :layer.d_ff]) * gu[..., layer.d_ff:])
        return _linear(self.head, _rms(x[:, -1], self.norm))


class Engine:
    """A model prepared for decoding: inference mode, KV caches reused across calls.

    ``compile``: on runs a single prompt's decode steps through torch.compile (inductor's C++ code, compiled
    once, cached on disk), off never, auto where this machine measured the compiled step faster for this
    model (``settle_compile`` times it; ``generate --bench`` records its mode's rate). Prefill and batches
    stay eager. A compile that fails falls back to eager for good, with one line on ``log``."""

    def __init__(self, model: Llama, sp, dtype: str = "fp32", compile: str = "off", log=None):
        if compile not in COMPILE_MODES:
            raise FlopwiseError(f"--compile must be {', '.join(COMPILE_MODES)}, got {compile!r}")
        self.sp, self.dtype = sp, dtype
        self.config = model.config
        # a private copy: casting or quantising must not change the caller's model
        self.model = prepare_model(DecodeModel(copy.deepcopy(model).eval()).eval(), dtype)
        self.cache = None  # eager: grows to the largest batch seen, rows sliced off for smaller ones
        self.cache1 = None  # the compiled step's: one row, a static shape
        self._views = None
        self.log = log or (lambda m: print(m, file=sys.stderr))
        self.speed_key = json.dumps([torch.__version__, sorted(dataclasses.asdict(self.config).items()), dtype,
                                     torch.get_num_threads()])
        self.mode = compile
        self.compiled = compile == "on" or (compile == "auto" and _measured_faster(self.speed_key))
        self._step = None  # the compiled step, made on first use

    def settle_compile(self, steps: int = 48) -> dict | None:
        """For --compile auto in a long-lived command (chat, serve): where this machine has no measurement for
        this model yet, time ``steps`` eager and compiled batch-1 steps (compiling once: 5-30 s), record both and
        keep the faster. Returns the rates measured, or None when nothing was measured."""
        width = min(16, self.config.seq_len // 4)
        if self.mode != "auto" or _recorded(self.speed_key) or width < 2:
            return None
        self.log("note: timing the compiled decode step against eager once for this model on this machine "
                 "(--compile auto; compiling takes 5-30 s; --compile off skips this)")
        prompt = [bench_prompt(self.config.vocab_size, width)]
        s = Sampling(max_new_tokens=min(steps, self.config.seq_len - width), temperature=0, ignore_eos=True)
        rates = {}
        for compiled in (False, True):
            self.compiled = compiled
            for _ in self.stream_ids(prompt, Sampling(max_new_tokens=4, temperature=0)):  # warm-up (compiles)
                pass
            if compiled and not self.compiled:  # the compile failed: eager it stays, and auto does not try again
                record_speed(self.speed_key, True, 0.0)
                return rates
            t0 = time.perf_counter()
            n = sum(1 for _ in self.stream_ids(prompt, s))
            rates["compiled" if compiled else "eager"] = n / (time.perf_counter() - t0)
            record_speed(self.speed_key, compiled, rates["compiled" if compiled else "eager"])
        self.compiled = _measured_faster(self.speed_key)
        self.log(f"note: decoding at {rates['eager']:,.0f} tok/s eager, {rates['compiled']:,.0f} compiled: "
                 f"{'compiled' if self.compiled else 'eager'} from now on")
        return rates

    # -- tokens --
    def encode_prompt(self, prompt: str) -> list[int]:
        return [BOS_ID] + self.sp.encode(prompt)

    def _cache(self, batch: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        act = torch.bfloat16 if self.dtype == "bf16" else torch.float32
        if batch == 1 and self.compiled:
            if self.cache1 is None:
                self.cache1 = self.model.new_cache(1, dtype=act)
            return self.cache1
        if self.cache is None or self.cache[0][0].shape[0] < batch:
            self.cache, self._views = self.model.new_cache(batch, dtype=act), None
        if self.cache[0][0].shape[0] == batch:
            return self.cache
        if self._views is None or self._views[0] != batch:
            self._views = (batch, tuple([t[:batch] for t in kv] for kv in self.cache))
        return self._views[1]

    @torch.inference_mode()
    def _decode(self, tokens: torch.Tensor, pos: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits after one new token per row at ``pos``: the compiled step for a single row where it is on
        (batch 1 is where per-op overhead costs most; a batch of rows shares it, and would compile again
        for each new batch size), else eager."""
        if not self.compiled or tokens.shape[0] != 1:
            return self._forward(tokens, pos, None if key_mask is None else key_mask[:, :pos + 1])
        keys, values = self._cache(1)
        valid = (torch.arange(self.config.seq_len) <= pos)[None]
        if key_mask is not None:
            valid = valid & key_mask
        try:
            if self._step is None:
                use_compile_cache()
                # guards on the module's weights cost ~0.1 ms a call, and they cannot change inside an engine; dynamo
                # keeps compiled graphs per code object, so each engine gets its own copy of step's code: another
                # engine's model (other weights, heads) can never reuse this one's unguarded graph
                fn = DecodeModel.step
                code = fn.__code__.replace(co_name=f"step_{next(_STEP_IDS)}")
                own = types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                                                          fn.__closure__), self.model)
                self._step = torch.compile(own, fullgraph=True, dynamic=False, options={
                    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
            return self._step(tokens, torch.tensor([pos]), valid, keys, values)
        except Exception as e:  # inductor raises many kinds (no compiler, an unsupported op): decode eagerly instead
            why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            self.log(f"note: the compiled decode step failed ({why}); decoding eagerly")
            self.compiled, self._step = False, None
            self.cache, self._views = self.cache1, None  # it holds this prompt's keys so far
            return self._forward(tokens, pos, None if key_mask is None else key_mask[:, :pos + 1])

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
        if batch == 1:
            record_speed(self.speed_key, self.compiled, decode)  # what --compile auto decides by
        return {"prompt_tok_per_s": batch * prompt_tokens / t_prompt, "decode_tok_per_s": decode, "new_tokens": n,
                "batch": batch, "dtype": self.dtype, "compiled": self.compiled,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bench_prompt(vocab_size: int, tokens: int) -> list[int]:
    """A fixed prompt of ``tokens`` ids (bos, then a spread of ordinary ids) for timing a decoder."""
    return [BOS_ID] + [3 + (i * 7) % (vocab_size - 3) for i in range(tokens - 1)]


def _speeds_path():
    return cache_root() / "decode_speed.json"


def _speeds() -> dict:
    """Every recorded rate, {key: {"eager": tok/s, "compiled": tok/s}}; nothing where the file is missing or bad."""
    try:
        speeds = json.loads(_speeds_path().read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in speeds.items() if isinstance(v, dict)} if isinstance(speeds, dict) else {}


def _measured_faster(key: str) -> bool:
    """Whether this machine measured the compiled step faster than eager for this key (by over 5%)."""
    rates = _speeds().get(key, {})
    return rates.get("compiled", 0) > 1.05 * rates.get("eager", float("inf"))


def _recorded(key: str) -> bool:
    return {"compiled", "eager"} <= set(_speeds().get(key, {}))


def record_speed(key: str, compiled: bool, tokens_per_s: float) -> None:
    """Remember a measured rate (best effort: a cache folder that cannot be written only costs re-measuring)."""
    speeds = _speeds()
    speeds.setdefault(key, {})
    speeds[key]["compiled" if compiled else "eager"] = tokens_per_s
    try:
        atomic_write_text(_speeds_path(), json.dumps(speeds) + "\n")
    except OSError:
        pass


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


# the same product as one opaque op for torch.compile: inductor fuses what lies between the matmuls, and
# the matmuls stay BLAS calls cut across threads (inductor's own lowering of this bmm ran 3x slower)
@torch.library.custom_op("flopwise::split_matmul", mutates_args=())
def split_matmul(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    return _split_matmul(x, weight_t)


@split_matmul.register_fake
def _(x: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight_t.shape[0] * weight_t.shape[2]))


def _linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A linear layer inside the compiled step: TLinear's product as the opaque op, anything else as it is."""
    if isinstance(module, TLinear):
        return split_matmul(x, module.weight_t)
    return module(x)


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


def prepare_model(model: nn.Module, dtype: str) -> nn.Module:
    """fp32 as is; bf16 weights; int8: dynamically quantized linear layers (weights int8 per channel)."""
    parts = torch.get_num_threads()  # the threads decoding will run on (the CLI sets them first)
    if dtype == "fp32":
        return _transpose_linears(model.float(), parts)
    if dtype == "bf16":  # nn.Linear's bf16 kernel (oneDNN): 1.3x faster than x @ W^T at 110M, 1.15x slower at 15M
        return model.to(torch.bfloat16)
    if dtype == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # imported under the filter: torch.ao.quantization warns of its deprecation on import
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            return quantize_dynamic(model.float(), {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=False)
    raise FlopwiseError(f"unknown runtime dtype {dtype!r}: choose fp32, bf16 or int8")
