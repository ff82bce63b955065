"""torch.compile where it pays, by measurement: a shape's compiled training rate in each precision, measured once
per machine (``probe``'s steps, compiled) and remembered in compiled.json, against the run's eager rate."""

from __future__ import annotations

import json

import torch

from flopwise.model.compiling import can_compile, use_compile_cache
from flopwise.model.llama import ModelConfig
from flopwise.training import probe, registry

# How much compiling gains differs by machine and shape: on a 2-core Xeon with AMX, compiled bf16 steps ran
# 2.8x, 1.9x and 1.7x faster than eager fp32 at d_model 32, 64 and 128 (batch 32 x 128); on a 2-core AMD EPYC
# (AVX-512 BF16, no AMX) compiled bf16 ran 1.19x faster than eager bf16 at d128 L4 (context 256, batch 16) and
# compiled fp32 was slower than eager bf16 there. So a run that may compile measures compiled steps in each
# precision once per shape and machine (remembered in compiled.json), and compiles only where the measured rate
# repays the compile. Compiling took 8-27 s the first time a shape was seen, ~4-10 s with inductor's cache warm.
COMPILE_SPEEDUP = 1.5  # assumed only before measuring: whether measuring could pay, and the sweep's ETA
COMPILE_SECONDS = {False: 40.0, True: 10.0}  # by whether this machine compiled the same graph before (warm cache)


def compile_key(shape: dict, micro_batch: int, precision: str, tuning: bool = False, lora_rank: int = 0) -> str:
    """What makes two runs compile the same graphs (and so share inductor's cache)."""
    return json.dumps([torch.__version__, sorted(shape.items()), micro_batch, precision, tuning, lora_rank])


def _rate_key(shape: dict, micro_batch: int, precision: str, threads: int) -> str:
    return json.dumps([compile_key(shape, micro_batch, precision), threads])


def recorded_compiled_rate(shape: dict, micro_batch: int, precision: str, threads: int) -> float | None:
    """Compiled training FLOP/s of this shape measured here before, if it was."""
    return registry.read()["rates"].get(_rate_key(shape, micro_batch, precision, threads))


def compiled_rate(shape: dict, micro_batch: int, precision: str, threads: int | None = None,
                  steps: int = 3) -> float:
    """Measured training FLOP/s of this shape compiled (a throwaway model; its graphs land in inductor's cache,
    so the run's own compile is then warm), remembered in compiled.json."""
    threads = threads or torch.get_num_threads()
    known = recorded_compiled_rate(shape, micro_batch, precision, threads)
    if known:
        return known
    use_compile_cache()
    with probe._threads(threads):
        rate = probe._measure_rate(ModelConfig(**shape), micro_batch, steps, precision == "bf16", compiled=True)

    def record(reg: dict) -> None:  # the rate, and that this graph is in inductor's cache now: one write
        reg["rates"][_rate_key(shape, micro_batch, precision, threads)] = rate
        registry.add_key(reg, compile_key(shape, micro_batch, precision))

    registry.update(record)
    return rate


def compiled_seconds(eager_seconds: float, warm: bool, speedup: float = COMPILE_SPEEDUP) -> float:
    """Expected wall seconds of a run that takes ``eager_seconds`` eager, compiled instead (``speedup``: compiled
    rate over eager rate)."""
    return COMPILE_SECONDS[warm] + eager_seconds / speedup


def _candidates(precision: str, device: torch.device, eager_precision: str) -> list[str]:
    """The precisions a compiled run may take: both on a CPU with fast bf16 under precision auto."""
    if precision == "auto" and device.type == "cpu":
        return ["fp32", "bf16"] if probe.cpu_has_fast_bf16() else ["fp32"]
    return [eager_precision]


def _worth_measuring(eager_seconds: float, n_precisions: int) -> bool:
    """Whether compiling could pay at the usual speed-up after one cold compile per precision measured (the
    run's own compile is then warm)."""
    return n_precisions * COMPILE_SECONDS[False] + eager_seconds / COMPILE_SPEEDUP < eager_seconds


def choose_compile(mode: str, device: torch.device, shape: dict, micro_batch: int, eager_seconds,
                   precision: str = "auto", eager_precision: str = "fp32", tuning: bool = False,
                   lora_rank: int = 0, eager_rate=None, measure: bool = True,
                   threads: int | None = None) -> tuple[bool, str]:
    """(whether to compile, the precision to train in) for a single-process run. on / off as asked; auto: compile
    where it can and the time it saves exceeds the time it costs. ``eager_seconds()`` is the run's time eager in
    ``eager_precision`` and ``eager_rate()`` its FLOP/s (each called only when needed). Compiled, precision auto
    is the faster one compiled, measured (``measure``; not for tuning, whose graphs differ) or recorded; where
    neither is known, the eager one. A compile that fails while measuring leaves the run eager."""
    if mode == "off" or (mode == "auto" and not can_compile(device)):
        return False, eager_precision
    threads = threads or torch.get_num_threads()
    candidates = _candidates(precision, device, eager_precision)
    measure = measure and not tuning and not lora_rank and can_compile(device)
    rates = {p: r for p in candidates if (r := recorded_compiled_rate(shape, micro_batch, p, threads))}

    def measured() -> dict[str, float] | None:
        try:
            return {p: compiled_rate(shape, micro_batch, p, threads) for p in candidates}
        except Exception:  # inductor raises many kinds; the run itself will say so if it compiles
            return None

    if mode == "on":
        if len(rates) < len(candidates) and measure and len(candidates) > 1:
            rates = measured() or {}
        return True, max(rates, key=rates.get) if len(rates) == len(candidates) else eager_precision
    seconds = eager_seconds()
    if len(rates) < len(candidates):  # not measured here yet
        if not measure or not _worth_measuring(seconds, len(candidates)):
            return False, eager_precision
        rates = measured()
        if rates is None:
            return False, eager_precision
    best = max(rates, key=rates.get)
    warm = (registry.compiled_before(compile_key(shape, micro_batch, best, tuning, lora_rank))
            or (not tuning and not lora_rank))
    if compiled_seconds(seconds, warm, rates[best] / eager_rate()) < seconds:
        return True, best
    return False, eager_precision


def expected_seconds(eager_seconds: float, eager_rate: float, shape: dict, micro_batch: int,
                     mode: str = "auto", threads: int | None = None) -> float:
    """Wall seconds of a CPU run (single process, precision auto, ``threads`` threads) that takes
    ``eager_seconds`` eager (at ``eager_rate`` FLOP/s), with the compile choice the trainer will make, as far as
    it is known without measuring: a shape never measured here is estimated at the usual speed-up where the
    trainer would measure it."""
    cpu, threads = torch.device("cpu"), threads or torch.get_num_threads()
    compiled, precision = choose_compile(mode, cpu, shape, micro_batch, lambda: eager_seconds,
                                         eager_rate=lambda: eager_rate, measure=False, threads=threads)
    rate = recorded_compiled_rate(shape, micro_batch, precision, threads)
    if compiled and rate:
        return compiled_seconds(eager_seconds, True, rate / eager_rate)
    candidates = _candidates("auto", cpu, "fp32")
    unmeasured = any(recorded_compiled_rate(shape, micro_batch, p, threads) is None for p in candidates)
    if mode != "off" and can_compile(cpu) and unmeasured and _worth_measuring(eager_seconds, len(candidates)):
        return compiled_seconds(eager_seconds, False) + (len(candidates) - 1) * COMPILE_SECONDS[False]
    return eager_seconds
