"""Measure this machine: matmul peak FLOP/s in fp32 and bf16, and memory bandwidth.

MFU is computed against these measured numbers, never against a hard-coded part.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flopwise import __version__
from flopwise.cbuild import NativeUnavailable
from flopwise.config import requested_threads
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text
from flopwise.laws.flops import training_flops_per_token
from flopwise.laws.hardware import probe_cache_path
from flopwise.model.llama import Llama, ModelConfig
from flopwise.run import require_device
from flopwise.training import registry
from flopwise.training.malloc import keep_freed_memory
from flopwise.training.native import NativeTrainStep, NativeUpdate, builds, has_bf16, source_digest


def use_threads(threads: int = 0) -> int:
    """Set torch's thread count for a command that computes (inference, evaluation); returns the count."""
    n = requested_threads(threads)
    if n:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))  # taskset / cpusets: the cores this process may run on
    except AttributeError:
        return set(range(os.cpu_count() or 1))


def _cpu_sample() -> tuple[float, float, float] | None:
    """(wall seconds, CPU seconds all processes have used on this process' cores, CPU seconds this process and the
    children it waited for have used), Linux only. A child is this process' own work: the C step's compiler, run
    while a run measures its kernels, had counted as another process and cut the run to one thread."""
    allowed, busy = _allowed_cpus(), 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in allowed:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
                    busy += user + nice + system + irq + softirq + steal
    except (OSError, ValueError):
        return None
    children = os.times()
    return (time.monotonic(), busy / os.sysconf("SC_CLK_TCK"),
            time.process_time() + children.children_user + children.children_system)


class CpuShare:
    """Keeps torch's thread count at the cores this process can have: ``max_threads`` while the machine is
    otherwise idle, fewer while other processes are busy (checked every ``interval_s`` seconds).

    Why: an OpenMP parallel region ends when its slowest thread does, and the threads that finish first spin
    waiting for it. When another process holds one of two cores, a 2-thread training spends most of its time
    waiting for the descheduled thread (measured: 18% of its idle speed beside one busy process, 3% for two
    trainings at once), while one thread keeps ~58% of the 2-thread idle speed. benchmarks/shared_cpu.py.
    """

    def __init__(self, max_threads: int, adapt: bool = True, interval_s: float = 1.0):
        self.max_threads, self.interval_s = max(1, max_threads), interval_s
        self.before = torch.get_num_threads()  # restored by close(): the next run in this process starts from it
        self.cores = len(_allowed_cpus())
        self._last = _cpu_sample()
        self.adapt = adapt and self.max_threads > 1 and self._last is not None
        self.threads = self.max_threads
        self._thread_seconds, self._seconds = 0.0, 0.0
        if self.adapt:  # a short first look, so a run started on a busy machine does not start oversubscribed
            time.sleep(0.2)
            self.update(force=True)
        torch.set_num_threads(self.threads)

    def update(self, force: bool = False) -> int:
        """The thread count to use now (set in torch when it changes)."""
        if not self.adapt:
            return self.threads
        now = time.monotonic()
        if not force and now - self._last[0] < self.interval_s:
            return self.threads
        sample = _cpu_sample()
        wall = sample[0] - self._last[0]
        others = max(0.0, (sample[1] - self._last[1]) - (sample[2] - self._last[2])) / max(wall, 1e-9)
        self._thread_seconds += self.threads * wall
        self._seconds += wall
        target = min(self.max_threads, max(1, int(self.cores - others + 0.25)))  # 0.25: noise is not a process
        if target != self.threads:
            self.threads = target
            torch.set_num_threads(target)
        self._last = sample
        return self.threads

    def close(self) -> None:
        torch.set_num_threads(self.before)

    @property
    def mean_threads(self) -> float:
        return self._thread_seconds / self._seconds if self._seconds else float(self.threads)


def pick_device(name: str) -> torch.device:
    """auto: CUDA when this machine has it, else the CPU; a CUDA device asked for where there is none is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FlopwiseError(f"unknown device {name!r}: use auto, cpu or cuda") from None
    require_device(device.type)
    return device


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(name: str, device: torch.device, shape: dict | None = None, micro_batch: int = 16) -> str:
    """auto: bf16 on CUDA that has it; on a CPU with bf16 instructions, whichever of bf16 and fp32 trains
    ``shape`` faster here, measured (for small models bf16's casts cost more than its faster matmuls save:
    d_model 32-128 trained 1.2-1.4x faster in fp32 on a 2-core Xeon with AMX); without a shape, bf16 there."""
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if not cpu_has_fast_bf16():
            return "fp32"
        if shape is None:
            return "bf16"
        return faster_precision(tuple(sorted(shape.items())), micro_batch, torch.get_num_threads())
    if name not in ("bf16", "fp32"):
        raise FlopwiseError(f"--precision must be auto, bf16 or fp32, got {name!r}")
    return name


@functools.lru_cache(maxsize=64)
def faster_precision(shape_items: tuple, micro_batch: int, threads: int) -> str:
    """bf16 or fp32, whichever trains this shape faster on this CPU: measured once per shape, micro-batch, thread
    count, CPU and flopwise and torch version (a few steps of each, raced: ``_race``) and remembered in
    compiled.json. Measured afresh in every run, near-equal rates flipped from run to run, and a sweep's losses
    with them (the same run, the same seed, another precision)."""
    key = _choice_key(shape_items, micro_batch, threads, CHOICE_METHOD)
    known = registry.read()["precision"].get(key)
    if known is not None:
        return known
    best = eager_best_rates(dict(shape_items), threads, micro_batch, ("fp32", "bf16"))
    # the first answer saved wins: a sweep worker that measured the same shape at the same time takes it too
    return registry.update(lambda reg: reg["precision"].setdefault(key, max(best, key=best.get)))


def _choice_key(shape_items: tuple, micro_batch: int, threads: int, *more) -> str:
    return json.dumps([__version__, torch.__version__, _cpu_name(), list(shape_items), micro_batch, threads, *more])


# Part of the precision and kernel choices' keys: choices made before they were raced (measured one after another
# by their mean step) are measured again.
CHOICE_METHOD = "raced"


# The C step is for the small models whose PyTorch steps are mostly overhead: 2.6x PyTorch eager at d_model 16,
# 1.2-1.4x at d128 L4, not chosen at d384 L6, where auto took torch.compile (2-core AMD EPYC). Wider models are not
# measured: a few steps of each precision cost seconds each there, for a choice expected to go to PyTorch.
C_STEP_MAX_WIDTH = 512


@functools.lru_cache(maxsize=64)
def faster_kernel(shape_items: tuple, micro_batch: int, threads: int, precision: str = "auto") -> tuple[str, str]:
    """("c", its precision) where the C training step (``training/step.c``: fp32, or bf16 products where the CPU
    has AVX512_BF16) trains this shape faster than PyTorch eager at ``precision`` (auto: the faster of fp32 and
    bf16), else ("torch", precision), by their fastest steps (the C step's precisions raced: ``_race``): measured once
    per shape, micro-batch, thread count, CPU, version, C source and whether its build has bf16, and remembered in
    compiled.json as the precision is. Where the step does not build, "torch" (not remembered: a compiler may be
    installed later)."""
    shape = dict(shape_items)
    if shape["d_model"] > C_STEP_MAX_WIDTH:
        return "torch", precision
    key = _choice_key(shape_items, micro_batch, threads, precision, source_digest(), has_bf16(), CHOICE_METHOD)
    known = registry.read()["kernel"].get(key)
    if known is None:
        wanted = tuple(p for p in ("fp32", "bf16") if precision in ("auto", p) and (p == "fp32" or has_bf16()))
        rates = native_best_rates(shape, threads, micro_batch, wanted) if wanted else {}
        if not rates:
            return "torch", precision
        best = max(rates, key=rates.get)
        with _threads(threads):
            torch_precision = pick_precision(precision, torch.device("cpu"), shape, micro_batch)
        torch_rate = eager_best_rates(shape, threads, micro_batch, (torch_precision,))[torch_precision]
        faster = f"c:{best}" if rates[best] > torch_rate else "torch"
        known = registry.update(lambda reg: reg["kernel"].setdefault(key, faster))
    kernel, _, chosen = known.partition(":")
    return kernel, chosen or precision


def native_rate(shape_dict: dict, threads: int | None = None, micro_batch: int = 16,
                precision: str = "fp32", seqs_per_pass: int = 0) -> float | None:
    """Measured training FLOP/s of the C training step at this shape and precision (its mean step: what a run
    averages), None where it does not build here, or has no bf16; remembered in compiled.json: a sweep's ETA reads
    it instead of measuring again."""
    with _threads(threads):
        key = (tuple(sorted(shape_dict.items())), torch.get_num_threads(), micro_batch, "c", precision, seqs_per_pass)
        if key not in _RATES:
            rate = registry.read()["rates"].get(_native_key(key))
            if rate is not None and (precision == "bf16" and not has_bf16() or not builds()):
                return None  # remembered, but no longer builds here
            if rate is None:
                try:
                    rate = _measure_rate(ModelConfig(**shape_dict), micro_batch, 3, precision == "bf16",
                                         native=True, seqs_per_pass=seqs_per_pass)
                except (NativeUnavailable, RuntimeError):  # no build here; out of memory for its workspace
                    return None
                registry.update(lambda reg: reg["rates"].__setitem__(_native_key(key), rate))
            _RATES[key] = rate
        return _RATES[key]


def _native_key(key: tuple) -> str:
    shape_items, threads, micro_batch, _, precision, seqs_per_pass = key
    return _choice_key(shape_items, micro_batch, threads, "c", precision, seqs_per_pass, source_digest())


def native_best_rates(shape_dict: dict, threads: int | None, micro_batch: int,
                      precisions: tuple[str, ...]) -> dict[str, float]:
    """{precision: the C step's FLOP/s at its fastest step}, the precisions raced (``_race``), each a whole share
    a pass; those that do not build here are left out. Their mean rates are remembered as ``native_rate``'s."""
    with _threads(threads):
        shape_items, n = tuple(sorted(shape_dict.items())), torch.get_num_threads()
        variants = {p: dict(bf16=p == "bf16", native=True) for p in precisions}
        rates = _race(ModelConfig(**shape_dict), micro_batch, variants, failing=(NativeUnavailable, RuntimeError))
        means = {(shape_items, n, micro_batch, "c", p, 0): mean for p, (_, mean) in rates.items()}
        _RATES.update(means)
        registry.update(lambda reg: reg["rates"].update({_native_key(k): r for k, r in means.items()}))
        return {p: best for p, (best, _) in rates.items()}


# A pass of the C step over this many tokens a thread (2 sequences of 128) is measured against one over its whole
# share: on a 2-core AMD EPYC (1 MB L2 a core) it ran 1.03-1.12x faster at d_model 32-64 with two runs side by
# side, as a sweep runs them, and 0.91-0.94x at d_model 128.
PASS_TOKENS = 256
PASS_MARGIN = 1.03


@functools.lru_cache(maxsize=64)
def c_step_passes(shape_items: tuple, micro_batch: int, threads: int, precision: str) -> int:
    """Sequences each thread of the C step runs forward and backward at a time (``NativeTrainStep``'s
    ``seqs_per_pass``): those of ``PASS_TOKENS`` tokens where that measured 3% faster than the thread's whole
    share (``_pass_seconds``), else 0 (the whole share); measured once per shape, micro-batch, thread count,
    precision, CPU, version and C source, and remembered in compiled.json."""
    shape = dict(shape_items)
    per = max(1, PASS_TOKENS // shape["seq_len"])
    if per >= -(-micro_batch // threads):  # a thread's share is no larger
        return 0
    key = _choice_key(shape_items, micro_batch, threads, precision, source_digest())
    known = registry.read()["passes"].get(key)
    if known is None:
        seconds = _pass_seconds(shape, threads, micro_batch, precision, per)
        if seconds is None:
            return 0
        faster = per if seconds[0] > PASS_MARGIN * seconds[1] else 0  # a few steps' noise does not flip it
        known = registry.update(lambda reg: reg["passes"].setdefault(key, faster))
    return known


def _pass_seconds(shape: dict, threads: int, micro_batch: int, precision: str, per: int,
                  repeats: int = 5) -> tuple[float, float] | None:
    """Seconds of a C step in one pass and in passes of ``per`` sequences: the two timed in turn (the machine's
    drift falls on both), the best of ``repeats`` each; None where the step does not build or fit."""
    with _threads(threads):
        keep_freed_memory()
        mc = ModelConfig(**shape)
        x = torch.randint(0, mc.vocab_size, (micro_batch, mc.seq_len))
        try:
            steps = [NativeTrainStep(Llama(mc), precision == "bf16", n) for n in (0, per)]
            for step in steps:
                step.step(x, x)  # warm-up: the workspace, page faults
            best = [float("inf")] * 2
            for _ in range(repeats):
                for i, step in enumerate(steps):
                    t0 = time.perf_counter()
                    step.step(x, x)
                    best[i] = min(best[i], time.perf_counter() - t0)
        except (NativeUnavailable, RuntimeError):  # no build here; out of memory for its workspace
            return None
    return best[0], best[1]


def run_rate(shape_dict: dict, threads: int | None = None, micro_batch: int = 16) -> float:
    """Training FLOP/s of a run at the defaults (precision and compile auto), before compiling: the C step's where
    the trainer will choose it, else PyTorch eager's."""
    threads = threads or torch.get_num_threads()
    items = tuple(sorted(shape_dict.items()))
    kernel, precision = faster_kernel(items, micro_batch, threads)
    if kernel == "c":
        rate = native_rate(shape_dict, threads, micro_batch, precision,
                           c_step_passes(items, micro_batch, threads, precision))
        if rate is not None:
            return rate
    return training_rate(shape_dict, threads, micro_batch)


def _best_seconds(fn, sync, repeats: int) -> float:
    fn()
    sync()  # warm-up: kernel selection, page faults
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def probe(device: str | None = None, size: int | None = None, repeats: int = 5) -> dict:
    """Peak matmul FLOP/s (fp32, bf16) and copy bandwidth of ``device`` (default: cuda if present, else cpu)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = size or (8192 if dev.type == "cuda" else 2048)
    result = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
              "device_type": dev.type, "threads": torch.get_num_threads(), "matmul_size": n}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        seconds = _best_seconds(lambda a=a, b=b: a @ b, sync, repeats)
        result[f"{name}_flops"] = 2.0 * n**3 / seconds
    numel = (1 << 28 if dev.type == "cuda" else 1 << 26)  # 1 GiB / 256 MiB of fp32
    src = torch.empty(numel, device=dev, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), sync, repeats)
    result["bandwidth_bytes_per_s"] = 2.0 * src.numel() * 4 / seconds  # read + write
    if dev.type == "cuda":
        result["memory_bytes"] = float(torch.cuda.get_device_properties(dev).total_memory)
    return result


def save_probe(result: dict) -> str:
    path = probe_cache_path()
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return str(path)


def load_probe() -> dict | None:
    try:
        return json.loads(probe_cache_path().read_text())
    except (OSError, ValueError):
        return None


def measured_peak(device: torch.device, precision: str) -> float:
    """This device's matmul peak from ``flopwise hw probe``, measured now (quickly) if never measured."""
    p = load_probe()
    if not p or p.get("device_type") != device.type:
        p = probe(str(device), size=1024 if device.type == "cpu" else 4096, repeats=3)
        save_probe(p)
    return float(p["bf16_flops" if precision == "bf16" else "fp32_flops"])


ETA_OVERHEAD = 1.15  # wall time over measured step time: evaluation, checkpoints, process start-up
# A run on the C step: its evaluation is the C forward and its update one C call, and its steady steps outrun the
# three steps measured; the default demo's final run (one run, measured once) took 124 s against 133 s at its
# measured rate (1.15 had put it at 2.5 min). A sweep keeps ETA_OVERHEAD: its short runs' fixed costs and its
# workers' start add about that much (the bundled sweep's runs took 1.06x their measured rates in sum).
C_STEP_ETA_OVERHEAD = 1.0


_RATES: dict[tuple, float] = {}  # measured once per process: precision auto and the ETA measure the same steps
_BEST: dict[tuple, float] = {}  # PyTorch eager's fastest step, beside its mean in _RATES: what the choices compare


def training_rate(shape_dict: dict, threads: int | None = None, micro_batch: int = 16, steps: int = 3,
                  precision: str = "auto") -> float:
    """Measured training FLOP/s (exact count) of a model of this shape on this CPU: a few real steps (eager), their
    mean (what a run averages, for its ETA)."""
    with _threads(threads):
        bf16 = pick_precision(precision, torch.device("cpu"), shape_dict, micro_batch) == "bf16"  # auto: as trained
        key = (tuple(sorted(shape_dict.items())), torch.get_num_threads(), micro_batch, bf16)
        if key not in _RATES:
            _RATES[key] = _measure_rate(ModelConfig(**shape_dict), micro_batch, steps, bf16)
        return _RATES[key]


def eager_best_rates(shape_dict: dict, threads: int | None, micro_batch: int,
                     precisions: tuple[str, ...]) -> dict[str, float]:
    """{precision: PyTorch eager's FLOP/s at its fastest step}, the precisions raced (``_race``; all of them again
    where one was not measured in this process); their mean rates are ``training_rate``'s."""
    with _threads(threads):
        shape_items, n = tuple(sorted(shape_dict.items())), torch.get_num_threads()
        keys = {p: (shape_items, n, micro_batch, p == "bf16") for p in precisions}
        if any(keys[p] not in _BEST for p in precisions):  # all raced again: their steps timed side by side
            todo = {p: dict(bf16=p == "bf16") for p in precisions}
            for p, (best, mean) in _race(ModelConfig(**shape_dict), micro_batch, todo).items():
                _BEST[keys[p]], _RATES[keys[p]] = best, mean
        return {p: _BEST[keys[p]] for p in precisions}


@contextlib.contextmanager
def _threads(threads: int | None):
    """torch at ``threads`` threads inside (all it has, if None), as before outside."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _measure_rate(mc: ModelConfig, micro_batch: int, steps: int, bf16: bool, compiled: bool = False,
                  native: bool = False, seqs_per_pass: int = 0) -> float:
    """Training FLOP/s of one kind of step, its mean over ``steps`` steps after its warm-up (``_race``)."""
    variant = dict(bf16=bf16, compiled=compiled, native=native, seqs_per_pass=seqs_per_pass)
    return _race(mc, micro_batch, {"only": variant}, steps)["only"][1]


# Precisions that compete (PyTorch's fp32 and bf16; the C step's fp32 and bf16) are raced: timed in turn, a step
# of each a round, and compared by their fastest steps, so a slow phase of the machine (another tenant of a VM)
# falls on all of them, and mostly on steps that are not their fastest. Measured one after another by their means,
# a 2-core VM's slow phase once made the C step choose fp32 at d128 L4 (bf16 measured at 145 GFLOP/s, half its
# rate), which then trained at 26K tokens a second where bf16 trains 42K; the choice is remembered per machine.
# The C step's fastest is then compared with PyTorch's fastest from its own race (2-4x apart where the C step is
# measured at all).
RACE_ROUNDS = 3


def _race(mc: ModelConfig, micro_batch: int, variants: dict[str, dict], rounds: int = RACE_ROUNDS,
          failing: tuple[type[Exception], ...] = ()) -> dict[str, tuple[float, float]]:
    """{name: (FLOP/s at its fastest step, FLOP/s at its mean step)} of each variant (``_training_step``'s
    keywords) over ``rounds`` rounds, one step of each a round, after a warm-up step of each; a variant whose
    set-up or warm-up raises one of ``failing`` is left out (others raise)."""
    keep_freed_memory()  # as the trainer allocates: with glibc's default, small models ran 1.35x slower
    steps = {}
    for name, kw in variants.items():
        try:
            steps[name] = _training_step(mc, micro_batch, **kw)
            steps[name]()
            if kw.get("compiled"):
                steps[name]()  # the second call may compile again (e.g. the backward's grad mode)
        except failing:
            steps.pop(name, None)  # e.g. the C step in bf16 out of memory for its workspace: the others still race
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - t0)
    flops = training_flops_per_token(mc) * micro_batch * mc.seq_len
    return {name: (flops / min(s), flops * len(s) / sum(s)) for name, s in seconds.items()}


def _training_step(mc: ModelConfig, micro_batch: int, bf16: bool, compiled: bool = False, native: bool = False,
                   seqs_per_pass: int = 0) -> Callable[[], None]:
    """One training step of a new model as the trainer takes it (forward, backward, AdamW), as a function."""
    model = Llama(mc)
    net = torch.compile(model) if compiled else model
    c_step = NativeTrainStep(model, bf16, seqs_per_pass) if native else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    c_update = NativeUpdate([opt]) if native else None  # as the trainer pairs them
    x = torch.randint(0, mc.vocab_size, (micro_batch, mc.seq_len))

    def step():
        if c_step is not None:
            c_step.step(x, x)
            c_update.step()
            return
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = net(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
