"""The ``flopwise`` command: a thin Typer layer over the library.

Heavy imports (torch) happen inside the commands that need them, so ``flopwise plan`` and
``flopwise fit`` start fast. Each module below registers its commands on ``app`` (cli/app.py).
"""

from __future__ import annotations

import re
import sys

from typer import Abort
from typer._click.exceptions import ClickException, NoArgsIsHelpError  # Typer >= 0.29 vendors click

from flopwise.cli import fit, infer, plan, sweep, train, tune  # noqa: F401  (they register their commands)
from flopwise.cli.app import app
from flopwise.errors import EXTRAS, FlopwiseError, install_hint


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. A problem with the user's input is one line on stderr and exit code 2, never a traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        code = app(args=argv, prog_name="flopwise", standalone_mode=False)
    except FlopwiseError as e:
        _fail(str(e))
    except NoArgsIsHelpError as e:  # 'flopwise' or 'flopwise sweep' alone: the help (Typer may have shown it)
        if e.format_message().strip():
            print(e.format_message())
        sys.exit(0)
    except ClickException as e:  # unknown option, bad value, missing argument: Typer's own checks
        _fail(f"{_usage_message(e)} (see '{_command(argv)} --help')", getattr(e, "exit_code", 2) or 2)
    except ModuleNotFoundError as e:  # an optional part that this install left out (pip install flopwise: planner only)
        module = (e.name or "").split(".")[0]
        if module not in EXTRAS:
            raise
        _fail(f"'{_command(argv)}' needs {module}, which is not installed: {install_hint(module)}")
    except Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int = 2) -> None:
    print("error: " + " ".join(message.strip().splitlines()), file=sys.stderr)  # one line, whatever it held
    sys.exit(code)


def _usage_message(e: Exception) -> str:
    text = e.format_message() if hasattr(e, "format_message") else str(e)
    return re.sub(r"\bValue error, ", "", text).rstrip(".")


def _command(argv: list[str]) -> str:
    """'flopwise sweep run' from argv: the leading words that name commands."""
    words, group = ["flopwise"], app
    for token in argv:
        import typer.main as tm

        cmd = tm.get_command(group)
        sub = getattr(cmd, "commands", {}).get(token)
        if sub is None:
            break
        words.append(token)
        group = next((g.typer_instance for g in group.registered_groups if g.name == token), None)
        if group is None:
            break
    return " ".join(words)
