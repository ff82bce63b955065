"""The C decode step (``step.c``): built once per machine with the system C compiler, loaded with ctypes.

``library()`` builds ``step.c`` through ``flopwise.cbuild`` (cached per source, compiler and CPU) and raises
``NativeUnavailable`` with the reason where no compiler builds it. ``NativeStep`` binds a decode model's
weights and a KV cache to the C structs once; each call then decodes one token for a batch of rows.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from flopwise.cbuild import Builds, NativeUnavailable

SOURCE = Path(__file__).with_name("step.c")
_P, _I = ctypes.c_void_p, ctypes.c_int32


class _Mat(ctypes.Structure):
    _fields_ = [("w", _P), ("scale", _P), ("wsum", _P), ("rows", _I), ("cols", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), ("qkv", _Mat), ("wo", _Mat), ("gate_up", _Mat),
                ("down", _Mat), ("keys", _P), ("values", _P)]


class _Model(ctypes.Structure):
    _fields_ = [(name, _I) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab",
                                        "seq_len", "max_batch")] + \
               [("eps", ctypes.c_float), ("embed", _P), ("norm", _P), ("head", _Mat), ("rope_cos", _P),
                ("rope_sin", _P), ("layers", ctypes.POINTER(_Layer))] + \
               [(name, _P) for name in ("x", "h", "qkv", "att", "gu", "ff", "scores", "xq", "xs")]


def _declare(lib: ctypes.CDLL) -> None:
    lib.fw_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, _P, ctypes.c_int, _P, _P, ctypes.c_int]
    lib.fw_step.restype = ctypes.c_int
    lib.fw_build.restype = ctypes.c_int


# library(flags): the compiled step, built on first use (about a second) or loaded from the cache; the default
# build is loaded once a process, and a failure is remembered (flopwise.cbuild.Builds)
library = Builds(SOURCE, "the C decode step", _declare)


def _mat(module: nn.Module, shape: tuple[int, int], keep: list, integer: bool) -> _Mat:
    """A linear layer of weight ``shape`` (out, in) as the C struct: fp32 weights as they are; a dynamically
    quantized one as its int8 weights and per-row scales (symmetric: zero points 0). ``integer``: the build
    multiplies int8 in integers (VNNI), whose sums must stay inside int32."""
    if isinstance(module, nn.Linear):
        w, scale, bias = module.weight.detach(), None, module.bias
        if w.dtype != torch.float32:
            raise NativeUnavailable(f"weights of dtype {w.dtype}: the C step reads fp32 or int8")
        w = _huge(w)
        module.weight.data = w  # PyTorch's prefill reads the same copy
    else:
        if not callable(getattr(module, "weight", None)):
            raise NativeUnavailable(f"a {type(module).__name__} layer: the C step reads nn.Linear or int8 weights")
        q = module.weight()  # torch.ao's dynamic quantized Linear: a per-channel qint8 tensor
        if q.dtype != torch.qint8 or q.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine):
            raise NativeUnavailable(f"{q.dtype} weights quantized {q.qscheme()}: the C step reads qint8 per channel")
        if bool(q.q_per_channel_zero_points().any()):
            raise NativeUnavailable("int8 weights with zero points: the C step reads symmetric per-row scales")
        w, scale, bias = _huge(q.int_repr()), q.q_per_channel_scales().float().contiguous(), module.bias()
    if bias is not None:
        raise NativeUnavailable("a linear layer with a bias: the C step reads flopwise's bias-free layers")
    if tuple(w.shape) != shape:
        raise NativeUnavailable(f"a weight of shape {tuple(w.shape)} where the config says {shape}")
    if scale is None:
        keep.append(w)
        return _Mat(w.data_ptr(), None, None, w.shape[0], w.shape[1])
    if integer and w.shape[1] > 65_000:  # the integer kernel's sums stay inside int32: 255 * 128 * cols < 2**31
        raise NativeUnavailable(f"int8 rows of {w.shape[1]} weights: the C step reads up to 65,000")
    wsum = w.sum(1, dtype=torch.int32).contiguous()
    keep += [w, scale, wsum]
    return _Mat(w.data_ptr(), scale.data_ptr(), wsum.data_ptr(), w.shape[0], w.shape[1])


def _huge(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` in memory the kernel may back with 2 MB pages: NumPy asks for them (madvise) on
    large arrays, PyTorch does not. The int8 step at 110M went from 7.0 to 6.2 ms with them (2-core EPYC,
    transparent huge pages in madvise mode: 4 KB pages cost TLB misses when 110 MB stream by each token)."""
    out = torch.from_numpy(np.empty(tuple(t.shape), dtype=t.detach().numpy().dtype))
    return out.copy_(t)


class NativeStep:
    """A decode model (``flopwise.infer.generate.DecodeModel``, fp32 or int8 weights) bound to the C step.

    ``bind((keys, values))`` points it at a KV cache (a tensor a layer, (rows, kv heads, context, head dim),
    fp32, contiguous); ``__call__`` decodes one token for the first B rows. The tensors it points at are kept
    referenced here, so they live as long as the step."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL | None = None):
        self.lib = lib or library()
        c = model.config
        self._keep: list = []
        self.model = _Model(dim=c.d_model, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                            head_dim=c.head_dim, d_ff=c.d_ff, vocab=c.vocab_size, seq_len=c.seq_len, max_batch=0,
                            eps=model.norm.eps)
        d, hd, nh, nkv, dff = c.d_model, c.head_dim, c.n_heads, c.n_kv_heads, c.d_ff
        integer = bool(self.lib.fw_build() & 8)
        if nh * hd != d or nh % nkv or hd % 2:
            raise NativeUnavailable(f"heads {nh} x {hd} for d_model {d}, {nkv} kv heads: not a shape the C step reads")
        # the head first: tied to the embedding, its copy is then the embedding's too
        self.model.head = _mat(model.head, (c.vocab_size, d), self._keep, integer)
        self.model.embed = self._f32(model.embed.weight, (c.vocab_size, d))
        self.model.norm = self._f32(model.norm.weight, (d,))
        self.model.rope_cos = self._f32(model.rope_cos, (c.seq_len, hd))
        self.model.rope_sin = self._f32(model.rope_sin, (c.seq_len, hd))
        self._layers = (_Layer * c.n_layers)()
        for lay, block in zip(self._layers, model.layers, strict=True):
            lay.attn_norm = self._f32(block.attn_norm.weight, (d,))
            lay.mlp_norm = self._f32(block.mlp_norm.weight, (d,))
            lay.qkv = _mat(block.qkv, ((nh + 2 * nkv) * hd, d), self._keep, integer)
            lay.wo = _mat(block.wo, (d, d), self._keep, integer)
            lay.gate_up = _mat(block.gate_up, (2 * dff, d), self._keep, integer)
            lay.down = _mat(block.w_down, (d, dff), self._keep, integer)
        self.model.layers = self._layers
        self.cache = None

    def _f32(self, t: torch.Tensor, shape: tuple[int, ...]) -> int:
        if tuple(t.shape) != shape:
            raise NativeUnavailable(f"a tensor of shape {tuple(t.shape)} where the config says {shape}")
        t = t.detach().float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def bind(self, cache: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
        """Decode into this cache, (keys, values), from now on (and size the scratch buffers for its rows)."""
        keys, values = cache
        c, rows = self.model, keys[0].shape[0]
        for t in (*keys, *values):
            if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != (rows, c.n_kv_heads, c.seq_len,
                                                                                 c.head_dim):
                raise NativeUnavailable("the KV cache must be fp32, contiguous, (rows, kv heads, context, head dim)")
        for lay, k, v in zip(self._layers, keys, values, strict=True):
            lay.keys, lay.values = k.data_ptr(), v.data_ptr()
        widths = {"x": c.dim, "h": c.dim, "qkv": (c.n_heads + 2 * c.n_kv_heads) * c.head_dim, "att": c.dim,
                  "gu": 2 * c.d_ff, "ff": c.d_ff, "scores": c.n_heads * c.seq_len, "xs": 1}
        self.scratch = {name: torch.empty(rows, width, dtype=torch.float32) for name, width in widths.items()}
        self.scratch["xq"] = torch.empty(rows, max(c.dim, c.d_ff), dtype=torch.uint8)
        for name, t in self.scratch.items():
            setattr(c, name, t.data_ptr())
        c.max_batch = rows
        self.cache = cache

    def __call__(self, tokens: torch.Tensor, pos: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, vocab) after tokens (B,) or (B, 1) at position ``pos``; ``key_mask`` (B, context) marks the
        keys each row may attend to (None: all of 0..pos)."""
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()
        b, c = tokens.shape[0], self.model
        if self.cache is None:
            raise ValueError("the C decode step has no KV cache: bind one first")
        if key_mask is not None and (key_mask.dim() != 2 or key_mask.shape[0] < b or key_mask.shape[1] != c.seq_len):
            raise ValueError(f"key_mask of shape {tuple(key_mask.shape)}: the C step reads ({b}, {c.seq_len})")
        logits = torch.empty(b, c.vocab, dtype=torch.float32)
        # a bool tensor is one byte of 0 or 1 an element: what C reads, without a copy a step
        mask = None if key_mask is None else key_mask[:b].to(torch.bool).contiguous()
        rc = self.lib.fw_step(ctypes.byref(self.model), b, tokens.data_ptr(), pos,
                              None if mask is None else mask.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"the C decode step refused batch {b} at position {pos} (tokens {tokens.tolist()[:4]})")
        return logits
