"""Hardware presets and the cost of a budget: time, dollars, energy, carbon.

Peak FLOP/s are dense (no structured sparsity) tensor-core bf16 figures from each vendor's
datasheet; the T4 has no bf16, so its fp16 figure is used. Prices are indicative on-demand
cloud rates per GPU-hour (late 2026) and are meant to be overridden with ``--price-per-hour``.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from flopwise.errors import FlopwiseError
from flopwise.fsutil import cache_root

DEFAULT_MFU = 0.40  # model FLOP utilisation a well-tuned LLaMA-style run reaches on large GPUs
DEFAULT_PUE = 1.2  # data-centre power usage effectiveness (facility power / IT power)
DEFAULT_CARBON_KG_PER_KWH = 0.4  # a round world-average grid intensity; set yours


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory_bytes: float
    bandwidth_bytes_per_s: float
    power_watts: float  # board power (TDP)
    price_per_hour: float  # dollars per GPU-hour, indicative
    source: str


GB = 1e9
GPUS: dict[str, GPU] = {
    "a100-40gb": GPU("a100-40gb", 312e12, 40 * GB, 1555 * GB, 400, 1.30,
                     "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB): 312 TFLOPS bf16 dense, 1,555 GB/s, 400 W"),
    "a100-80gb": GPU("a100-80gb", 312e12, 80 * GB, 2039 * GB, 400, 1.80,
                     "NVIDIA A100 datasheet (SXM4 80GB): 312 TFLOPS bf16 dense, 2,039 GB/s, 400 W"),
    "h100": GPU("h100", 989e12, 80 * GB, 3350 * GB, 700, 2.50,
                "NVIDIA H100 datasheet (SXM5): 989 TFLOPS bf16 dense (1,979 with sparsity), 3.35 TB/s, 700 W"),
    "h100-pcie": GPU("h100-pcie", 756e12, 80 * GB, 2000 * GB, 350, 2.20,
                     "NVIDIA H100 datasheet (PCIe): 756 TFLOPS bf16 dense, 2.0 TB/s, 350 W"),
    "h200": GPU("h200", 989e12, 141 * GB, 4800 * GB, 700, 3.50,
                "NVIDIA H200 datasheet (SXM): 989 TFLOPS bf16 dense, 141 GB HBM3e, 4.8 TB/s, 700 W"),
    "l4": GPU("l4", 121e12, 24 * GB, 300 * GB, 72, 0.80,
              "NVIDIA L4 datasheet: 121 TFLOPS bf16 dense (242 with sparsity), 300 GB/s, 72 W"),
    "rtx4090": GPU("rtx4090", 165.2e12, 24 * GB, 1008 * GB, 450, 0.40,
                   "NVIDIA Ada Lovelace architecture whitepaper: RTX 4090 165.2 TFLOPS bf16 (fp32 accumulate), "
                   "1,008 GB/s, 450 W"),
    "t4": GPU("t4", 65e12, 16 * GB, 320 * GB, 70, 0.35,
              "NVIDIA T4 datasheet: 65 TFLOPS fp16 mixed precision (Turing has no bf16), 320 GB/s, 70 W"),
}
ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "4090": "rtx4090", "a100-40": "a100-40gb",
           "a100-80": "a100-80gb"}


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    source: str


# Fraction of a device's RAM that weights may take: the OS, the KV cache and activations need the rest.
WEIGHT_MEMORY_FRACTION = 0.5

DEVICES: dict[str, Device] = {
    "rpi5": Device("rpi5", 8 * GB, 17.1 * GB,
                   "Raspberry Pi 5 product brief: 8 GB LPDDR4X-4267 on a 32-bit bus (17.1 GB/s peak)"),
    "phone": Device("phone", 12 * GB, 76.8 * GB,
                    "a 2024 flagship phone (Snapdragon 8 Gen 3 product brief): 12 GB LPDDR5X-9600, 64-bit, 76.8 GB/s"),
    "laptop": Device("laptop", 16 * GB, 89.6 * GB,
                     "a laptop CPU with 16 GB dual-channel DDR5-5600 (2 x 64 bit x 5600 MT/s = 89.6 GB/s)"),
    "m2": Device("m2", 16 * GB, 100 * GB, "Apple M2 (MacBook Air 2022) tech specs: 16 GB unified memory, 100 GB/s"),
}

# Effective bits per weight of the GGUF formats flopwise exports (block scales included):
# q4_0 stores 32 weights in 18 bytes, q8_0 in 34 bytes.
BITS_PER_WEIGHT = {4: 4.5, 8: 8.5, 16: 16.0, 32: 32.0}


def _closest(name: str, names) -> str:
    near = difflib.get_close_matches(name, list(names), n=1, cutoff=0.3)
    return f" (did you mean {near[0]}?)" if near else ""


def probe_cache_path() -> Path:
    """Where ``flopwise hw probe`` stores this machine's measured peaks."""
    return cache_root() / "hw.json"


def local_gpu() -> GPU:
    """This machine, as measured by ``flopwise hw probe`` (bf16 matmul peak, copy bandwidth)."""
    path = probe_cache_path()
    try:
        p = json.loads(path.read_text())
        return GPU("local", float(p["bf16_flops"]), float(p.get("memory_bytes", 0)),
                   float(p["bandwidth_bytes_per_s"]), float(p.get("power_watts", 0) or 0),
                   0.0, f"measured by 'flopwise hw probe' on {p.get('device', 'this machine')}")
    except (OSError, ValueError, KeyError, TypeError):
        raise FlopwiseError("no measurement of this machine yet: run 'flopwise hw probe' first") from None


def get_gpu(name: str) -> GPU:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key == "local":
        return local_gpu()
    if key not in GPUS:
        raise FlopwiseError(f"unknown GPU {name!r}{_closest(key, list(GPUS) + list(ALIASES))}; "
                            f"known: {', '.join(GPUS)} (or 'local' after 'flopwise hw probe')")
    return GPUS[key]


def get_device(name: str) -> Device:
    key = name.strip().lower()
    if key not in DEVICES:
        raise FlopwiseError(f"unknown device {name!r}{_closest(key, DEVICES)}; known: {', '.join(DEVICES)}")
    return DEVICES[key]


def bits_per_weight(bits: int) -> float:
    if bits not in BITS_PER_WEIGHT:
        raise FlopwiseError(f"--bits must be one of {', '.join(map(str, BITS_PER_WEIGHT))}, got {bits}")
    return BITS_PER_WEIGHT[bits]


def _positive(value: float, what: str, upper: float = math.inf) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise FlopwiseError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value <= 0 or value > upper:
        bound = f" and at most {upper:g}" if math.isfinite(upper) else ""
        raise FlopwiseError(f"{what} must be positive{bound}, got {value}")
    return value


def flops_from_gpu_hours(gpu: GPU, n_gpus: int, hours: float, mfu: float = DEFAULT_MFU) -> float:
    """FLOPs that ``n_gpus`` x ``hours`` deliver at model FLOP utilisation ``mfu``."""
    _positive(n_gpus, "--gpus")
    _positive(hours, "--hours")
    _positive(mfu, "--mfu", upper=1.0)
    return gpu.peak_flops * mfu * n_gpus * hours * 3600.0


def flops_from_dollars(gpu: GPU, dollars: float, price_per_hour: float | None = None,
                       mfu: float = DEFAULT_MFU) -> float:
    """FLOPs that ``dollars`` buy on ``gpu`` at ``price_per_hour`` per GPU-hour."""
    _positive(dollars, "--dollars")
    price = _positive(price_per_hour if price_per_hour is not None else gpu.price_per_hour or math.nan,
                      "--price-per-hour")
    return flops_from_gpu_hours(gpu, 1, dollars / price, mfu)


def cost_of(flops: float, gpu: GPU, n_gpus: int = 1, mfu: float = DEFAULT_MFU,
            price_per_hour: float | None = None, pue: float = DEFAULT_PUE,
            carbon_kg_per_kwh: float = DEFAULT_CARBON_KG_PER_KWH) -> dict:
    """Wall-clock hours, GPU-hours, dollars, kWh and kg CO2e of spending ``flops`` on ``gpu``.

    Energy = GPUs x board power x hours x PUE (the board at full power: an upper estimate).
    """
    _positive(mfu, "--mfu", upper=1.0)
    gpu_hours = flops / (gpu.peak_flops * mfu) / 3600.0
    price = gpu.price_per_hour if price_per_hour is None else _positive(price_per_hour, "--price-per-hour")
    kwh = gpu_hours * gpu.power_watts / 1000.0 * pue
    return {
        "gpu": gpu.name, "n_gpus": n_gpus, "mfu": mfu, "hours": gpu_hours / n_gpus, "gpu_hours": gpu_hours,
        "price_per_hour": price, "dollars": gpu_hours * price, "kwh": kwh, "pue": pue,
        "carbon_kg_per_kwh": carbon_kg_per_kwh, "co2e_kg": kwh * carbon_kg_per_kwh,
    }


TRAINING_BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments


def machine_memory_bytes() -> float:
    """This machine's physical memory."""
    import os

    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_training_memory(n_params: float, what: str, fix: str, memory_bytes: float | None = None) -> None:
    """Refuse, before it is built, a model whose training state alone would not fit in 80% of this machine's
    memory (activations come on top), rather than let the kernel kill the process part-way."""
    memory_bytes = machine_memory_bytes() if memory_bytes is None else memory_bytes
    need = n_params * TRAINING_BYTES_PER_PARAM
    if need > 0.8 * memory_bytes:
        raise FlopwiseError(f"{what} ({n_params:.3g} params) needs ~{need / 1e9:.3g} GB for weights and optimizer "
                            f"state, more than this machine's {memory_bytes / 1e9:.3g} GB: {fix}")


def max_params_for_memory(memory_bytes: float, bits: int) -> float:
    """Largest N whose quantised weights fit ``memory_bytes``."""
    return memory_bytes * 8.0 / bits_per_weight(bits)


def decode_tokens_per_s(n_params: float, bits: int, bandwidth_bytes_per_s: float) -> float:
    """Bandwidth-bound decode speed: every weight is read once per generated token."""
    return bandwidth_bytes_per_s / (n_params * bits_per_weight(bits) / 8.0)
