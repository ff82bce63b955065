"""Measure this machine: matmul peak FLOP/s in fp32 and bf16, and memory bandwidth.

MFU is computed against these measured numbers, never against a hard-coded part.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

from flopwise.config import requested_threads
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text, cache_root
from flopwise.laws.flops import training_flops_per_token
from flopwise.laws.hardware import probe_cache_path
from flopwise.model.compiling import can_compile
from flopwise.model.llama import Llama, ModelConfig
from flopwise.run import require_device


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
    """(wall seconds, CPU seconds all processes have used on this process' cores, CPU seconds this process has
    used), Linux only."""
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
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


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
    """bf16 or fp32, whichever trains this shape faster on this CPU (a few measured steps of each)."""
    shape = dict(shape_items)
    rates = {p: training_rate(shape, threads, micro_batch, steps=2, precision=p) for p in ("fp32", "bf16")}
    return max(rates, key=rates.get)


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


_RATES: dict[tuple, float] = {}  # measured once per process: precision auto and the ETA measure the same steps


def training_rate(shape_dict: dict, threads: int | None = None, micro_batch: int = 16, steps: int = 3,
                  precision: str = "auto") -> float:
    """Measured training FLOP/s (exact count) of a model of this shape on this CPU: a few real steps (eager)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        bf16 = pick_precision(precision, torch.device("cpu"), shape_dict, micro_batch) == "bf16"  # auto: as trained
        key = (tuple(sorted(shape_dict.items())), torch.get_num_threads(), micro_batch, bf16)
        if key not in _RATES:
            _RATES[key] = _measure_rate(ModelConfig(**shape_dict), micro_batch, steps, bf16)
        return _RATES[key]
    finally:
        torch.set_num_threads(before)


def _measure_rate(mc: ModelConfig, micro_batch: int, steps: int, bf16: bool) -> float:
    model = Llama(mc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, mc.vocab_size, (micro_batch, mc.seq_len))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t0) / steps
    return training_flops_per_token(mc) * micro_batch * mc.seq_len / seconds


# ---- torch.compile: when it pays ----
# Measured on a 2-core Xeon with AMX, one thread, batch 32 x 128 tokens (benchmarks/train_throughput.py): compiled bf16
# steps ran 2.8x, 1.9x and 1.7x faster than eager fp32 ones at d_model 32, 64 and 128, and compiling took 11-27 s the
# first time a shape was seen, ~4 s once inductor's on-disk cache held it. A whole 'flopwise train' of a 170K-param
# model on 3M tokens, 2 threads: 43 s eager; 61 s compiled from a cold cache and 33 s from a warm one.
COMPILE_SPEEDUP = 1.5  # assumed when deciding and estimating: below every measured figure, so a chosen compile pays
COMPILE_SECONDS = {False: 40.0, True: 10.0}  # by whether this machine compiled the same graph before (warm cache)


def compile_key(shape: dict, micro_batch: int, precision: str, tuning: bool = False, lora_rank: int = 0) -> str:
    """What makes two runs compile the same graphs (and so share inductor's cache)."""
    return json.dumps([torch.__version__, sorted(shape.items()), micro_batch, precision, tuning, lora_rank])


def _compiled_path() -> Path:
    return cache_root() / "compiled.json"


def compiled_before(key: str) -> bool:
    try:
        return key in json.loads(_compiled_path().read_text())
    except (OSError, ValueError, TypeError):
        return False


def remember_compiled(key: str) -> None:
    try:
        keys = json.loads(_compiled_path().read_text())
    except (OSError, ValueError):
        keys = []
    if not isinstance(keys, list):
        keys = []
    if key not in keys:
        atomic_write_text(_compiled_path(), json.dumps(keys[-499:] + [key]) + "\n")


def compiled_seconds(eager_seconds: float, warm: bool) -> float:
    """Expected wall seconds of a run that takes ``eager_seconds`` eager, compiled instead."""
    return COMPILE_SECONDS[warm] + eager_seconds / COMPILE_SPEEDUP


def choose_compile(mode: str, device: torch.device, shape: dict, micro_batch: int, eager_seconds,
                   precision: str = "auto", eager_precision: str = "fp32", tuning: bool = False,
                   lora_rank: int = 0) -> tuple[bool, str]:
    """(whether to compile, the precision to train in) for a single-process run. on / off as asked; auto: compile
    where it can and the time it saves exceeds the time it costs, ``eager_seconds()`` (called only then) being the
    run's time eager in ``eager_precision``. Compiled, precision auto is ``compiled_precision``."""
    if mode == "off" or (mode == "auto" and not can_compile(device)):
        return False, eager_precision
    chosen = compiled_precision(shape, micro_batch) if precision == "auto" and device.type == "cpu" else eager_precision
    if mode == "on":
        return True, chosen
    seconds = eager_seconds()
    if compiled_seconds(seconds, compiled_before(compile_key(shape, micro_batch, chosen, tuning, lora_rank))) < seconds:
        return True, chosen
    return False, eager_precision


def expected_seconds(eager_seconds: float, shape: dict, micro_batch: int, mode: str = "auto") -> float:
    """Wall seconds of a CPU run (single process, precision auto) that takes ``eager_seconds`` eager, with the
    compile choice the trainer will make."""
    compiled, precision = choose_compile(mode, torch.device("cpu"), shape, micro_batch, lambda: eager_seconds)
    if not compiled:
        return eager_seconds
    return compiled_seconds(eager_seconds, compiled_before(compile_key(shape, micro_batch, precision)))


def gemm_speedup(shapes: tuple[tuple[int, int, int], ...], repeats: int = 5) -> float:
    """How much faster this CPU runs the matmuls (rows x d_in) @ (d_in x d_out) of ``shapes``, together, in bf16
    than in fp32."""
    seconds = {torch.float32: 0.0, torch.bfloat16: 0.0}
    for rows, d_in, d_out in shapes:
        for dtype in seconds:
            a, b = torch.randn(rows, d_in, dtype=dtype), torch.randn(d_in, d_out, dtype=dtype)
            seconds[dtype] += _best_seconds(lambda a=a, b=b: a @ b, lambda: None, repeats)
    return seconds[torch.float32] / seconds[torch.bfloat16]


# Compiled, bf16 when the model's matmuls run this much faster in it. Measured on a 2-core Xeon with AMX, batch
# 32 x 128, vocabulary 1,024: at d_model 32 the matmuls gained 1.8x and compiled fp32 trained 1.45x faster than
# compiled bf16 (235K vs 162K tok/s); at d_model 64 they gained 3.3x and bf16 was 1.26x faster (98K vs 78K).
BF16_GEMM_GAIN = 2.5


@functools.lru_cache(maxsize=64)
def _gemm_gain(rows: int, d_model: int, d_ff: int, vocab_size: int) -> float:
    return gemm_speedup(((rows, d_model, d_model), (rows, d_model, d_ff), (rows, d_ff, d_model),
                         (rows, d_model, vocab_size)))


def compiled_precision(shape: dict, micro_batch: int) -> str:
    """bf16 or fp32 for a compiled run: compiled, the element-wise work is fused and the matmuls decide."""
    if not cpu_has_fast_bf16():
        return "fp32"
    gain = _gemm_gain(micro_batch * shape["seq_len"], shape["d_model"], shape["d_ff"], shape["vocab_size"])
    return "bf16" if gain >= BF16_GEMM_GAIN else "fp32"
