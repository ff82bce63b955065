"""What a run is asked to do (TrainConfig, TuneOptions, AutopilotConfig) and what follows from it (Resolved):
torch-free, so the CLI shows these defaults without importing torch. config.json stores them (flopwise/run.py)."""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from flopwise.errors import FlopwiseError, install_hint, require
from flopwise.laws.flops import BLOCK_PROJECTIONS, Shape, training_flops_per_token
from flopwise.laws.hyper import default_lr_and_batch
from flopwise.laws.law import DEFAULT_LAW
from flopwise.laws.trust import MIN_STEPS

THREADS_ENV = "FLOPWISE_THREADS"  # a fixed torch thread count for every command, like --threads


def requested_threads(threads: int = 0) -> int:
    """``threads`` when > 0, else $FLOPWISE_THREADS, else 0: adapt to the cores other processes leave free."""
    if threads < 0:
        raise FlopwiseError(f"--threads must be 0 (adapt to the free cores) or a positive count, got {threads}")
    if threads:
        return threads
    env = os.environ.get(THREADS_ENV, "").strip()
    if env and not (env.isdigit() and int(env) > 0):
        raise FlopwiseError(f"{THREADS_ENV}={env!r}: give a positive number of threads, or unset it")
    return int(env or 0)


# Muon's learning rate over AdamW's, on top of match_rms_adamw. Moonshot matched the update RMS to AdamW's at
# their LRs; at the small, short runs flopwise trains (DeepSeek's LR rule clipped at 3e-3) that update was too
# small. Measured on the bundled corpus (time_to_loss.py's runs, val loss; lower is better):
#   d128 L4, 958K tokens: scale 1 3.530, 3 3.396, 4 3.392, 6 3.381, 12 3.450
#   d384 L6, 139K tokens: scale 1 4.216, 4 4.198, 8 4.249
# 4 is near the best at both widths; modded-nanogpt's Muon (lr 0.05, sqrt(rows/cols) scaling) updates a
# 768 x 768 matrix about 3x as much as match_rms_adamw at 3e-3 does, the same direction.
MUON_LR_SCALE = 4.0


@dataclass
class TrainConfig:
    """How to train. ``n_tokens`` is the planned D; the schedule ends exactly there."""

    n_tokens: int
    lr: float | None = None  # peak learning rate; None: DeepSeek LLM's rule for this compute
    min_lr_ratio: float = 0.1
    warmup_fraction: float = 0.05  # of steps, at most max_warmup_steps
    max_warmup_steps: int = 500
    warmup_steps: int | None = None  # absolute; overrides the fraction (WSD trunks and branches share it)
    schedule: str = "cosine"  # cosine | wsd | constant
    cooldown_fraction: float = 0.2
    cooldown_shape: str = "linear"
    batch_tokens: int | None = None  # global batch in tokens; None: DeepSeek LLM's rule
    micro_batch: int = 16  # sequences per forward pass per process (gradient accumulation covers the rest)
    # muon (Muon for the blocks' hidden matrices, AdamW for the rest) | adamw: muon by measurement (README, Optimizer)
    optimizer: str = "muon"
    muon_lr_scale: float = MUON_LR_SCALE  # Muon's learning rate (and decoupled weight decay) over the schedule's
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # steps; 0: about 10 evaluations per run
    eval_windows: int = 32
    final_eval_windows: int = 256
    ckpt_every: int = 0  # steps; 0: about 20 checkpoints per run
    log_every: int = 0  # steps; 0: about 200 log lines per run
    precision: str = "auto"  # auto | bf16 | fp32
    compile: str = "auto"  # auto | on | off; auto, on a CPU: the C training step or torch.compile where faster
    device: str = "auto"
    threads: int = 0  # CPU threads; 0: all cores while the machine is idle, fewer while other processes are busy
    save_at_steps: list[int] = field(default_factory=list)  # keep ckpt/step-K.pt when K steps are done
    branch_from: str | None = None  # a checkpoint to continue, optimizer and step included (a WSD branch)
    init_weights: str | None = None  # a run directory whose trained weights start this run (tuning)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen model (tuning)
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(BLOCK_PROJECTIONS))
    extra: dict = field(default_factory=dict)  # copied into final.json, e.g. a sweep run's budget
    log_to: str = "none"  # none | tensorboard | wandb: metrics mirrored there too (training/tracking.py)

    def check(self) -> None:
        """Every option in range, before anything is written or trained (one line naming the option)."""
        require(*((f"--{name.replace('_', '-')}", value, ok, rule) for name, value, ok, rule in (
            ("micro_batch", self.micro_batch, self.micro_batch >= 1, "at least 1"),
            ("lr", self.lr, self.lr is None or 0 < self.lr < 10, "a positive number below 10"),
            ("batch_tokens", self.batch_tokens, self.batch_tokens is None or self.batch_tokens >= 1, "at least 1"),
            ("schedule", self.schedule, self.schedule in ("cosine", "wsd", "constant"), "cosine, wsd or constant"),
            ("cooldown_fraction", self.cooldown_fraction, 0 < self.cooldown_fraction <= 1, "in (0, 1]"),
            ("cooldown_shape", self.cooldown_shape, self.cooldown_shape in ("linear", "1-sqrt"), "linear or 1-sqrt"),
            ("precision", self.precision, self.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
            ("compile", self.compile, self.compile in ("auto", "on", "off"), "auto, on or off"),
            ("device", self.device, self.device in ("auto", "cpu", "mps") or self.device.split(":")[0] == "cuda",
             "auto, cpu, cuda or mps"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "at least 0"),
            ("optimizer", self.optimizer, self.optimizer in ("adamw", "muon"), "adamw or muon"),
            ("muon_lr_scale", self.muon_lr_scale, 0 < self.muon_lr_scale <= 100, "in (0, 100]"),
            ("grad_clip", self.grad_clip, self.grad_clip >= 0, "at least 0 (0: off)"),
            ("eval_every", self.eval_every, self.eval_every >= 0, "at least 0 (0: automatic)"),
            ("ckpt_every", self.ckpt_every, self.ckpt_every >= 0, "at least 0 (0: automatic)"),
            ("threads", self.threads, self.threads >= 0, "at least 0 (0: adapt to the free cores)"),
        )))
        check_tracker(self.log_to)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        legacy = d.pop("init_from", None)  # runs written before the split: a directory was tuning's base
        if legacy:
            d.setdefault("init_weights" if Path(legacy).suffix != ".pt" else "branch_from", legacy)
        if isinstance(d.get("compile"), bool):  # runs written when --compile was a flag keep what they did
            d["compile"] = "on" if d["compile"] else "off"
        d.setdefault("optimizer", "adamw")  # runs written before Muon trained with AdamW
        d.setdefault("muon_lr_scale", 1.0)  # and Muon runs written before the scale at 1
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class Resolved:
    """What follows from a ModelConfig and a TrainConfig: the batch layout, steps, rate and FLOPs."""

    global_batch: int  # sequences per optimizer step, all processes together
    micro_batch: int  # sequences per forward pass per process
    grad_accum: int
    world_size: int
    tokens_per_step: int
    steps: int
    n_tokens: int  # steps * tokens_per_step: what the run really trains on
    lr: float
    warmup_steps: int
    flops_per_token: float
    flops: float
    eval_every: int
    ckpt_every: int
    log_every: int

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(model: Shape, train: TrainConfig, world: int = 1) -> Resolved:
    """Steps, batch layout, learning rate and FLOPs that follow from the configs (checked first)."""
    train.check()
    fpt = training_flops_per_token(model)
    auto_lr, auto_batch = default_lr_and_batch(fpt * train.n_tokens)
    global_batch = max(1, round((train.batch_tokens or auto_batch) / model.seq_len))
    accum = math.ceil(global_batch / (train.micro_batch * world))
    micro = math.ceil(global_batch / (accum * world))
    global_batch = micro * accum * world
    tokens_per_step = global_batch * model.seq_len
    if train.n_tokens < tokens_per_step:
        raise FlopwiseError(f"the token budget ({train.n_tokens:,}) is smaller than one batch ({tokens_per_step:,} "
                            "tokens): raise --tokens or lower --batch-tokens")
    steps = max(1, round(train.n_tokens / tokens_per_step))
    warmup = train.warmup_steps if train.warmup_steps is not None else \
        min(train.max_warmup_steps, max(1, round(train.warmup_fraction * steps)))
    return Resolved(global_batch=global_batch, micro_batch=micro, grad_accum=accum, world_size=world,
                    tokens_per_step=tokens_per_step, steps=steps, n_tokens=steps * tokens_per_step,
                    lr=train.lr or auto_lr, warmup_steps=warmup, flops_per_token=fpt,
                    flops=fpt * steps * tokens_per_step, eval_every=train.eval_every or max(1, steps // 10),
                    ckpt_every=train.ckpt_every or max(1, steps // 20),
                    log_every=train.log_every or max(1, steps // 200))


@dataclass
class TuneOptions:
    """How to tune; the CLI's defaults are these."""

    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(BLOCK_PROJECTIONS))
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs
    lr: float | None = None  # None: default_lr
    batch_size: int = 32  # examples per optimizer step
    micro_batch: int = 16
    seed: int = 0
    heldout_fraction: float = 0.05  # of --data, when no --eval-data is given
    log_to: str = "none"  # TrainConfig.log_to

    def check(self) -> None:
        """Every option in range, before any data is read or anything written (one line naming the option)."""
        require(
            ("--rank", self.lora_rank, self.lora_rank >= 0, "at least 1 (with --lora)"),
            ("--alpha", self.lora_alpha, self.lora_alpha > 0, "a positive number"),
            ("--epochs", self.epochs, 0 < self.epochs <= 1000, "a positive number of passes (at most 1000)"),
            ("--max-steps", self.max_steps, self.max_steps is None or self.max_steps >= 1, "at least 1"),
            ("--lr", self.lr, self.lr is None or 0 < self.lr < 10, "a positive number below 10"),
            ("--batch-size", self.batch_size, self.batch_size >= 1, "at least 1"),
            ("--micro-batch", self.micro_batch, self.micro_batch >= 1, "at least 1"),
            ("heldout_fraction", self.heldout_fraction, 0 < self.heldout_fraction < 0.5, "in (0, 0.5)"),
        )
        check_tracker(self.log_to)
        unknown = [t for t in self.lora_targets if t not in BLOCK_PROJECTIONS]
        if self.lora_rank and (unknown or not self.lora_targets):
            raise FlopwiseError(f"--targets {','.join(unknown) or '(none)'} unknown: choose from "
                                f"{','.join(BLOCK_PROJECTIONS)}")


# FLOPs: the autopilot took 10-11 min on a 2-core CPU when chosen, 4.5 min now; at twice this budget (1e14) its final
# model measured worse on the bundled sample (24 epochs of its 693K tokens against 20), so the time saved was not
# spent on a larger budget
DEFAULT_BUDGET = 5e13


@dataclass
class AutopilotConfig:
    budget_flops: float | None = DEFAULT_BUDGET  # None: the smallest budget whose sweep is informative
    min_steps: int = MIN_STEPS  # optimizer steps every sweep run gets at least
    sweep_fraction: float = 0.4
    n_budgets: int = 3
    n_sizes: int = 5
    spread: float = 4.0  # sizes span a factor spread^2 around the prior's N_opt (see design_sweep)
    budget_ratio: float = 2.5  # between consecutive sweep budgets
    vocab_size: int = 1024
    seq_len: int = 128
    workers: int = 0  # 0: one per core
    bootstrap: int = 1000
    seed: int = 0
    prior: str = DEFAULT_LAW  # the law that centres the sweep's sizes and backs the fallback fit
    compare: bool = False  # also train a 4x larger model with the final budget
    optimizer: str = "muon"  # of the sweep's runs and the final run (TrainConfig.optimizer)
    compare_optimizer: str | None = None  # also sweep with this optimizer and compare the two laws (extra FLOPs)
    resume: bool = False
    log_to: str = "none"  # every run's metrics mirrored there too (TrainConfig.log_to)

    def check(self) -> None:
        """Every option in range, before the corpus is read or anything written (one line naming the option)."""
        require(
            ("--sweep-fraction", self.sweep_fraction, 0 < self.sweep_fraction < 1, "between 0 and 1, e.g. 0.4"),
            ("--n-budgets", self.n_budgets, 2 <= self.n_budgets <= 10, "between 2 and 10 (3+ to check the fit on "
             "a held-out budget)"),
            ("--sizes", self.n_sizes, 3 <= self.n_sizes <= 25, "between 3 and 25 (a minimum needs 3 sizes)"),
            ("--vocab-size", self.vocab_size, 259 <= self.vocab_size <= 1 << 20, "between 259 and 1048576"),
            ("--seq-len", self.seq_len, 8 <= self.seq_len <= 1 << 16, "between 8 and 65536"),
            ("--workers", self.workers, self.workers >= 0, "at least 0 (0: one per core)"),
            ("--bootstrap", self.bootstrap, 0 <= self.bootstrap <= 100_000, "between 0 and 100000"),
            ("--min-steps", self.min_steps, 1 <= self.min_steps <= 1_000_000, "between 1 and 1000000"),
            ("--optimizer", self.optimizer, self.optimizer in ("adamw", "muon"), "adamw or muon"),
            ("--compare-optimizer", self.compare_optimizer,
             # resumed, the sweep's own optimizer counts (checked once it is read)
             self.compare_optimizer in (None, *({"adamw", "muon"} - (set() if self.resume else {self.optimizer}))),
             f"the other optimizer than --optimizer {self.optimizer}"),
        )
        check_tracker(self.log_to)


SWEEP_MICRO_BATCH = 16  # sequences per forward pass of a sweep run (the design picks batches this layout keeps)


def sweep_train_options(cfg: AutopilotConfig) -> dict:
    # one evaluation at the end on fixed windows shared by all runs, so their losses compare closely
    return {"eval_every": 10**9, "eval_windows": 8, "final_eval_windows": 256, "seed": cfg.seed,
            "micro_batch": SWEEP_MICRO_BATCH, "optimizer": cfg.optimizer, "muon_lr_scale": MUON_LR_SCALE,
            **({"log_to": cfg.log_to} if cfg.log_to != "none" else {})}


TRACKERS = ("none", "tensorboard", "wandb")
_TRACKER_NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # the module each one imports


def check_tracker(kind: str) -> None:
    """Refuse a --log-to that is unknown or not installed, before a run starts (training/tracking.py)."""
    if kind not in TRACKERS:
        raise FlopwiseError(f"--log-to must be {', '.join(TRACKERS)}, got {kind!r}")
    if kind in _TRACKER_NEEDS and importlib.util.find_spec(_TRACKER_NEEDS[kind]) is None:
        module = _TRACKER_NEEDS[kind]
        raise FlopwiseError(f"--log-to {kind} needs {module}, which is not installed: {install_hint(module)} "
                            "(or --log-to none)")
