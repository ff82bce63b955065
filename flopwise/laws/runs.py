"""Tables of finished runs (N, D, loss) for fitting: CSV, JSONL or a sweep directory.

A sweep directory is a folder of run directories, each with ``final.json`` (n_params,
n_tokens, val_loss or loss, flops) and, optionally, ``metrics.jsonl`` loss curves.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from flopwise.errors import FlopwiseError
from flopwise.fsutil import parse_records

ALIASES = {
    "n_params": ("n_params", "n", "params", "parameters", "num_params", "model_size"),
    "n_tokens": ("n_tokens", "d", "tokens", "num_tokens", "data", "train_tokens"),
    "loss": ("loss", "val_loss", "l", "final_loss", "eval_loss"),
    "flops": ("flops", "c", "compute"),
    "budget": ("budget", "group", "isoflop", "budget_flops"),
    "name": ("name", "run", "id"),
}
REQUIRED = ("n_params", "n_tokens", "loss")


@dataclass
class Runs:
    """Finished runs. N in ``n_convention``; tokens; loss in nats/token; FLOPs."""

    n_params: np.ndarray
    n_tokens: np.ndarray
    loss: np.ndarray
    flops: np.ndarray
    budget: np.ndarray  # IsoFLOP group of each run (FLOPs)
    name: list[str]
    n_convention: str = "total"
    curves: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> tokens, flops, loss
    warnings: list[str] = field(default_factory=list)
    steps: np.ndarray | None = None  # optimizer steps of each run, where known (NaN where not)
    epochs: np.ndarray | None = None  # passes over the run's unique training tokens, where known (NaN where not)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # N in each convention known for every run
    optimizer: str | None = None  # what trained the runs (adamw, muon; "mixed"), where known

    def __len__(self) -> int:
        return len(self.loss)

    @property
    def conventions(self) -> list[str]:
        """The parameter conventions these runs can be fitted in: theirs, and any other every run carries."""
        return [self.n_convention] + sorted(c for c in self.counts if c != self.n_convention)

    def in_convention(self, convention: str) -> Runs:
        """The same runs with N counted in ``convention`` (total or non_embedding)."""
        convention = convention.replace("-", "_")
        if convention == self.n_convention:
            return self
        if convention not in self.counts:
            raise FlopwiseError(f"these runs do not carry {convention.replace('_', '-')} parameter counts: fit a "
                                "sweep folder (final.json has both), or add an n_params_non_embedding column")
        return replace(self, n_params=self.counts[convention], n_convention=convention)

    @property
    def repeated(self) -> bool:
        """Whether every run's epochs are known and some run saw its data more than once (what the
        data-constrained form needs)."""
        return (self.epochs is not None and bool(np.all(np.isfinite(self.epochs)))
                and bool(np.any(self.epochs > 1.0 + 1e-6)))

    @property
    def unique_tokens(self) -> np.ndarray | None:
        """Distinct tokens each run trained on (D / epochs; NaN where unknown), or None."""
        return None if self.epochs is None else self.n_tokens / self.epochs

    def subset(self, mask) -> Runs:
        mask = np.asarray(mask)
        idx = np.flatnonzero(mask) if mask.dtype == bool else mask
        return Runs(self.n_params[idx], self.n_tokens[idx], self.loss[idx], self.flops[idx], self.budget[idx],
                    [self.name[i] for i in idx], self.n_convention,
                    {self.name[i]: self.curves[self.name[i]] for i in idx if self.name[i] in self.curves},
                    list(self.warnings), None if self.steps is None else self.steps[idx],
                    None if self.epochs is None else self.epochs[idx],
                    {k: v[idx] for k, v in self.counts.items()}, self.optimizer)

    @property
    def budgets(self) -> np.ndarray:
        """Distinct IsoFLOP budgets, ascending."""
        return np.unique(self.budget)


def group_budgets(flops: np.ndarray, tolerance: float = 0.1) -> np.ndarray:
    """Give runs whose FLOPs agree within ``tolerance`` one budget (their geometric mean)."""
    order = np.argsort(flops)
    logs = np.log(flops[order])
    groups = np.cumsum(np.r_[0, np.diff(logs) > math.log1p(tolerance)])
    budget = np.empty_like(flops)
    for g in np.unique(groups):
        members = order[groups == g]
        budget[members] = math.exp(float(np.mean(np.log(flops[members]))))
    return budget


def _match_columns(columns: list[str], source: str) -> dict[str, str]:
    lower = {c.strip().lower(): c for c in columns}
    found = {}
    for key, names in ALIASES.items():
        for n in names:
            if n in lower:
                found[key] = lower[n]
                break
    missing = [k for k in REQUIRED if k not in found]
    if missing:
        accepted = "; ".join(f"{k}: {', '.join(ALIASES[k])}" for k in missing)
        raise FlopwiseError(f"{source} has no column for {', '.join(missing)} (accepted names, any case: {accepted})")
    return found


def _number(value, row: int, column: str, source: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FlopwiseError(f"{source} row {row}: {column} is {value!r}, not a number") from None
    if not math.isfinite(x) or x <= 0:
        raise FlopwiseError(f"{source} row {row}: {column} must be a positive finite number, got {value!r}")
    return x


def runs_from_records(records: list[dict], source: str = "runs", n_convention: str = "total") -> Runs:
    """Build a validated table from dict records with (aliased) column names."""
    if not records:
        raise FlopwiseError(f"{source} holds no runs: it needs rows with n_params, n_tokens and loss")
    columns = sorted({k for r in records for k in r})
    cols = _match_columns(columns, source)
    data = {k: [] for k in ("n_params", "n_tokens", "loss", "flops", "budget")}
    names = []
    for i, r in enumerate(records, start=1):
        for key in REQUIRED:
            data[key].append(_number(r.get(cols[key]), i, cols[key], source))
        for key in ("flops", "budget"):
            v = r.get(cols[key]) if key in cols else None
            data[key].append(_number(v, i, cols[key], source) if v not in (None, "") else math.nan)
        names.append(str(r.get(cols["name"], f"run{i}")) if "name" in cols else f"run{i}")
    steps, epochs = (_optional(records, key, source) for key in ("steps", "epochs"))
    non_embedding = _optional(records, "n_params_non_embedding", source)
    n, d, loss = (np.array(data[k]) for k in REQUIRED)
    flops = np.array(data["flops"])
    flops = np.where(np.isnan(flops), 6.0 * n * d, flops)
    budget = np.array(data["budget"])
    if np.isnan(budget).any():
        budget = np.where(np.isnan(budget), group_budgets(flops), budget)
    warnings = []
    keys = list(zip(n, d, loss, strict=True))
    dupes = len(keys) - len(set(keys))
    if dupes:
        warnings.append(f"{dupes} duplicated run(s) (same N, D and loss) in {source}: each counts as a separate run")
    counts = {n_convention: n}
    if n_convention == "total" and non_embedding is not None and np.all(np.isfinite(non_embedding)):
        counts["non_embedding"] = non_embedding
    optimizers = sorted({str(r["optimizer"]) for r in records if r.get("optimizer") not in (None, "")})
    if len(optimizers) > 1:
        warnings.append(f"the runs were trained with different optimizers ({', '.join(optimizers)}): a law holds for "
                        "one; fit each optimizer's runs separately and compare with 'flopwise sweep compare'")
    optimizer = optimizers[0] if len(optimizers) == 1 else "mixed" if optimizers else None
    return Runs(n, d, loss, flops, budget, names, n_convention, {}, warnings, steps, epochs, counts, optimizer)


def _optional(records: list[dict], key: str, source: str) -> np.ndarray | None:
    """An optional numeric column (NaN where a row lacks it), or None when no row has it."""
    if not any(r.get(key) not in (None, "") for r in records):
        return None
    return np.array([_number(r[key], i, key, source) if r.get(key) not in (None, "") else math.nan
                     for i, r in enumerate(records, start=1)])


def _read_curve(path: Path) -> dict[str, np.ndarray] | None:
    tokens, flops, loss = [], [], []
    for line in path.read_text().splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if all(isinstance(m.get(k), (int, float)) for k in ("tokens", "flops", "loss")):
            tokens.append(m["tokens"])
            flops.append(m["flops"])
            loss.append(m["loss"])
    if len(loss) < 2:
        return None
    return {"tokens": np.array(tokens, float), "flops": np.array(flops, float), "loss": np.array(loss, float)}


def load_runs(path: str | Path, n_convention: str = "total") -> Runs:
    """Read a CSV, a JSONL file or a sweep directory of run folders with final.json."""
    path = Path(path)
    if not path.exists():
        raise FlopwiseError(f"{path} does not exist: give a CSV or JSONL table of runs, or a sweep directory")
    if path.is_dir():
        return _load_sweep_dir(path, n_convention)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise FlopwiseError(f"cannot read {path}: {e}") from None
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        records = [r for _, r in parse_records(text, str(path))]
    else:
        records = list(csv.DictReader(text.splitlines()))
    return runs_from_records(records, str(path), n_convention)


def _load_sweep_dir(path: Path, n_convention: str) -> Runs:
    records, curves, skipped = [], {}, 0
    for final in sorted(path.glob("*/final.json")):
        try:
            f = json.loads(final.read_text())
        except (OSError, json.JSONDecodeError):
            skipped += 1
            continue
        if f.get("trunk"):  # a WSD trunk: its branches are the sweep's runs
            continue
        key = "n_params_non_embedding" if n_convention == "non_embedding" else "n_params"
        rec = {"name": final.parent.name, "n_params": f.get(key, f.get("n_params")),
               "n_params_non_embedding": f.get("n_params_non_embedding"), "n_tokens": f.get("n_tokens"),
               "loss": f.get("val_loss", f.get("loss")), "flops": f.get("flops"), "steps": f.get("steps"),
               "epochs": f.get("epochs"), "optimizer": f.get("optimizer", "adamw")}  # before Muon: AdamW
        if "budget" in f:
            rec["budget"] = f["budget"]
        records.append(rec)
        metrics = final.parent / "metrics.jsonl"
        if metrics.exists():
            curve = _read_curve(metrics)
            if curve is not None:
                curves[final.parent.name] = curve
    if not records:
        raise FlopwiseError(f"{path} has no finished runs (no */final.json): run or finish the sweep first")
    runs = runs_from_records(records, str(path), n_convention)
    runs.curves = curves
    if skipped:
        runs.warnings.append(f"skipped {skipped} unreadable final.json file(s)")
    return runs
