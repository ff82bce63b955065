"""flopwise plan, laws and hw."""

from __future__ import annotations

import json
import math
from typing import Optional

import typer
from rich.table import Table

from flopwise.cli.app import app, console, fmt_amount, fmt_count, fmt_hours, hw_app, parse_bytes, require
from flopwise.errors import FlopwiseError
from flopwise.laws.hardware import DEVICES, GPUS
from flopwise.laws.law import DEFAULT_LAW, REGISTRY


@app.command()
def plan(
    flops: Optional[float] = typer.Option(None, help="Training budget in FLOPs, e.g. 1e21."),
    gpu: Optional[str] = typer.Option(None, help="GPU type for a GPU-hours or dollar budget, and for time/cost "
                                      "(default h100; 'local' uses 'flopwise hw probe')."),
    gpus: int = typer.Option(1, help="Number of GPUs."),
    hours: Optional[float] = typer.Option(None, help="Wall-clock hours on --gpus x --gpu."),
    dollars: Optional[float] = typer.Option(None, help="Budget in dollars at --price-per-hour."),
    mfu: float = typer.Option(0.40, help="Model FLOP utilisation assumed for time and cost."),
    price_per_hour: Optional[float] = typer.Option(None, help="Dollars per GPU-hour (default: the preset's)."),
    law: str = typer.Option(DEFAULT_LAW, help="Registry name (see 'flopwise laws') or a law JSON file, e.g. "
                             "a fit's law.json."),
    inference_tokens: Optional[float] = typer.Option(None, help="Lifetime tokens the model will serve."),
    unique_tokens: Optional[float] = typer.Option(None, help="Unique training tokens available (repeats "
                                                  "cost effectiveness)."),
    device: Optional[str] = typer.Option(None, help="Target device whose memory caps N: rpi5, phone, laptop, m2."),
    bits: int = typer.Option(4, help="Weight bits on the device: 4, 8, 16 or 32."),
    max_memory: Optional[str] = typer.Option(None, help="Memory for weights instead of --device, e.g. 4GB."),
    vocab_size: Optional[int] = typer.Option(None, help="Vocabulary of the suggested shape (default by size)."),
    seq_len: int = typer.Option(2048, help="Context length of the suggested shape."),
    exact: bool = typer.Option(False, "--exact", help="Optimise under the exact FLOP count of real shapes."),
    pue: float = typer.Option(1.2, help="Data-centre power usage effectiveness for energy."),
    carbon: float = typer.Option(0.4, help="Grid carbon intensity, kg CO2e per kWh."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Compute-optimal N, D, shape, loss, time, cost and energy for a budget."""
    from flopwise.laws.plan import budget_flops, make_plan  # scipy: loaded by the command, not at start-up

    def positive(x):
        return x is None or (math.isfinite(x) and x > 0)

    require(("--flops", flops, positive(flops), "a positive number of FLOPs, e.g. 1e21"),
            ("--hours", hours, positive(hours), "a positive number of hours"),
            ("--dollars", dollars, positive(dollars), "a positive number of dollars"),
            ("--gpus", gpus, gpus >= 1, "at least 1"),
            ("--mfu", mfu, 0 < mfu <= 1, "in (0, 1], e.g. 0.4"),
            ("--price-per-hour", price_per_hour, positive(price_per_hour), "a positive number of dollars"),
            ("--inference-tokens", inference_tokens, positive(inference_tokens), "a positive number of tokens"),
            ("--unique-tokens", unique_tokens, positive(unique_tokens), "a positive number of tokens"),
            ("--bits", bits, bits in (4, 8, 16, 32), "4, 8, 16 or 32"),
            ("--vocab-size", vocab_size, vocab_size is None or 259 <= vocab_size <= 1 << 20,
             "between 259 and 1048576"),
            ("--seq-len", seq_len, 2 <= seq_len <= 1 << 20, "between 2 and 1048576"),
            ("--pue", pue, 1 <= pue <= 10, "between 1 (no overhead) and 10"),
            ("--carbon", carbon, 0 <= carbon <= 10, "between 0 and 10 kg CO2e per kWh"))
    if device is not None and max_memory is not None:
        raise FlopwiseError("give --device or --max-memory, not both: --max-memory replaces the device's memory")
    memory = parse_bytes(max_memory) if max_memory else None
    require(("--max-memory", max_memory, memory is None or memory > 0, "a positive size, e.g. 4GB"))
    budget = budget_flops(flops, gpu, gpus, hours, dollars, mfu, price_per_hour)
    p = make_plan(budget, law, inference_tokens=inference_tokens, unique_tokens=unique_tokens, device=device,
                  bits=bits, max_memory_bytes=memory, gpu=gpu or "h100",
                  n_gpus=gpus, mfu=mfu, price_per_hour=price_per_hour, pue=pue, carbon_kg_per_kwh=carbon,
                  vocab_size=vocab_size, seq_len=seq_len, exact_flops=exact)
    if as_json:
        print(json.dumps(p, indent=2))
        return
    print_plan(p)


def print_plan(p: dict) -> None:
    s, c = p["shape"], p["compute"]
    conv = "total" if p["n_convention"] == "total" else "non-embedding"
    form = f" ({p['form']} form)" if p.get("form") not in (None, "chinchilla", "power") else ""
    t = Table(title=f"flopwise plan  ·  {p['budget_flops']:.3g} FLOPs  ·  law {p['law']}{form}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("parameters N", f"{fmt_count(p['n_params'])} ({conv} convention)")
    t.add_row("tokens D", fmt_count(p["n_tokens"]))
    t.add_row("tokens / parameter", f"{p['tokens_per_param']:.1f}")
    t.add_row("expected loss", "-" if p["loss"] is None else f"{p['loss']:.4f} nats/token")
    if p.get("optimizer"):
        t.add_row("holds for", f"runs trained with {p['optimizer']} (the law's fit; another optimizer moves it: "
                  "'flopwise sweep compare')")
    t.add_row("shape", f"{s['n_layers']} layers × d_model {s['d_model']}, {s['n_heads']} heads "
              f"({s['n_kv_heads']} kv), d_ff {s['d_ff']}, vocab {s['vocab_size']}, ctx {s['seq_len']}"
              f"{', tied' if s['tie_embeddings'] else ''}")
    t.add_row("shape's N", f"{s['n_params_total']:,} total, {s['n_params_non_embedding']:,} non-embedding")
    t.add_row("training FLOPs", f"{p['flops_6nd']:.3g} by 6ND; {p['flops_exact']:.3g} by the shape's exact count "
              f"({s['training_flops_per_token']:,} FLOPs/token), which time, cost and energy use")
    t.add_row("time", f"{fmt_hours(c['hours'])} on {c['n_gpus']} × {c['gpu']} at {c['mfu']:.0%} MFU")
    t.add_row("cost", f"${c['dollars']:,.0f} at ${c['price_per_hour']:.2f}/GPU-hour")
    t.add_row("energy", f"{fmt_amount(c['kwh'])} kWh (PUE {c['pue']}), {fmt_amount(c['co2e_kg'])} kg CO2e "
              f"at {c['carbon_kg_per_kwh']} kg/kWh")
    if "data_constrained" in p:
        dc = p["data_constrained"]
        t.add_row("epochs of data", f"{dc['epochs']:.2f} over {fmt_count(dc['unique_tokens'])} unique tokens "
                  f"(effective {fmt_count(dc['effective_tokens'])})")
    if "inference" in p:
        inf = p["inference"]
        t.add_row("lifetime FLOPs", f"{inf['total_flops']:.3g} (train {inf['training_flops']:.3g} + serve "
                  f"{inf['inference_flops']:.3g}); {inf['saving']:.1%} less than the compute-optimal "
                  f"{fmt_count(inf['compute_optimal_n_params'])} model")
    if "device" in p:
        dv = p["device"]
        speed = f", about {dv['decode_tokens_per_s']:.3g} tokens/s decode (bandwidth bound)" \
            if dv["decode_tokens_per_s"] else ""
        t.add_row("device", f"{dv['name']}: {dv['bits']}-bit weights {dv['weight_bytes'] / 1e9:.3g} GB "
                  f"(max N {fmt_count(dv['max_params'])}){speed}")
    console.print(t)
    if p["tradeoff"]:
        tt = Table(title="Same compute, other sizes (bigger is not better)")
        for col in ("N", "× N_opt", "D", "tokens/param", "loss", "vs optimum"):
            tt.add_column(col, justify="right")
        for r in p["tradeoff"]:
            tt.add_row(fmt_count(r["n_params"]), f"{r['factor']:g}", fmt_count(r["n_tokens"]),
                       f"{r['tokens_per_param']:.3g}", f"{r['loss']:.4f}",
                       "optimum" if r["factor"] == 1 else f"+{r['loss_excess']:.4f}")
        console.print(tt)
    for note in p["notes"]:
        console.print(f"[dim]note: {note}[/dim]")
    for w in p["warnings"]:
        console.print(f"[yellow]warning: {w}[/yellow]")
    console.print(f"[dim]{p['citation']}[/dim]")


@app.command()
def laws(as_json: bool = typer.Option(False, "--json", help="Print the registry as JSON.")) -> None:
    """List the published scaling laws flopwise knows, with citations."""

    if as_json:
        print(json.dumps({k: v.to_dict() for k, v in REGISTRY.items()}, indent=2))
        return
    console.print("[bold]Scaling laws[/bold] (use: flopwise plan --law NAME; a fit's law.json works too)\n")
    for name, law in REGISTRY.items():
        if law.form == "power":
            consts = f"N_opt = {law.n_ref:.3g} (C / {law.flops_ref:.3g})^{law.a}"
        else:
            consts = (f"L = E + A/N^α + B/D^β: E={law.E:.4g} A={law.A:.4g} B={law.B:.4g} α={law.alpha:.4g} "
                      f"β={law.beta:.4g}")
        n, d = (float(v) for v in law.optimal(1e21))
        default = " [green](default)[/green]" if name == DEFAULT_LAW else ""
        console.print(f"[bold]{name}[/bold]{default}: {law.form} form, N counts {law.n_convention.replace('_', '-')} "
                      f"parameters; at 1e21 FLOPs {d / n:.1f} tokens per parameter")
        console.print(f"  {consts}", highlight=False)
        console.print(f"  [dim]{law.citation}[/dim]\n")


@hw_app.command("probe")
def hw_probe(device: Optional[str] = typer.Option(None, help="torch device (default: cuda if present, else cpu)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Measure this machine's matmul peak (fp32, bf16) and memory bandwidth; saved for MFU."""
    from flopwise.run import require_device
    from flopwise.training.probe import probe, save_probe  # torch: loaded by the command, not at start-up

    require(("--device", device, device in (None, "cpu", "mps") or device.split(":")[0] == "cuda",
             "cpu, cuda or mps"))
    require_device(device or "cpu")

    with console.status("measuring matmul peaks and memory bandwidth…"):
        result = probe(device)
    path = save_probe(result)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    console.print(f"{result['device']} ({result['device_type']}, {result['threads']} threads)")
    console.print(f"  fp32 matmul  {result['fp32_flops'] / 1e9:,.1f} GFLOP/s")
    console.print(f"  bf16 matmul  {result['bf16_flops'] / 1e9:,.1f} GFLOP/s")
    console.print(f"  bandwidth    {result['bandwidth_bytes_per_s'] / 1e9:,.1f} GB/s (copy, read + write)")
    console.print(f"[dim]saved to {path}; plan with --gpu local[/dim]")


@hw_app.command("list")
def hw_list() -> None:
    """List GPU and device presets with their sources."""

    t = Table(title="GPUs")
    for col in ("name", "bf16 TFLOP/s", "memory GB", "GB/s", "W", "$/h", "source"):
        t.add_column(col)
    for g in GPUS.values():
        t.add_row(g.name, f"{g.peak_flops / 1e12:g}", f"{g.memory_bytes / 1e9:g}",
                  f"{g.bandwidth_bytes_per_s / 1e9:g}", f"{g.power_watts:g}", f"{g.price_per_hour:.2f}", g.source)
    console.print(t)
    t = Table(title="Devices")
    for col in ("name", "memory GB", "GB/s", "source"):
        t.add_column(col)
    for dv in DEVICES.values():
        t.add_row(dv.name, f"{dv.memory_bytes / 1e9:g}", f"{dv.bandwidth_bytes_per_s / 1e9:g}", dv.source)
    console.print(t)


