"""The C decode step (``step.c``): built once per machine with the system C compiler, loaded with ctypes.

``library()`` compiles ``step.c`` into flopwise's cache folder (``-O3 -march=native``, OpenMP where the compiler
has it), keyed by the source, the compiler and the CPU, so a build is reused until one of them changes; it
raises ``NativeUnavailable`` with the reason where no compiler builds it. ``NativeStep`` binds a decode model's
weights and a KV cache to the C structs once; each call then decodes one token for a batch of rows.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from flopwise.fsutil import cache_root

SOURCE = Path(__file__).with_name("step.c")
_P, _I = ctypes.c_void_p, ctypes.c_int32


class NativeUnavailable(Exception):
    """The C step cannot be built or used here; the message says why."""


class _Mat(ctypes.Structure):
    _fields_ = [("w", _P), ("scale", _P), ("rows", _I), ("cols", _I)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), ("qkv", _Mat), ("wo", _Mat), ("gate_up", _Mat),
                ("down", _Mat), ("keys", _P), ("values", _P)]


class _Model(ctypes.Structure):
    _fields_ = [(name, _I) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab",
                                        "seq_len", "max_batch")] + \
               [("eps", ctypes.c_float), ("embed", _P), ("norm", _P), ("head", _Mat), ("rope_cos", _P),
                ("rope_sin", _P), ("layers", ctypes.POINTER(_Layer))] + \
               [(name, _P) for name in ("x", "h", "qkv", "att", "gu", "ff", "scores")]


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_id() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({x for x in lines if x.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor()


_LIB: ctypes.CDLL | None = None


def library(flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled step, built on first use (about a second) or loaded from the cache. ``flags`` adds compiler
    flags (the tests build the AVX2 and plain-C variants with -mno-avx512f, -mno-avx2); the default build is
    loaded once a process."""
    global _LIB
    if _LIB is not None and not flags:
        return _LIB
    cc = _compiler()
    if cc is None:
        raise NativeUnavailable("no C compiler (cc, gcc or clang; or set CC)")
    try:
        source = SOURCE.read_bytes()
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeUnavailable(f"the C decode step's source or {cc} --version: {e}") from None
    key = hashlib.sha256(b"\0".join([source, cc.encode(), version.encode(), _cpu_id().encode(),
                                     platform.machine().encode(), " ".join(flags).encode()])).hexdigest()[:16]
    path = cache_root() / "native" / f"step-{key}.so"
    if not path.exists():
        _build(cc, path, list(flags))
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # a cache folder mounted noexec, a library from another machine
        raise NativeUnavailable(f"the C decode step built but does not load: {e}") from None
    lib.fw_step.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, _P, ctypes.c_int, _P, _P, ctypes.c_int]
    lib.fw_step.restype = ctypes.c_int
    if not flags:
        _LIB = lib
    return lib


def _build(cc: str, path: Path, extra: list[str]) -> None:
    """Compile into a temporary sibling and rename: a process that dies mid-build leaves no half library, and
    two processes building at once each rename a whole one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    # OpenMP first (the products split across threads); a compiler without it (Apple clang) builds a serial step
    for flags in (["-march=native", "-fopenmp"], ["-march=native"], ["-fopenmp"], []):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".so.tmp")
        os.close(fd)
        try:
            r = subprocess.run([cc, "-O3", "-shared", "-fPIC", *flags, *extra, str(SOURCE), "-o", tmp, "-lm"],
                               capture_output=True, text=True, timeout=300)
            if r.returncode == 0:
                os.replace(tmp, path)
                return
            errors.append((r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1])
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(str(e))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise NativeUnavailable(f"{cc} could not build the C decode step: {errors[0][:160]}")


def _mat(module: nn.Module, keep: list) -> _Mat:
    """A linear layer as the C struct: fp32 weights as they are (out, in); a dynamically quantized one as its
    int8 weights and per-row scales (symmetric: zero points 0)."""
    if isinstance(module, nn.Linear):
        w = module.weight.detach()
        if w.dtype != torch.float32 or not w.is_contiguous():
            raise NativeUnavailable(f"weights of dtype {w.dtype}: the C step reads fp32 or int8")
        keep.append(w)
        return _Mat(w.data_ptr(), None, w.shape[0], w.shape[1])
    if not callable(getattr(module, "weight", None)):
        raise NativeUnavailable(f"a {type(module).__name__} layer: the C step reads nn.Linear or int8 weights")
    q = module.weight()  # torch.ao's dynamic quantized Linear: a per-channel qint8 tensor
    if q.dtype != torch.qint8:
        raise NativeUnavailable(f"quantized weights of dtype {q.dtype}: the C step reads qint8")
    if q.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine) or \
            bool(q.q_per_channel_zero_points().any()):
        raise NativeUnavailable("int8 weights with zero points: the C step reads symmetric per-row scales")
    w = q.int_repr().contiguous()
    scale = q.q_per_channel_scales().float().contiguous()
    keep += [w, scale]
    return _Mat(w.data_ptr(), scale.data_ptr(), w.shape[0], w.shape[1])


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
        self.model.embed = self._f32(model.embed.weight)
        self.model.norm = self._f32(model.norm.weight)
        self.model.head = _mat(model.head, self._keep)
        self.model.rope_cos, self.model.rope_sin = self._f32(model.rope_cos), self._f32(model.rope_sin)
        self._layers = (_Layer * c.n_layers)()
        for lay, block in zip(self._layers, model.layers, strict=True):
            lay.attn_norm, lay.mlp_norm = self._f32(block.attn_norm.weight), self._f32(block.mlp_norm.weight)
            lay.qkv, lay.wo = _mat(block.qkv, self._keep), _mat(block.wo, self._keep)
            lay.gate_up, lay.down = _mat(block.gate_up, self._keep), _mat(block.w_down, self._keep)
        self.model.layers = self._layers
        self.cache = None

    def _f32(self, t: torch.Tensor) -> int:
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
                  "gu": 2 * c.d_ff, "ff": c.d_ff, "scores": c.n_heads * c.seq_len}
        self.scratch = {name: torch.empty(rows, width) for name, width in widths.items()}
        for name, t in self.scratch.items():
            setattr(c, name, t.data_ptr())
        c.max_batch = rows
        self.cache = cache

    def __call__(self, tokens: torch.Tensor, pos: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, vocab) after tokens (B,) or (B, 1) at position ``pos``; ``key_mask`` (B, context) marks the
        keys each row may attend to (None: all of 0..pos)."""
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()
        b = tokens.shape[0]
        logits = torch.empty(b, self.model.vocab)
        mask = None if key_mask is None else key_mask[:b].to(torch.uint8).contiguous()
        rc = self.lib.fw_step(ctypes.byref(self.model), b, tokens.data_ptr(), pos,
                              None if mask is None else mask.data_ptr(), logits.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise ValueError(f"the C decode step refused batch {b} at position {pos} (tokens {tokens.tolist()[:4]})")
        return logits
