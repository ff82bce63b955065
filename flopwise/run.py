"""The run directory: the one format every layer above reads and writes.

```
RUN/
  config.json       version, model shape, TrainConfig, the resolved step plan, the data's fingerprint (written first)
  instructions.npz  a tuning run's encoded examples (written before config.json)
  tokenizer.model   the SentencePiece model the run's tokens come from
  metrics.jsonl     one JSON object per logged step
  ckpt/latest.pt    model, optimizer, RNG and step, replaced atomically; ckpt/step-K.pt kept on request
  final.json        written last: a run with it is done, one without it resumes from ckpt/latest.pt
  .lock             held (flock) by the process training the run
```

Nothing here trains: the trainer, the inference engine, export, the sweep and the autopilot all
come here to read or create a run, so none of them imports another to do it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from flopwise import __version__
from flopwise.data.prepare import Corpus
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text
from flopwise.laws.flops import training_flops_per_token
from flopwise.laws.hyper import default_lr_and_batch
from flopwise.model.llama import Llama, ModelConfig
from flopwise.model.lora import TARGETS as LORA_TARGETS
from flopwise.model.lora import apply_lora, merge_lora

CONFIG_VERSION = 1
INSTRUCTIONS_FILE = "instructions.npz"  # a tuning run's data, inside the run


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
    compile: bool = False
    device: str = "auto"
    save_at_steps: list[int] = field(default_factory=list)  # keep ckpt/step-K.pt when K steps are done
    branch_from: str | None = None  # a checkpoint to continue, optimizer and step included (a WSD branch)
    init_weights: str | None = None  # a run directory whose trained weights start this run (tuning)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen model (tuning)
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    extra: dict = field(default_factory=dict)  # copied into final.json, e.g. a sweep run's budget

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        legacy = d.pop("init_from", None)  # runs written before the split: a directory was tuning's base
        if legacy:
            d.setdefault("init_weights" if Path(legacy).suffix != ".pt" else "branch_from", legacy)
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


def resolve(model: ModelConfig, train: TrainConfig, world: int = 1) -> Resolved:
    """Steps, batch layout, learning rate and FLOPs that follow from the configs."""
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


# ---- config.json ----

def check_new(run_dir: Path, resume_hint: str) -> None:
    if (run_dir / "config.json").exists():
        raise FlopwiseError(f"{run_dir} already holds a run: resume it with {resume_hint}, or choose another --out")


def write_config(run_dir: Path, model: ModelConfig, train: TrainConfig, data: dict, **extra) -> dict:
    """config.json, atomically; the last file of a new run's set-up, so its presence means the run exists."""
    config = {"version": CONFIG_VERSION, "flopwise_version": __version__, "model": model.to_dict(),
              "train": asdict(train), "resolved": resolve(model, train).to_dict(), "data": data, **extra}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return config


def new_run(run_dir: str | Path, model: ModelConfig, train: TrainConfig, corpus: Corpus) -> Path:
    """Create a pre-training run directory on a prepared corpus (nothing is written if the configs are invalid)."""
    run_dir = Path(run_dir)
    check_new(run_dir, f"'flopwise train {run_dir}'")
    if model.vocab_size != corpus.vocab_size:
        raise FlopwiseError(f"the model's vocab_size {model.vocab_size} differs from the corpus' {corpus.vocab_size}")
    resolve(model, train)  # validates the budget before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(corpus.tokenizer_path, run_dir / "tokenizer.model")
    write_config(run_dir, model, train, {"path": str(corpus.path.resolve()), "hash": corpus.meta["hash"],
                                         "n_tokens_train": corpus.meta["n_tokens_train"],
                                         "n_tokens_val": corpus.meta["n_tokens_val"]})
    return run_dir


def read_run_config(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig, dict]:
    run_dir = Path(run_dir)
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise FlopwiseError(f"{run_dir} is not a run directory (no readable config.json)") from None
    if config.get("version") != CONFIG_VERSION:
        raise FlopwiseError(f"{run_dir} was written by another flopwise version (config version "
                            f"{config.get('version')}, this one reads {CONFIG_VERSION})")
    return ModelConfig.from_dict(config["model"]), TrainConfig.from_dict(config["train"]), config


def is_tuning(config: dict) -> bool:
    """Whether a run's config.json describes an instruction-tuning run (its data is instructions.npz)."""
    return config.get("data", {}).get("kind") == "instructions"


# ---- checkpoints, metrics, final.json ----

def save_checkpoint(path: Path, model: torch.nn.Module, optimizer, step: int, wall_seconds: float) -> None:
    """Atomically write the state needed to continue at ``step``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"version": CONFIG_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "wall_seconds": wall_seconds, "torch_rng": torch.get_rng_state()}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a checkpoint is only ever replaced atomically, so this is real damage
        raise FlopwiseError(f"checkpoint {path} cannot be read ({type(e).__name__}): "
                            "delete it to restart the run") from None


def latest_checkpoint(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ckpt" / "latest.pt"


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> Llama:
    """The trained (or latest checkpointed) model of a run directory, LoRA adapters merged."""
    run_dir = Path(run_dir)
    mc, tc, _ = read_run_config(run_dir)
    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    if ckpt is None:
        raise FlopwiseError(f"{run_dir} has no checkpoint yet: train it first")
    model = Llama(mc)
    if tc.lora_rank:  # a LoRA run's checkpoint holds adapters: load them, then fold them into the weights
        apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
    model.load_state_dict(ckpt["model"])
    if tc.lora_rank:
        merge_lora(model)
    return model.to(device).eval()


def read_metrics(run_dir: Path, before_step: int) -> list[str]:
    """metrics.jsonl lines of steps before ``before_step`` (drops a torn last line)."""
    path = run_dir / "metrics.jsonl"
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < before_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return keep


def read_final(run_dir: str | Path) -> dict | None:
    """final.json of a finished run, None while it is not finished."""
    path = Path(run_dir) / "final.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_final(run_dir: Path, final: dict) -> None:
    atomic_write_text(run_dir / "final.json", json.dumps(final, indent=2) + "\n")


# ---- locks ----

@contextlib.contextmanager
def run_lock(run_dir: Path, rank: int = 0):
    """Hold an exclusive lock on a run while training it; released by the OS if the process dies."""
    if rank != 0:
        yield
        return
    fh = open(run_dir / ".lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise FlopwiseError(f"{run_dir} is being trained by another process: wait for it or stop it") from None
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def run_is_locked(run_dir: str | Path) -> bool:
    path = Path(run_dir) / ".lock"
    if not path.exists():
        return False
    with open(path, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False
