"""Benchmark: the bundled demo's sweep through `flopwise sweep run` (issue 12's acceptance: 14-15 runs, about 2e13
FLOPs, in at most 2 minutes on 2 cores; 4 min 39 s when the issue was filed), optionally against another checkout
in the same invocation, the two taking turns.

Each sweep is its own process in an empty temporary folder (so no checkout is imported from the working directory:
`python -m` puts that first on sys.path, ahead of PYTHONPATH), with PYTHONPATH naming the checkout it runs. By
default each sweep also gets a fresh cache (FLOPWISE_CACHE: the C step built and every kernel choice measured, as on
a new machine) holding a copy of the prepared corpora, so corpus preparation is not timed; --warm keeps one cache per
checkout across its rounds instead. Printed per sweep: wall time, seconds before the first run started (imports,
build, measurements), the runs' summed training time, and the ETA the command announced.

    .venv/bin/python benchmarks/sweep_speed.py [--rounds 2] [--warm] [--baseline DIR]

For a baseline at another commit: git worktree add /tmp/base <commit>, then --baseline /tmp/base.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path

# another checkout beside this one (benchmarks/ is on the path of a script)
from checkout import require_checkout, run_flopwise

from flopwise.fsutil import cache_root

REPO = Path(__file__).resolve().parent.parent
BUDGETS = "410256410256.4103,1025641025641.0256,2564102564102.5645"  # the demo's three budgets (autopilot default)
ISSUE_SECONDS, TARGET_SECONDS = 279.0, 120.0


def sweep(code: Path, cache: Path, work: Path) -> dict:
    """One sweep with ``code`` on PYTHONPATH and ``cache`` as FLOPWISE_CACHE: its timings."""
    out = work / "sweep"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.time()
    r = run_flopwise(code, cache, work, ["sweep", "run", "--out", str(out), "--budgets", BUDGETS])
    wall = time.time() - t0
    runs = [p for p in out.iterdir() if (p / "final.json").exists()]
    eta = re.search(r"ETA about ([0-9.]+) min", r.stdout)
    return {"wall": wall, "first_run": min((p / "config.json").stat().st_mtime for p in runs) - t0,
            "summed": sum(json.loads((p / "final.json").read_text())["wall_seconds"] for p in runs),
            "runs": len(runs), "eta": float(eta.group(1)) * 60 if eta else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2, help="sweeps per checkout, taking turns")
    ap.add_argument("--warm", action="store_true", help="one cache per checkout, kept across its rounds")
    ap.add_argument("--baseline", type=Path, help="another checkout (e.g. a git worktree of an older commit)")
    args = ap.parse_args()
    codes = {"this": REPO, **({"baseline": require_checkout(ap, args.baseline)} if args.baseline else {})}
    corpora = cache_root() / "corpora"
    results: dict[str, list[dict]] = {name: [] for name in codes}
    print(f"{'checkout':>9} {'round':>5} {'wall':>8} {'to 1st run':>10} {'summed':>8} {'ETA':>7} {'runs':>4}")
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.rounds):
            for name, code in codes.items():
                cache = Path(tmp) / (f"cache-{name}" if args.warm else f"cache-{name}-{k}")
                if not cache.exists():
                    cache.mkdir()
                    if corpora.is_dir():  # the bundled corpus already prepared: not part of the timing
                        shutil.copytree(corpora, cache / "corpora")
                work = Path(tmp) / f"work-{name}"
                work.mkdir(exist_ok=True)
                r = sweep(code, cache, work)
                results[name].append(r)
                print(f"{name:>9} {k + 1:>5} {r['wall']:>7.1f}s {r['first_run']:>9.1f}s {r['summed']:>7.1f}s "
                      f"{r['eta']:>6.0f}s {r['runs']:>4}", flush=True)
                if not args.warm:
                    shutil.rmtree(cache)
    this = statistics.median(r["wall"] for r in results["this"])
    print(f"this checkout: median {this:.1f} s, {ISSUE_SECONDS / this:.2f}x faster than when issue 12 was filed "
          f"({ISSUE_SECONDS:.0f} s); target {TARGET_SECONDS:.0f} s: {'met' if this <= TARGET_SECONDS else 'missed'}")
    if args.baseline:
        base = statistics.median(r["wall"] for r in results["baseline"])
        summed = [statistics.median(r["summed"] for r in results[n]) for n in ("this", "baseline")]
        print(f"baseline: median {base:.1f} s; this checkout {base / this:.3f}x its speed (summed training "
              f"{summed[1] / summed[0]:.3f}x)")


if __name__ == "__main__":
    main()
