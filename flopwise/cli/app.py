"""The Typer app every command module registers on, and the CLI's formatting helpers."""

from __future__ import annotations

import os
import re

import typer
from rich.console import Console

from flopwise import __version__
from flopwise.config import THREADS_ENV, requested_threads
from flopwise.errors import FlopwiseError, require  # noqa: F401  (require: the commands' option checks)


def _hide_flag_types() -> None:
    """Typer 0.29 prints '<bool>' beside plain flags (--json, --quiet) in --help: noise; print nothing there."""
    from typer import core

    shown = getattr(core.TyperOption, "display_type_rich", None)
    if shown is not None:
        core.TyperOption.display_type_rich = lambda self, ctx: None if getattr(self, "is_flag", False) else \
            shown(self, ctx)


_hide_flag_types()
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="flopwise: the best small language model a compute budget can buy.")
hw_app = typer.Typer(no_args_is_help=True, help="Hardware presets and measurements.")
app.add_typer(hw_app, name="hw")
console = Console()
err_console = Console(stderr=True)


def warn(message: str) -> None:
    """A warning or note on stderr, so that piped output (--json) stays clean."""
    err_console.print(f"[yellow]{message}[/yellow]")


def given(ctx: typer.Context, *names: str) -> list[str]:
    """The options among ``names`` (parameter names) that the user set, as they are spelled ('--plan')."""
    spelled = {p.name: (p.opts[0] if p.opts and p.opts[0].startswith("-") else (p.metavar or p.name.upper()))
               for p in ctx.command.params}
    out = []
    for n in names:
        source = ctx.get_parameter_source(n)
        if source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP"):
            out.append(spelled.get(n, n))
    return out


def log_to_option():
    return typer.Option("none", "--log-to", help="Also log metrics to tensorboard or wandb (metrics.jsonl stays the "
                        "record; wandb is offline unless WANDB_MODE or WANDB_API_KEY say otherwise), or none.")


def threads_option():
    return typer.Option(0, "--threads", help="CPU threads, fixed (0: all cores while the machine is idle, fewer "
                        "while other processes are busy). Also $FLOPWISE_THREADS.")


def set_threads(threads: int) -> int:
    """Apply --threads to this command and every process it starts (through $FLOPWISE_THREADS)."""
    n = requested_threads(threads)
    if n:
        os.environ[THREADS_ENV] = str(n)
    return n


def _version(value: bool) -> None:
    if value:
        print(f"flopwise {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def fmt_count(x: float | None) -> str:
    """1.23e9 -> '1.23B'."""
    if x is None:
        return "-"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def plural(n: int, noun: str) -> str:
    """'1 run', '3 runs'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def fmt_amount(x: float) -> str:
    """Plain notation with thousands separators (1,130; 4.2; 0.031), scientific only beyond a billion."""
    if x != x or abs(x) >= 1e9 or (x and abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def fmt_hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:.3g} s"
    if h < 1:
        return f"{h * 60:.3g} min"
    if h < 48:
        return f"{h:.3g} h"
    if h < 24 * 730:
        return f"{fmt_amount(h / 24)} days"
    return f"{fmt_amount(h / 24 / 365)} years"


_SIZE = re.compile(r"^\s*([0-9.eE+-]+)\s*([kmgt]i?b?)?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> float:
    """'4GB' / '512MiB' / '8e9' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise FlopwiseError(f"cannot read {text!r} as a size: write e.g. 4GB, 512MiB or 8e9")
    unit = (m.group(2) or "").lower()
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit[:1]]
    if "i" in unit:
        scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[unit[:1]]
    try:
        return float(m.group(1)) * scale
    except ValueError:
        raise FlopwiseError(f"cannot read {text!r} as a size: write e.g. 4GB, 512MiB or 8e9") from None
