"""Another flopwise checkout's command line, run beside this one (the benchmarks' --baseline DIR): say a worktree of
the commit an issue was filed against (`git worktree add /tmp/base 44af72c`), so before and after are measured on
the same machine in one invocation."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

TIMEOUT_SECONDS = 7200  # a hung baseline ends the benchmark rather than holding the machine


def require_checkout(ap: argparse.ArgumentParser, code: Path) -> Path:
    """``code`` resolved, or a usage error (exit 2) when it holds no flopwise package to run."""
    if not (code / "flopwise" / "__main__.py").is_file():
        ap.error(f"--baseline {code}: not a flopwise checkout (no flopwise/__main__.py); "
                 "make one with `git worktree add /tmp/base <commit>`")
    return code.resolve()


def run_flopwise(code: Path, cache: Path, cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    """`python -m flopwise ARGS` with ``code``'s package and ``cache`` as FLOPWISE_CACHE, run in ``cwd``, which
    must not be a checkout: python -m puts the working directory before PYTHONPATH. Exits with the command's
    last words when it fails."""
    env = {**os.environ, "PYTHONPATH": str(code), "FLOPWISE_CACHE": str(cache), "COLUMNS": "400"}
    try:
        done = subprocess.run([sys.executable, "-m", "flopwise", *args], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        sys.exit(f"flopwise {args[0]} with {code}: no result after {TIMEOUT_SECONDS} s")
    if done.returncode:
        sys.exit(f"flopwise {args[0]} with {code} failed:\n{(done.stderr or done.stdout)[-2000:]}")
    return done
