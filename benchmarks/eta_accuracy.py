"""Benchmark: how close `flopwise train`'s announced ETA is to the time the run then takes (target: within 1.5x).

Trains three sizes on the bundled corpus (vocab 1024, context 128), each as its own `flopwise train` process,
reads the ETA from the start line ("...; about 25 s") and compares it with the run's measured wall time
(final.json) and with the whole process (start-up and preparing included).

    .venv/bin/python benchmarks/eta_accuracy.py [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = [(5e4, 3e6), (5e5, 1.2e6), (5e6, 3e5)]  # (parameters, tokens): each about 20-40 s on 2 cores


def seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every run's tokens")
    args = ap.parse_args()
    print(f"{'params':>8} {'tokens':>8} {'ETA':>8} {'run':>8} {'process':>8} {'run/ETA':>8} {'process/ETA':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        for n, d in SIZES:
            out = Path(tmp) / f"n{n:.0e}"
            t0 = time.time()
            r = subprocess.run([sys.executable, "-m", "flopwise", "train", "--n-params", f"{n:g}", "--tokens",
                                f"{d * args.scale:g}", "--seq-len", "128", "--vocab-size", "1024", "--out", str(out)],
                               capture_output=True, text=True, env={"COLUMNS": "400", **_env()})
            process = time.time() - t0
            if r.returncode:
                sys.exit(r.stderr)
            eta = seconds(re.search(r"about ([0-9.]+ (?:s|min|h))", r.stdout).group(1))
            run = json.loads((out / "final.json").read_text())["wall_seconds"]
            print(f"{n:>8.0e} {d * args.scale:>8.0e} {eta:>7.0f}s {run:>7.1f}s {process:>7.1f}s {run / eta:>8.2f} "
                  f"{process / eta:>11.2f}")


def _env() -> dict:
    import os

    return dict(os.environ)


if __name__ == "__main__":
    main()
