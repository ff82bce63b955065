"""The ``flopwise`` command: a thin Typer layer over the library.

Heavy imports (torch) happen inside the commands that need them, so ``flopwise plan`` and
``flopwise fit`` start fast. Each module below registers its commands on ``app`` (cli/app.py).
"""

from __future__ import annotations

import sys

from flopwise.cli import fit, infer, plan, sweep, train, tune  # noqa: F401  (they register their commands)
from flopwise.cli.app import app
from flopwise.errors import FlopwiseError


def main() -> None:
    try:
        app()
    except FlopwiseError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
