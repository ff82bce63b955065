"""IsoFLOP sweep design: budgets x model sizes, each run's tokens set so its exact FLOPs equal its budget.

Sizes are log-spaced around the optimum a prior law predicts (``spread`` x either side), each
made a concrete shape by ``flopwise.laws.shape``. A sweep folder holds ``sweep.json`` (this
design) and one run directory per run; results come from the runs' ``final.json`` files.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text
from flopwise.laws.flops import Shape, n_params_total, training_flops_per_token
from flopwise.laws.hyper import default_lr_and_batch
from flopwise.laws.law import Law, load_law
from flopwise.laws.shape import suggest_shape
from flopwise.train.schedule import wsd_cooldown_start

SWEEP_VERSION = 1


@dataclass
class RunSpec:
    name: str
    budget: float  # FLOPs (exact count) the finished run stands for (0 for a WSD trunk)
    shape: dict
    n_params: int  # total
    n_tokens: int
    options: dict = field(default_factory=dict)  # TrainConfig fields of this run (WSD trunks and branches)
    phase: int = 0  # runs of phase 1 start from checkpoints that phase-0 runs write
    start_tokens: int = 0  # tokens already trained when the run starts (a WSD branch's trunk part)

    @property
    def flops(self) -> float:
        """FLOPs this run itself spends."""
        return float(training_flops_per_token(Shape(**self.shape))) * (self.n_tokens - self.start_tokens)

    @property
    def full_flops(self) -> float:
        """FLOPs of the whole schedule the run ends (for a branch, trunk part included)."""
        return float(training_flops_per_token(Shape(**self.shape))) * self.n_tokens


def smallest_shape(vocab_size: int, seq_len: int) -> Shape:
    return Shape(vocab_size=vocab_size, d_model=32, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=96, seq_len=seq_len,
                 tie_embeddings=True)


def design_sweep(budgets, vocab_size: int, seq_len: int, n_sizes: int = 5, spread: float = 4.0,
                 prior: Law | str = "chinchilla", min_tokens: int = 0, lean: float = 2.0) -> list[RunSpec]:
    """Runs for each budget: ``n_sizes`` sizes log-spaced over [N_opt/(spread*lean), N_opt*spread/lean].

    ``lean`` > 1 tilts the window toward small models: published laws, fitted on large models,
    overestimate N_opt for tiny ones whose parameters are mostly embeddings (seen on the bundled
    corpus, where the optimum at 3e11-3e12 FLOPs sat 2-3x below Chinchilla's). Where the window
    reaches below the smallest model, it starts at the smallest model instead.
    """
    prior = load_law(prior) if isinstance(prior, str) else prior
    budgets = sorted(float(b) for b in budgets)
    if not budgets:
        raise FlopwiseError("a sweep needs at least one budget")
    if n_sizes < 3:
        raise FlopwiseError(f"--sizes must be at least 3 to locate a minimum, got {n_sizes}")
    smallest = smallest_shape(vocab_size, seq_len)
    n_min = n_params_total(smallest)
    runs: list[RunSpec] = []
    for b in budgets:
        targets = np.geomspace(*_window(prior, b, spread, lean, n_min), n_sizes)
        seen = set()
        for target in targets:
            shape = suggest_shape(float(target), vocab_size=vocab_size, seq_len=seq_len)
            if shape in seen:
                continue
            seen.add(shape)
            tokens = int(b / training_flops_per_token(shape))
            if tokens < max(min_tokens, 1):
                continue
            runs.append(RunSpec(name=f"c{b:.2e}-n{n_params_total(shape):09d}".replace("+", ""), budget=b,
                                shape=shape.to_dict(), n_params=n_params_total(shape), n_tokens=tokens))
    if not runs:
        fpt = training_flops_per_token(smallest)
        raise FlopwiseError(f"the budgets are too small to train even the smallest model ({n_min:,} params, "
                            f"{fpt:,} FLOPs/token): give budgets of at least {fpt * 20 * 256:.2g} FLOPs")
    return runs


def _window(prior: Law, budget: float, spread: float, lean: float, n_min: float) -> tuple[float, float]:
    n_opt = float(prior.optimal(budget)[0])
    low = max(n_opt / (spread * lean), n_min * 1.05)  # sizes below the smallest model do not exist
    return low, max(n_opt * spread / lean, low * spread)


def design_wsd_sweep(budgets, vocab_size: int, seq_len: int, n_sizes: int = 5, spread: float = 4.0,
                     prior: Law | str = "chinchilla", lean: float = 2.0, cooldown_fraction: float = 0.2,
                     min_steps: int = 20) -> list[RunSpec]:
    """A WSD sweep (Hägele et al. 2024): one constant-LR trunk per model size, and for each budget a
    cooldown branch from the trunk's checkpoint that ends exactly at that budget's token count.

    Sizes lie on one geometric grid shared by all budgets (so trunks are shared); each budget uses
    the grid points inside its window. All runs use one batch, peak LR and warmup, so a branch
    continues its trunk exactly (batches are a function of the step).
    """
    prior = load_law(prior) if isinstance(prior, str) else prior
    budgets = sorted(float(b) for b in budgets)
    n_min = n_params_total(smallest_shape(vocab_size, seq_len))
    windows = {b: _window(prior, b, spread, lean, n_min) for b in budgets}
    ratio = (spread * spread) ** (1.0 / max(1, n_sizes - 1))
    lo = min(w[0] for w in windows.values())
    hi = max(w[1] for w in windows.values())
    grid = lo * ratio ** np.arange(math.ceil(math.log(hi / lo) / math.log(ratio) - 1e-9) + 1)
    lr, batch_tokens = default_lr_and_batch(budgets[0])
    tokens_per_step = max(1, round(batch_tokens / seq_len)) * seq_len
    shapes = {float(g): suggest_shape(float(g), vocab_size=vocab_size, seq_len=seq_len) for g in grid}
    plan = []  # (budget, shape, steps)
    for b, (w_lo, w_hi) in windows.items():
        for g, shape in shapes.items():
            if w_lo / math.sqrt(ratio) <= g <= w_hi * math.sqrt(ratio):
                steps = round(b / training_flops_per_token(shape) / tokens_per_step)
                if steps >= min_steps:
                    plan.append((b, shape, steps))
    if not plan:
        raise FlopwiseError(f"the budgets are too small for a WSD sweep: each run needs {min_steps} steps of "
                            f"{tokens_per_step} tokens")
    warmup = min(500, max(1, round(0.05 * min(p[2] for p in plan))))
    common = {"lr": lr, "batch_tokens": tokens_per_step, "warmup_steps": warmup}
    runs: list[RunSpec] = []
    for shape in dict.fromkeys(p[1] for p in plan):
        branches = [(b, steps) for b, s, steps in plan if s == shape]
        starts = {b: wsd_cooldown_start(steps, warmup, cooldown_fraction) + 1 for b, steps in branches}
        n = n_params_total(shape)
        trunk = f"trunk-n{n:09d}"
        runs.append(RunSpec(name=trunk, budget=0.0, shape=shape.to_dict(), n_params=n,
                            n_tokens=max(starts.values()) * tokens_per_step, phase=0,
                            options={**common, "schedule": "constant", "save_at_steps": sorted(set(starts.values())),
                                     "extra": {"trunk": True}}))
        for b, steps in branches:
            runs.append(RunSpec(
                name=f"c{b:.2e}-n{n:09d}".replace("+", ""), budget=b, shape=shape.to_dict(), n_params=n,
                n_tokens=steps * tokens_per_step, phase=1, start_tokens=starts[b] * tokens_per_step,
                options={**common, "schedule": "wsd", "cooldown_fraction": cooldown_fraction,
                         "branch_from": f"{trunk}/ckpt/step-{starts[b]}.pt"}))
    return runs


def budgets_for(total_flops: float, n_budgets: int = 3, ratio: float = 3.0, n_sizes: int = 5) -> list[float]:
    """Budgets b, b*ratio, b*ratio^2, ... whose runs (n_sizes each) spend ``total_flops`` together."""
    weights = ratio ** np.arange(n_budgets)
    b = total_flops / (n_sizes * weights.sum())
    return [float(b * w) for w in weights]


def write_design(sweep_dir: Path, runs: list[RunSpec], meta: dict) -> None:
    doc = {"version": SWEEP_VERSION, **meta, "runs": [asdict(r) for r in runs]}
    atomic_write_text(sweep_dir / "sweep.json", json.dumps(doc, indent=2) + "\n")


def read_design(sweep_dir: str | Path) -> tuple[list[RunSpec], dict]:
    path = Path(sweep_dir) / "sweep.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise FlopwiseError(f"{sweep_dir} is not a sweep (no readable sweep.json)") from None
    if doc.get("version") != SWEEP_VERSION:
        raise FlopwiseError(f"{path} has version {doc.get('version')}, this flopwise reads {SWEEP_VERSION}")
    runs = [RunSpec(**r) for r in doc.pop("runs")]
    for r in runs:  # sweeps written before branch_from named a WSD branch's trunk checkpoint init_from
        if "init_from" in r.options:
            r.options["branch_from"] = r.options.pop("init_from")
    return runs, doc


MAX_EPOCHS = 1000  # beyond this a run memorises its corpus: the budget is absurd for the data
TRAINING_BYTES_PER_PARAM = 16  # fp32 weights, gradients and AdamW's two moments


def check_feasible(runs: list[RunSpec], n_tokens_train: int, memory_bytes: float | None = None) -> None:
    """Refuse, before any model is built, a sweep this corpus and machine cannot sensibly run."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    big = max(runs, key=lambda r: r.n_params)
    need = big.n_params * TRAINING_BYTES_PER_PARAM
    if need > 0.8 * memory_bytes:
        raise FlopwiseError(f"the sweep's largest model ({big.n_params:.3g} params) needs ~{need / 1e9:.3g} GB for "
                            f"weights and optimizer state, more than this machine's {memory_bytes / 1e9:.3g} GB: "
                            "lower the budgets")
    epochs = max(r.n_tokens for r in runs) / max(1, n_tokens_train)
    if epochs > MAX_EPOCHS:
        raise FlopwiseError(f"the sweep's longest run repeats the corpus {epochs:.3g} times (more than {MAX_EPOCHS}): "
                            "lower the budgets or give more text")


def total_flops(runs: list[RunSpec]) -> float:
    """FLOPs the sweep spends (a WSD branch counts only its cooldown)."""
    return float(sum(r.flops for r in runs))


def equivalent_cosine_flops(runs: list[RunSpec]) -> float:
    """FLOPs the same finished runs would cost as independent cosine runs."""
    return float(sum(r.full_flops for r in runs if r.budget > 0))


def describe(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def log_spaced(lo: float, hi: float, n: int) -> list[float]:
    if not (0 < lo < hi) or n < 1:
        raise FlopwiseError(f"--min-flops and --max-flops must satisfy 0 < min < max, got {lo:g}, {hi:g}")
    return [float(x) for x in np.geomspace(lo, hi, n)] if n > 1 else [math.sqrt(lo * hi)]
