"""``flopwise plan`` as a function: a budget in, N, D, shape, loss, time, cost and energy out.

The result is a plain dict (JSON-ready); its key names are an interface that the CLI, the
autopilot, the trainer's ``--plan`` and tests rely on: ``law``, ``flops``, ``n_params``,
``n_tokens``, ``tokens_per_param``, ``loss`` and ``shape``.
"""

from __future__ import annotations

import math

from flopwise.errors import FlopwiseError
from flopwise.laws import allocate, hardware
from flopwise.laws.flops import (
    n_params,
    n_params_non_embedding,
    n_params_total,
    training_flops_per_token,
)
from flopwise.laws.law import DEFAULT_LAW, Law, ParametricLaw, load_law
from flopwise.laws.shape import suggest_shape

PLAN_VERSION = 1


def budget_flops(flops: float | None = None, gpu: str | None = None, n_gpus: int = 1,
                 hours: float | None = None, dollars: float | None = None,
                 mfu: float = hardware.DEFAULT_MFU, price_per_hour: float | None = None) -> float:
    """Turn exactly one budget form (FLOPs, GPU x count x hours, or dollars) into FLOPs."""
    given = [name for name, v in (("--flops", flops), ("--hours", hours), ("--dollars", dollars)) if v is not None]
    if len(given) > 1:
        raise FlopwiseError(f"give one budget, not {' and '.join(given)}: use --flops, or --gpu with --hours, "
                            "or --dollars")
    if not given:
        raise FlopwiseError("no budget given: use --flops 1e21, or --gpu h100 --gpus 8 --hours 24, or --dollars 500")
    if flops is not None:
        return allocate.check_flops(flops, "--flops")
    device = hardware.get_gpu(gpu or "h100")
    if hours is not None:
        return allocate.check_flops(hardware.flops_from_gpu_hours(device, n_gpus, hours, mfu), "the --hours budget")
    return allocate.check_flops(hardware.flops_from_dollars(device, dollars, price_per_hour, mfu),
                                "the --dollars budget")


def _fit_warnings(law: Law, flops: float) -> list[str]:
    """What a fitted law's own fit said about it: its verdict, and how far this budget lies beyond its runs."""
    fit = law.extra.get("fit", {}) if isinstance(law.extra.get("fit"), dict) else {}
    verdict = fit.get("verdict", law.extra.get("verdict"))
    out = []
    if verdict == "not informative":
        out.append("the fit that made this law judged itself not informative (see its fit.json): its plan is a "
                   "guess")
    span = fit.get("fitted_flops", law.extra.get("fitted_flops"))
    ok = isinstance(span, list) and len(span) == 2 and all(isinstance(x, (int, float)) and x > 0 for x in span)
    if ok and flops > 100 * span[1]:
        out.append(f"the law was fitted on runs of {span[0]:.3g}-{span[1]:.3g} FLOPs; this budget is "
                   f"{math.log10(flops / span[1]):.1f} decades beyond them, so N and D are an extrapolation")
    return out


def _shape_flops(law: Law, vocab_size: int | None, seq_len: int):
    """(actual N in the law's convention, exact training FLOPs/token) of the shape for a target N."""
    def f(n_target: float) -> tuple[float, float]:
        s = suggest_shape(n_target, law.n_convention, vocab_size, seq_len)
        return float(n_params(s, law.n_convention)), float(training_flops_per_token(s))
    return f


def make_plan(flops: float, law: Law | str = DEFAULT_LAW, *, inference_tokens: float | None = None,
              unique_tokens: float | None = None, device: str | None = None, bits: int = 4,
              max_memory_bytes: float | None = None, gpu: str = "h100", n_gpus: int = 1,
              mfu: float = hardware.DEFAULT_MFU, price_per_hour: float | None = None,
              pue: float = hardware.DEFAULT_PUE, carbon_kg_per_kwh: float = hardware.DEFAULT_CARBON_KG_PER_KWH,
              vocab_size: int | None = None, seq_len: int = 2048, exact_flops: bool = False) -> dict:
    """Plan a training run for ``flops`` FLOPs under ``law`` (a law, registry name or JSON path)."""
    law = load_law(law) if isinstance(law, str) else law
    flops = allocate.check_flops(flops)
    given = [name for name, v in (("--exact", exact_flops or None), ("--unique-tokens", unique_tokens),
                                  ("--inference-tokens", inference_tokens)) if v is not None]
    if len(given) > 1:  # each re-solves the allocation under its own constraint; they do not compose yet
        raise FlopwiseError(f"{' and '.join(given)} cannot be combined yet: plan with one of them")
    warnings: list[str] = list(_fit_warnings(law, flops))
    notes: list[str] = []
    out: dict = {"plan_version": PLAN_VERSION, "law": law.name, "form": law.form, "n_convention": law.n_convention,
                 "optimizer": law.extra.get("optimizer")}  # what trained the runs the law was fitted to

    opt = allocate.compute_optimal(law, flops)
    n, d, loss, train_flops = opt.n_params, opt.n_tokens, opt.loss, flops
    if exact_flops:
        ex = allocate.exact_optimal(law, flops, _shape_flops(law, vocab_size, seq_len))
        n, d, loss = ex.n_params, ex.n_tokens, ex.loss
        notes.append("N and D minimise the law under the exact FLOP count of real shapes, not 6ND")
    if unique_tokens is not None:
        dc = allocate.data_constrained(law, flops, unique_tokens)
        n, d, loss = dc.n_params, dc.n_tokens, dc.loss
        warnings += dc.warnings
        out["data_constrained"] = {
            "unique_tokens": float(unique_tokens), "epochs": dc.epochs, "effective_tokens": dc.effective_tokens,
            "effective_params": dc.effective_params, "unconstrained_n_params": dc.unconstrained.n_params,
            "unconstrained_n_tokens": dc.unconstrained.n_tokens, "r_d_star": allocate.r_d_star_of(law),
            "r_n_star": allocate.R_N_STAR,
        }
    if inference_tokens is not None:
        ia = allocate.inference_aware(law, flops, inference_tokens)
        n, d, loss, train_flops = ia.n_params, ia.n_tokens, ia.loss, ia.training_flops
        out["inference"] = {
            "inference_tokens": ia.inference_tokens, "training_flops": ia.training_flops,
            "inference_flops": ia.inference_flops, "total_flops": ia.total_flops,
            "compute_optimal_n_params": ia.compute_optimal.n_params,
            "compute_optimal_total_flops": ia.compute_optimal_total_flops,
            "saving": 1.0 - ia.total_flops / ia.compute_optimal_total_flops,
        }
        notes.append("inference-aware: the smallest lifetime cost (training + serving) that reaches the loss of "
                     "the compute-optimal model for this budget; training FLOPs may exceed the budget")

    if device is not None or max_memory_bytes is not None:
        dev = hardware.get_device(device) if device is not None else None
        limit = max_memory_bytes if max_memory_bytes is not None else dev.memory_bytes * hardware.WEIGHT_MEMORY_FRACTION
        if not (math.isfinite(limit) and limit > 0):
            raise FlopwiseError(f"--max-memory must be a positive number of bytes, got {limit}")
        n_cap = hardware.max_params_for_memory(limit, bits)
        capped = n > n_cap
        if capped:
            n = n_cap
            d = (train_flops / _shape_flops(law, vocab_size, seq_len)(n)[1] if exact_flops
                 else train_flops / (6.0 * n))
            loss = float(law.loss(n, d)) if isinstance(law, ParametricLaw) else None
            why = (f"half of the {dev.name}'s {dev.memory_bytes / 1e9:.3g} GB, the rest left to the system, the KV "
                   "cache and activations" if max_memory_bytes is None else "--max-memory")
            warnings.append(f"the device caps the model at {n_cap:.3g} parameters ({bits}-bit weights in "
                            f"{limit / 1e9:.3g} GB: {why}); the budget buys more tokens instead")
        out["device"] = {
            "name": dev.name if dev else "custom", "bits": bits,
            "bits_per_weight": hardware.bits_per_weight(bits), "weight_memory_limit_bytes": limit,
            "max_params": n_cap, "capped": capped, "weight_bytes": n * hardware.bits_per_weight(bits) / 8.0,
            "decode_tokens_per_s": (hardware.decode_tokens_per_s(n, bits, dev.bandwidth_bytes_per_s)
                                    if dev else None),
            "source": dev.source if dev else "--max-memory",
        }

    shape = suggest_shape(n, law.n_convention, vocab_size, seq_len)
    fpt = training_flops_per_token(shape)
    out.update({
        "flops": train_flops, "budget_flops": flops, "n_params": n, "n_tokens": d, "tokens_per_param": d / n,
        "loss": loss,
        "shape": {**shape.to_dict(), "n_params_total": n_params_total(shape),
                  "n_params_non_embedding": n_params_non_embedding(shape), "training_flops_per_token": fpt},
        "flops_exact": fpt * d, "flops_6nd": 6.0 * n * d,
        # time, cost and energy follow the FLOPs the hardware executes: the exact count of the suggested shape
        "compute": hardware.cost_of(fpt * d, hardware.get_gpu(gpu), n_gpus, mfu, price_per_hour, pue,
                                    carbon_kg_per_kwh),
        "tradeoff": allocate.size_tradeoff(law, flops) if isinstance(law, ParametricLaw) else [],
        "warnings": warnings, "notes": notes, "citation": law.citation,
    })
    if not exact_flops and fpt * d > 1.05 * flops:
        out["notes"].append(f"the suggested shape's exact count is {fpt * d / flops:.2f}x the {flops:.3g}-FLOP budget "
                            "(6ND leaves out attention and the output layer): time, cost and energy follow the exact "
                            "count; --exact plans N and D within the budget by it")
    if not isinstance(law, ParametricLaw):
        out["notes"].append(f"law {law.name} predicts allocation only: no expected loss")
    return out
