"""The C training step (``step.c``): the Llama's forward, loss and gradients in one call, for the small models a
sweep trains on a CPU.

``library()`` builds ``step.c`` through ``flopwise.cbuild`` (cached per source, compiler and CPU; a failure is
remembered for the process). ``NativeTrainStep`` binds a model's weights and gradient buffers to the C structs
once; ``step(tokens, targets, scale)`` then adds one micro-batch's gradients (times ``scale``) to the parameters'
``.grad`` and returns its mean loss, as ``model(tokens, targets).backward()`` would in fp32. ``NativeUpdate`` then
clips the gradients and steps torch's AdamW and Muon in one call, on their own state tensors, so checkpoints stay
torch's. ``loss(tokens, targets)`` runs the forward alone: the evaluation's loss.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
from pathlib import Path

import torch

from flopwise.cbuild import Builds, NativeUnavailable
from flopwise.errors import FlopwiseError
from flopwise.model.llama import Llama

SOURCE = Path(__file__).with_name("step.c")


@functools.cache
def source_digest() -> str:
    """The C source's digest: a choice measured on another version of the step is void."""
    try:
        return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"  # library() then says why, and PyTorch trains
_P, _I = ctypes.c_void_p, ctypes.c_int32
_LAYER = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")


class _Layer(ctypes.Structure):
    _fields_ = [(name, _P) for name in _LAYER] + [("g_" + name, _P) for name in _LAYER]


class _Net(ctypes.Structure):
    _fields_ = [(name, _I) for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab",
                                        "seq_len", "bf16", "seqs_per_pass")] + \
               [("eps", ctypes.c_float)] + \
               [(name, _P) for name in ("embed", "norm", "head", "rope_cos", "rope_sin", "g_embed", "g_norm",
                                        "g_head")] + \
               [("layers", ctypes.POINTER(_Layer))]


class _Group(ctypes.Structure):
    _fields_ = [(name, _I) for name in ("muon", "nesterov", "ns_steps", "lr_ratio")] + \
               [(name, ctypes.c_double) for name in ("lr", "weight_decay", "beta1", "beta2", "eps", "momentum", "ns_a",
                                                     "ns_b", "ns_c", "ns_eps")]


class _Tensor(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("param", "grad", "avg", "avg_sq", "step")] + \
               [("rows", ctypes.c_long), ("cols", ctypes.c_long), ("group", _I)]


def _declare(lib: ctypes.CDLL) -> None:
    lib.fw_train_step.argtypes = [ctypes.POINTER(_Net), _P, _P, ctypes.c_int, ctypes.c_int, _P, ctypes.c_float]
    lib.fw_train_step.restype = ctypes.c_double
    lib.fw_loss.argtypes = [ctypes.POINTER(_Net), _P, _P, ctypes.c_int, ctypes.c_int, _P]
    lib.fw_loss.restype = ctypes.c_double
    lib.fw_train_floats.argtypes = [ctypes.POINTER(_Net), ctypes.c_int, ctypes.c_int]
    lib.fw_train_floats.restype = ctypes.c_long
    lib.fw_threads.argtypes = [ctypes.c_int]
    lib.fw_build.restype = ctypes.c_int
    lib.fw_update_floats.argtypes = [ctypes.POINTER(_Tensor), ctypes.c_int, ctypes.POINTER(_Group)]
    lib.fw_update_floats.restype = ctypes.c_long
    lib.fw_update.argtypes = [ctypes.POINTER(_Tensor), ctypes.c_int, ctypes.POINTER(_Group), ctypes.c_float, _P]
    lib.fw_update.restype = ctypes.c_double


# library(flags): the compiled training step, built on first use (about a second) or loaded from the cache; the
# default build is loaded once a process, and a failure is remembered (flopwise.cbuild.Builds)
library = Builds(SOURCE, "the C training step", _declare)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux: MemAvailable; elsewhere physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 1 << 62


def builds() -> bool:
    """Whether the C step builds (or loads from the cache) here."""
    try:
        library()
    except NativeUnavailable:
        return False
    return True


def has_bf16() -> bool:
    """Whether the C step built here multiplies in bf16 (AVX512_BF16)."""
    try:
        return bool(library().fw_build() & 2)
    except NativeUnavailable:
        return False


class NativeTrainStep:
    """``model``'s training micro-step in C, in fp32, or with ``bf16`` every product in bf16 (operands rounded to
    bf16, sums and outputs fp32, where bf16 autocast also rounds the outputs): the linear layers', the head's and
    attention's (QK^T, PV and their gradients, as flash attention runs them on GPUs; the softmax and its statistics
    stay fp32; steps 2-8% faster at d_model 16-128 than with fp32 attention products). With ``seqs_per_pass``, each
    thread runs that many sequences forward and backward at a time (activations that stay in the core's cache; only
    the order of the gradients' sums changes). The model's parameters must stay where they are (the optimizer
    updates them in place); each parameter's gradient lives in one buffer bound here, handed back to ``.grad``
    (zeroed) after the optimizer's ``zero_grad(set_to_none=True)``."""

    def __init__(self, model: Llama, bf16: bool = False, seqs_per_pass: int = 0):
        if not isinstance(model, Llama) or any(type(getattr(block, name)) is not torch.nn.Linear
                                               for block in model.layers for name in _LAYER if name[0] == "w"):
            raise NativeUnavailable("the C training step trains flopwise's Llama without adapters")
        c = model.config
        if c.head_dim % 2 or tuple(model.rope_cos.shape) != (c.seq_len, c.head_dim):
            raise NativeUnavailable(f"a head dimension of {c.head_dim}: the C training step rotates even ones")
        params = list(model.parameters())
        if any(p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous() for p in params):
            raise NativeUnavailable("the C training step reads contiguous fp32 weights on the CPU")
        self.lib = library()
        if bf16 and not has_bf16():
            raise NativeUnavailable("the C training step's bf16 needs AVX512_BF16, which this CPU or compiler lacks")
        self.model = model
        self.grads = [(p, torch.zeros_like(p)) for p in params]
        grad = {id(p): g for p, g in self.grads}
        self._layers = (_Layer * c.n_layers)()
        for i, block in enumerate(model.layers):
            for name in _LAYER:
                p = getattr(block, name).weight
                setattr(self._layers[i], name, p.data_ptr())
                setattr(self._layers[i], "g_" + name, grad[id(p)].data_ptr())
        ptr = {name: t.data_ptr() for name, t in (("embed", model.embed.weight), ("norm", model.norm.weight),
                                                  ("head", model.head.weight), ("rope_cos", model.rope_cos),
                                                  ("rope_sin", model.rope_sin))}
        self._net = _Net(c.d_model, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size,
                         c.seq_len, int(bf16), seqs_per_pass, c.norm_eps, ptr["embed"], ptr["norm"], ptr["head"],
                         ptr["rope_cos"], ptr["rope_sin"], grad[id(model.embed.weight)].data_ptr(),
                         grad[id(model.norm.weight)].data_ptr(), grad[id(model.head.weight)].data_ptr(),
                         self._layers)
        self._tensors = [*params, model.rope_cos, model.rope_sin]
        self._pointers = [t.data_ptr() for t in self._tensors]
        self._work = torch.empty(0)
        self._sized = (0, 0, 0)  # (sequences, tokens, threads) the workspace was last sized for

    def step(self, tokens: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> float:
        """Adds d(mean loss)/d(weights) x ``scale`` to each parameter's ``.grad``; returns the mean loss (nats)."""
        self._check(tokens, targets)
        for p, g in self.grads:
            if p.grad is g:  # bound (the C update zeroes it in place)
                continue
            if p.grad is None:
                p.grad = g.zero_()
            elif p.grad.data_ptr() != g.data_ptr():  # someone replaced .grad: carry it into the bound buffer
                g.copy_(p.grad)
                p.grad = g
        return self._call(self.lib.fw_train_step, tokens, targets, scale)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        """The mean loss (nats) of ``tokens`` predicting ``targets``, forward only (the gradients are untouched):
        the evaluation's, in the step's precision."""
        self._check(tokens, targets)
        return self._call(self.lib.fw_loss, tokens, targets)

    def _check(self, tokens: torch.Tensor, targets: torch.Tensor) -> None:
        if [t.data_ptr() for t in self._tensors] != self._pointers:
            raise RuntimeError("the model's weights moved since the C training step bound them")
        if tokens.dim() != 2 or tokens.shape != targets.shape or tokens.numel() == 0:
            raise FlopwiseError(f"tokens {tuple(tokens.shape)} and targets {tuple(targets.shape)}: the C training "
                                "step takes two equal (batch, tokens) arrays")
        if tokens.shape[1] > self.model.config.seq_len:
            raise FlopwiseError(f"sequence of {tokens.shape[1]} tokens exceeds the model's context "
                                f"{self.model.config.seq_len}")

    def _call(self, fn, tokens: torch.Tensor, targets: torch.Tensor, *scale: float) -> float:
        """fn (fw_train_step or fw_loss) on the batch, in a workspace sized for it; a NaN from a token outside the
        vocabulary becomes an error."""
        tokens = tokens.to(torch.int64).contiguous()
        targets = targets.to(torch.int64).contiguous()
        b, t = tokens.shape
        threads = torch.get_num_threads()
        self.lib.fw_threads(threads)
        if (b, t, threads) != self._sized:  # the workspace's size follows the step's shape and threads
            need = self.lib.fw_train_floats(ctypes.byref(self._net), b, t) + 16
            if self._work.numel() < need:
                if need * 4 > available_memory() // 2:  # torch.empty would succeed (overcommit), the step be killed
                    raise RuntimeError(f"can't allocate memory: the C training step's workspace for {b} x {t} tokens "
                                       f"({need * 4 / 2**30:.1f} GiB) exceeds half the available memory")
                self._work = torch.empty(need)
            self._sized = (b, t, threads)
        work = self._work.data_ptr()
        work += -work % 64  # each thread's share starts on a cache line
        loss = fn(ctypes.byref(self._net), tokens.data_ptr(), targets.data_ptr(), b, t, work, *scale)
        if math.isnan(loss) and any(bool((x.min() < 0) | (x.max() >= self.model.config.vocab_size))
                                    for x in (tokens, targets)):
            raise FlopwiseError("a token outside the model's vocabulary")
        return loss


_LR_RATIO = {None: 1, "original": 1, "match_rms_adamw": 2}  # torch.optim.Muon's adjust_lr_fn, as step.c numbers it

# Muon matrices up to this many elements (one thread, clipping and both optimizers, against torch's: 3.7x faster at
# d_model 16, 2.5x at 64, 1.1x at 128 (128 x 352), even at 256 (256 x 704), 0.8x at 512, where oneDNN's products
# beat step.c's)
UPDATE_MAX_ELEMENTS = 1 << 16


def _as_c_reads(state: dict, p: torch.Tensor) -> None:
    """An optimizer state as step.c reads and writes it in place: contiguous fp32 like the parameter on the CPU, and
    AdamW's step a float32 scalar (a checkpoint may hold a number, an older torch's, or another dtype)."""
    for name, t in state.items():
        if name == "step":
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"
                    and t.numel() == 1):
                state[name] = torch.tensor(float(t), dtype=torch.float32)
        elif isinstance(t, torch.Tensor) and (t.dtype != torch.float32 or t.device.type != "cpu"
                                              or not t.is_contiguous() or t.shape != p.shape):
            if t.numel() != p.numel():
                raise FlopwiseError(f"an optimizer state {name} of {tuple(t.shape)} for a parameter of "
                                    f"{tuple(p.shape)}: the checkpoint belongs to another model")
            state[name] = t.detach().to("cpu", torch.float32).reshape(p.shape).contiguous()


class NativeUpdate:
    """Gradient clipping and the optimizers' step in one C call: the same update as
    ``torch.nn.utils.clip_grad_norm_`` followed by ``step()`` of each of ``optimizers`` (torch.optim.AdamW and
    torch.optim.Muon, flopwise's BatchedMuon included), on their own state tensors (created as torch creates them),
    so checkpoints and a resume under either are the same; the gradients are then zeroed (not set to None), ready for
    the next step's micro-batches. AdamW's parameters and moments equal those of torch's fused AdamW (the trainer's) to
    the bit, but for a tensor's last partial vector of 16 (within an ulp there); Muon's Newton-Schulz iteration runs
    in bf16 as torch's does, and agreed bit for bit up to 64 x 176 (larger products flip some bf16 roundings, as a
    different summation order does). As for NativeTrainStep, the parameters and the state's tensors must keep their
    storage (updated in place); a replaced parameter, .grad, group or state dict is bound again."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        for o in optimizers:
            adamw = isinstance(o, torch.optim.AdamW)
            if not adamw and not (hasattr(torch.optim, "Muon") and isinstance(o, torch.optim.Muon)):
                raise NativeUnavailable(f"the C update runs AdamW and Muon, not {type(o).__name__}")
            for group in o.param_groups:
                bad = [k for k in ("amsgrad", "maximize", "capturable", "differentiable") if group.get(k)] if adamw \
                    else [] if group.get("adjust_lr_fn") in _LR_RATIO else ["adjust_lr_fn"]
                if bad:
                    raise NativeUnavailable(f"the C update runs {type(o).__name__} without {', '.join(bad)}")
                for p in group["params"]:
                    if p.device.type != "cpu" or p.dtype != torch.float32 or not p.is_contiguous():
                        raise NativeUnavailable("the C update reads contiguous fp32 parameters on the CPU")
                    if isinstance(o, torch.optim.Muon) and (p.dim() != 2 or p.numel() > UPDATE_MAX_ELEMENTS):
                        raise NativeUnavailable(f"the C update runs Muon on matrices of up to {UPDATE_MAX_ELEMENTS:,} "
                                                "elements")
        self.lib = library()
        self.optimizers = optimizers
        self._work = torch.empty(0)
        # the optimizers' state dicts bound last (load_state_dict makes new ones): none yet
        self._states: list[dict | None] = [None] * len(optimizers)
        self._grads: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # each parameter and the .grad bound
        self._n_groups = 0
        self._tensors = (_Tensor * 0)()

    def step(self, clip: float = 0.0) -> float:
        """Clips the gradients to a total norm of ``clip`` (0: not), updates the parameters and zeroes the gradients;
        returns the total gradient norm before clipping."""
        groups = []
        for o in self.optimizers:  # every step: the learning rates change
            muon = not isinstance(o, torch.optim.AdamW)
            for group in o.param_groups:
                if muon:
                    a, b, c = group["ns_coefficients"]
                    groups.append(_Group(1, int(group["nesterov"]), group["ns_steps"],
                                         _LR_RATIO[group["adjust_lr_fn"]], group["lr"], group["weight_decay"], 0.0,
                                         0.0, 0.0, group["momentum"], a, b, c, group["eps"]))
                else:
                    groups.append(_Group(0, 0, 0, 0, group["lr"], group["weight_decay"], *group["betas"],
                                         group["eps"]))
        group_array = (_Group * len(groups))(*groups)
        # the tensors' addresses are bound once, and again where a state dict, a parameter, a group or a .grad was
        # replaced (a resume's load_state_dict, a .grad set by someone else): rebuilding them every step cost 29 us
        # of an update's 188 at d_model 16
        params = [p for o in self.optimizers for group in o.param_groups for p in group["params"]]
        loaded = any(a is not b for a, b in zip([o.state for o in self.optimizers], self._states, strict=True))
        if loaded or len(groups) != self._n_groups or len(params) != len(self._grads) or \
                any(p is not q or p.grad is not g for p, (q, g) in zip(params, self._grads, strict=True)):
            self._bind(loaded)
        self.lib.fw_threads(torch.get_num_threads())
        need = self.lib.fw_update_floats(self._tensors, len(self._tensors), group_array) + 16  # follows the threads
        if self._work.numel() < need:
            self._work = torch.empty(need)
        work = self._work.data_ptr()
        return self.lib.fw_update(self._tensors, len(self._tensors), group_array, clip, work + -work % 64)

    def _bind(self, loaded: bool) -> None:
        """The tensors' addresses, each with its group's index; state created as torch creates it, or normalised
        where it was ``loaded`` (a state dict not bound before)."""
        tensors, self._grads = [], []
        index = 0
        for o in self.optimizers:
            muon = not isinstance(o, torch.optim.AdamW)
            for group in o.param_groups:
                for p in group["params"]:
                    if p.grad is not None and not p.grad.is_contiguous():
                        p.grad = p.grad.contiguous()
                    self._grads.append((p, p.grad))
                    if p.grad is None:
                        continue
                    state = o.state[p]
                    if not state:  # as torch creates it on a parameter's first step
                        if muon:
                            state["momentum_buffer"] = torch.zeros_like(p)
                        else:
                            state.update(step=torch.zeros((), dtype=torch.float32), exp_avg=torch.zeros_like(p),
                                         exp_avg_sq=torch.zeros_like(p))
                    elif loaded:  # from a checkpoint
                        _as_c_reads(state, p)
                    rows, cols = (p.shape[0], p.shape[1]) if p.dim() == 2 else (1, p.numel())
                    if muon:
                        tensors.append((p.data_ptr(), p.grad.data_ptr(), state["momentum_buffer"].data_ptr(), None,
                                        None, rows, cols, index))
                    else:
                        tensors.append((p.data_ptr(), p.grad.data_ptr(), state["exp_avg"].data_ptr(),
                                        state["exp_avg_sq"].data_ptr(), state["step"].data_ptr(), rows, cols,
                                        index))
                index += 1
        self._states, self._n_groups = [o.state for o in self.optimizers], index
        self._tensors = (_Tensor * len(tensors))(*tensors)
