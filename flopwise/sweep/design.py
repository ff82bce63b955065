"""IsoFLOP sweep design: budgets x model sizes, each run's tokens set so its exact FLOPs equal its budget.

Sizes are log-spaced around the optimum a prior law predicts (``spread`` x either side), each
made a concrete shape by ``flopwise.laws.shape``. A sweep folder holds ``sweep.json`` (this
design) and one run directory per run; results come from the runs' ``final.json`` files.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flopwise.config import SWEEP_MICRO_BATCH
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text
from flopwise.laws.flops import Shape, n_params_total, training_flops_per_token
from flopwise.laws.hardware import check_training_memory
from flopwise.laws.hyper import default_lr_and_batch
from flopwise.laws.law import DEFAULT_LAW, Law, load_law
from flopwise.laws.shape import FAMILY_HEAD_DIM, family_depth, family_shape, family_shape_at
from flopwise.training.schedule import wsd_cooldown_start

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


MIN_STEPS = 100  # optimizer steps every sweep run gets at least: fewer, and its loss says little about its size
MIN_BATCH_SEQS = 8  # the smallest batch (sequences) a small budget's runs shrink to, to reach their steps
TARGET_STEPS = 300  # steps the batch aims to give a budget's largest model: with 105-174 steps the largest models
# of a bundled-corpus sweep were 0.1-0.64 nats worse than the next size down, and its fit was not identifiable
BRACKET = 2.0  # the sizes must reach this factor below and above the prior's optimum to bracket it


# The window's centre is the prior's N_opt / lean. Measured on the bundled corpus (IsoFLOP minima of 47.8K, 83.2K
# and 115K parameters at 4.1e11, 1.03e12 and 2.56e12 FLOPs), Epoch's N_opt was 0.90, 0.82 and 0.95x the minimum
# and Chinchilla's published constants' 2.41, 2.10 and 2.31x; other priors are taken as they are.
LEAN = {"epoch": 0.9, "chinchilla": 2.2}


def prior_lean(prior: Law, lean: float | None = None) -> float:
    """``lean`` if given, else the measured one of a registry prior (1 for others)."""
    return LEAN.get(prior.name, 1.0) if lean is None else lean


def sweep_depth(prior: Law, budgets, lean: float) -> int:
    """One depth for every run of a sweep: the family's depth at the largest budget's centre."""
    return family_depth(_centre(prior, max(budgets), lean))


def _centre(prior: Law, budget: float, lean: float) -> float:
    return float(prior.optimal(budget)[0]) / lean


def sweep_batch(budget: float, fewest_tokens: int, seq_len: int, min_steps: int) -> int:
    """Tokens per step for one budget's runs: DeepSeek's batch for the budget, shrunk (down to MIN_BATCH_SEQS
    sequences) until the run with the fewest tokens gets TARGET_STEPS steps (at least ``min_steps``)."""
    seqs = max(MIN_BATCH_SEQS, min(round(default_lr_and_batch(budget)[1] / seq_len),
                                   fewest_tokens // (max(min_steps, TARGET_STEPS) * seq_len)))
    # a batch the trainer keeps as is: gradient accumulation needs equal micro-batches (config.resolve would
    # round 17 sequences up to 2 x 9, and a WSD trunk would then end short of its branches' checkpoints)
    accum = math.ceil(seqs / SWEEP_MICRO_BATCH)
    return seqs // accum * accum * seq_len


def _budget_runs(b: float, vocab_size: int, seq_len: int, n_sizes: int, spread: float, prior: Law, lean: float,
                 min_steps: int, depth: int) -> tuple[list[RunSpec], str]:
    """One budget's runs, or ([], why the budget cannot give an informative IsoFLOP profile)."""
    centre = _centre(prior, b, lean)
    n_min = n_params_total(family_shape_at(FAMILY_HEAD_DIM, depth, vocab_size, seq_len))
    low, high = max(centre / spread, n_min), centre * spread
    if low > centre / BRACKET or high <= low:
        return [], (f"its optimum (about {describe(centre)} params by the {prior.name} prior) is too close to the "
                    f"smallest model this vocabulary allows ({describe(n_min)}) to be bracketed")
    shapes = list(dict.fromkeys(family_shape(float(t), depth, vocab_size, seq_len)
                                for t in np.geomspace(low, high, n_sizes)))
    if len(shapes) < 3:
        return [], "fewer than 3 distinct model sizes fit its window"
    tokens = [int(b / training_flops_per_token(s)) for s in shapes]
    batch = sweep_batch(b, min(tokens), seq_len, min_steps)
    steps = min(tokens) // batch
    if steps < min_steps:
        return [], (f"its largest model would get {steps} optimizer steps of {batch:,} tokens, fewer than "
                    f"--min-steps {min_steps}")
    return [RunSpec(name=f"c{b:.2e}-n{n_params_total(s):09d}".replace("+", ""), budget=b, shape=s.to_dict(),
                    n_params=n_params_total(s), n_tokens=t, options={"batch_tokens": batch})
            for s, t in zip(shapes, tokens, strict=True)], ""


def design_sweep(budgets, vocab_size: int, seq_len: int, n_sizes: int = 5, spread: float = 4.0,
                 prior: Law | str = DEFAULT_LAW, lean: float | None = None,
                 min_steps: int = MIN_STEPS) -> list[RunSpec]:
    """Runs for each budget: ``n_sizes`` sizes log-spaced over [N_c/spread, N_c*spread], N_c = N_opt/lean.

    Every size is a member of one family (``family_shape``: fixed depth, width the one dial), so loss
    moves smoothly with N. ``lean`` > 1 centres the window below the prior's N_opt, < 1 above it (default:
    the prior's measured lean, ``LEAN``). Where the
    window reaches below the smallest model it starts there, as long as the prior's optimum stays
    bracketed (a factor BRACKET inside). Each budget's runs share one batch, shrunk for small budgets
    so its largest model gets TARGET_STEPS optimizer steps (``options.batch_tokens``); a budget that
    cannot bracket its optimum, or give every run ``min_steps`` steps, is refused, naming the
    smallest budget that can.
    """
    prior = load_law(prior) if isinstance(prior, str) else prior
    lean = prior_lean(prior, lean)
    budgets = sorted(float(b) for b in budgets)
    if not budgets:
        raise FlopwiseError("a sweep needs at least one budget")
    if n_sizes < 3:
        raise FlopwiseError(f"--sizes must be at least 3 to locate a minimum, got {n_sizes}")
    if min_steps < 1:
        raise FlopwiseError(f"--min-steps must be at least 1, got {min_steps}")
    runs, bad, why = _design(budgets, vocab_size, seq_len, n_sizes, spread, prior, lean, min_steps)
    if bad is None:
        return runs

    def works(c: float) -> bool:  # the sweep the user would ask for next: this budget replaced, depth recomputed
        return _design([c if x == bad else x for x in budgets], vocab_size, seq_len, n_sizes, spread, prior, lean,
                       min_steps)[1] is None

    try:
        least = smallest_budget(works)
    except FlopwiseError:  # no replacement works beside the other budgets: the smallest that works on its own
        least = smallest_budget(lambda c: _design([c], vocab_size, seq_len, n_sizes, spread, prior, lean,
                                                  min_steps)[1] is None)
    raise FlopwiseError(f"budget {bad:.3g} FLOPs is too small for an informative sweep (vocab {vocab_size}, "
                        f"context {seq_len}): {why}; the smallest budget that works is {least:.2g} FLOPs")


def _design(budgets: list[float], vocab_size: int, seq_len: int, n_sizes: int, spread: float, prior: Law,
            lean: float, min_steps: int) -> tuple[list[RunSpec], float | None, str]:
    """(runs, None, "") or ([], the first budget refused, why)."""
    depth = sweep_depth(prior, budgets, lean)
    runs: list[RunSpec] = []
    for b in sorted(budgets):
        group, why = _budget_runs(b, vocab_size, seq_len, n_sizes, spread, prior, lean, min_steps, depth)
        if not group:
            return [], b, why
        runs += group
    return runs, None, ""


def smallest_budget(works, lo: float = 1e6, hi: float = 1e24) -> float:
    """The smallest budget (rounded up to 2 significant digits) for which ``works(budget)`` holds,
    by bisection in log budget (``works`` is assumed to hold from some budget on)."""
    if not works(hi):
        raise FlopwiseError("no budget up to 1e24 FLOPs gives an informative sweep with these settings")
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
        if hi / lo < 1.001:
            break
    b = hi
    for _ in range(1000):  # 2 significant digits, rounded up; that figure must itself be accepted
        unit = 10.0 ** (math.floor(math.log10(b)) - 1)
        b = math.ceil(b / unit - 1e-9) * unit
        if works(b):
            return b
        b += unit
    raise FlopwiseError("no budget near the bisection's answer gives an informative sweep with these settings")


def design_wsd_sweep(budgets, vocab_size: int, seq_len: int, n_sizes: int = 5, spread: float = 4.0,
                     prior: Law | str = DEFAULT_LAW, lean: float | None = None, cooldown_fraction: float = 0.2,
                     min_steps: int = MIN_STEPS) -> list[RunSpec]:
    """A WSD sweep (Hägele et al. 2024): one constant-LR trunk per model size, and for each budget a
    cooldown branch from the trunk's checkpoint that ends exactly at that budget's token count.

    Each budget takes its sizes as ``design_sweep`` does (same family, windows and refusals); sizes
    are shared between budgets where they coincide, so trunks are shared. All runs use one batch
    (the smallest any budget needs for ``min_steps``), peak LR and warmup, so a branch continues its
    trunk exactly (batches are a function of the step).
    """
    prior = load_law(prior) if isinstance(prior, str) else prior
    budgets = sorted(float(b) for b in budgets)
    cosine = design_sweep(budgets, vocab_size, seq_len, n_sizes, spread, prior, lean, min_steps)
    lr, _ = default_lr_and_batch(budgets[0])
    tokens_per_step = min(r.options["batch_tokens"] for r in cosine)
    plan = [(r.budget, Shape(**r.shape), r.n_tokens // tokens_per_step) for r in cosine]  # (budget, shape, steps)
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
    # sweeps designed before Muon became the default trained every run with AdamW: so do their missing runs
    if not isinstance(doc.get("train_options"), dict):
        doc["train_options"] = {}
    options = doc["train_options"]
    options.setdefault("optimizer", "adamw")
    if options["optimizer"] == "muon":
        options.setdefault("muon_lr_scale", 1.0)  # and Muon sweeps designed before the scale at 1
    for r in runs:  # sweeps written before branch_from named a WSD branch's trunk checkpoint init_from
        if "init_from" in r.options:
            r.options["branch_from"] = r.options.pop("init_from")
    return runs, doc


MAX_EPOCHS = 1000  # beyond this a run memorises its corpus: the budget is absurd for the data


def check_corpus(meta: dict, seq_len: int) -> None:
    """Refuse, before anything is written, a corpus too small for one context window of validation or two of
    training (the trainer would fail on it run by run)."""
    if meta["n_tokens_val"] < seq_len + 1:
        raise FlopwiseError(f"the corpus' validation split has {meta['n_tokens_val']:,} tokens, less than one "
                            f"context window of {seq_len + 1}: give more text (or --val FILE) or a shorter --seq-len")
    if meta["n_tokens_train"] < 2 * seq_len + 2:
        raise FlopwiseError(f"the corpus has {meta['n_tokens_train']:,} training tokens, fewer than two context "
                            f"windows of {seq_len + 1}: give more text or a shorter --seq-len")


def check_feasible(runs: list[RunSpec], n_tokens_train: int, memory_bytes: float | None = None,
                   fix: str = "lower the budgets") -> None:
    """Refuse, before any model is built, a sweep this corpus and machine cannot sensibly run."""
    big = max(runs, key=lambda r: r.n_params)
    check_training_memory(big.n_params, "the sweep's largest model", fix, memory_bytes)
    epochs = max(r.n_tokens for r in runs) / max(1, n_tokens_train)
    if epochs > MAX_EPOCHS:
        raise FlopwiseError(f"the sweep's longest run repeats the corpus {epochs:.3g} times (more than {MAX_EPOCHS}): "
                            f"{fix} or give more text")


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
