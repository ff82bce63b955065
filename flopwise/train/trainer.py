"""The training engine: one run directory in, a trained model and final.json out.

Run directory (DESIGN.md): config.json (written first), metrics.jsonl, ckpt/latest.pt (atomic),
final.json (written last), tokenizer.model. A run without final.json resumes from its
checkpoint and, because batches are a function of (seed, step), continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from flopwise import __version__
from flopwise.data.prepare import Corpus, open_corpus
from flopwise.data.tokenizer import token_byte_lengths
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text
from flopwise.laws.flops import n_params_non_embedding, n_params_total, training_flops_per_token
from flopwise.model.llama import Llama, ModelConfig
from flopwise.model.lora import TARGETS as LORA_TARGETS
from flopwise.train import distributed as dist
from flopwise.train.batches import Batches, eval_windows
from flopwise.train.schedule import default_lr_and_batch, lr_at

CONFIG_VERSION = 1


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
    init_from: str | None = None  # a checkpoint to continue (a WSD branch), or a run directory's weights (tuning)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank on a frozen model (tuning)
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    extra: dict = field(default_factory=dict)  # e.g. budget_flops from a sweep

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    if name not in ("bf16", "fp32"):
        raise FlopwiseError(f"--precision must be auto, bf16 or fp32, got {name!r}")
    return name


def resolve(model: ModelConfig, train: TrainConfig, world: int = 1) -> dict:
    """Steps, batch layout, learning rate and FLOPs that follow from the configs."""
    fpt = training_flops_per_token(model)
    planned_flops = fpt * train.n_tokens
    auto_lr, auto_batch = default_lr_and_batch(planned_flops)
    batch_tokens = train.batch_tokens or auto_batch
    global_batch = max(1, round(batch_tokens / model.seq_len))
    accum = math.ceil(global_batch / (train.micro_batch * world))
    micro = math.ceil(global_batch / (accum * world))
    global_batch = micro * accum * world
    tokens_per_step = global_batch * model.seq_len
    if train.n_tokens < tokens_per_step:
        raise FlopwiseError(f"the token budget ({train.n_tokens:,}) is smaller than one batch ({tokens_per_step:,} "
                            "tokens): raise --tokens or lower --batch-tokens")
    steps = max(1, round(train.n_tokens / tokens_per_step))
    return {"global_batch": global_batch, "micro_batch": micro, "grad_accum": accum, "world_size": world,
            "tokens_per_step": tokens_per_step, "steps": steps, "n_tokens": steps * tokens_per_step,
            "lr": train.lr or auto_lr,
            "warmup_steps": train.warmup_steps if train.warmup_steps is not None else
            min(train.max_warmup_steps, max(1, round(train.warmup_fraction * steps))),
            "flops_per_token": fpt, "flops": fpt * steps * tokens_per_step,
            "eval_every": train.eval_every or max(1, steps // 10),
            "ckpt_every": train.ckpt_every or max(1, steps // 20),
            "log_every": train.log_every or max(1, steps // 200)}


def make_optimizer(model: torch.nn.Module, train: TrainConfig, lr: float, device: torch.device):
    """AdamW over the trainable parameters; weight decay on matrices only (not norm gains); fused kernels where
    available."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": train.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = dict(lr=lr, betas=(train.beta1, train.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def measured_peak(device: torch.device, precision: str) -> float:
    """This device's matmul peak from ``flopwise hw probe``, measured now (quickly) if never measured."""
    from flopwise.train.probe import load_probe, probe, save_probe

    p = load_probe()
    if not p or p.get("device_type") != device.type:
        p = probe(str(device), size=1024 if device.type == "cpu" else 4096, repeats=3)
        save_probe(p)
    return float(p["bf16_flops" if precision == "bf16" else "fp32_flops"])


@torch.no_grad()
def evaluate(model: Llama, windows: np.ndarray, micro_batch: int, precision: str, device: torch.device,
             byte_lengths: np.ndarray | None = None, masks: np.ndarray | None = None) -> tuple[float, float | None]:
    """Mean loss (nats/token) over ``windows`` and bits per byte (when byte lengths are given).

    With ``masks`` (n, seq_len) only the targets marked 1 count (the responses of instruction data).
    """
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for i in range(0, len(windows), micro_batch):
        rows = torch.from_numpy(windows[i:i + micro_batch]).to(device)
        x, y = rows[:, :-1], rows[:, 1:]
        m = None if masks is None else torch.from_numpy(masks[i:i + micro_batch]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x, y, loss_mask=m)
        n = y.numel() if m is None else int(m.sum())
        total_nats += float(loss) * n
        total_tokens += n
        if byte_lengths is not None:
            lengths = byte_lengths[y.cpu().numpy()]
            total_bytes += int(lengths.sum() if m is None else lengths[m.cpu().numpy() > 0].sum())
    model.train(was_training)
    loss = total_nats / max(total_tokens, 1)
    bpb = total_nats / math.log(2) / total_bytes if total_bytes else None
    return loss, bpb


def _read_metrics(path: Path, before_step: int) -> list[str]:
    """metrics.jsonl lines of steps before ``before_step`` (drops a torn last line)."""
    keep = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] < before_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return keep


def save_checkpoint(path: Path, model: Llama, optimizer, step: int, wall_seconds: float) -> None:
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


def new_run(run_dir: str | Path, model: ModelConfig, train: TrainConfig, corpus: Corpus) -> Path:
    """Create a run directory: config.json first, then the tokenizer."""
    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists():
        raise FlopwiseError(f"{run_dir} already holds a run: resume it with 'flopwise train {run_dir}' "
                            "or choose another --out")
    if model.vocab_size != corpus.vocab_size:
        raise FlopwiseError(f"the model's vocab_size {model.vocab_size} differs from the corpus' {corpus.vocab_size}")
    resolved = resolve(model, train)  # validates the budget before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"version": CONFIG_VERSION, "flopwise_version": __version__, "model": model.to_dict(),
              "train": asdict(train), "resolved": resolved,
              "data": {"path": str(corpus.path.resolve()), "hash": corpus.meta["hash"],
                       "n_tokens_train": corpus.meta["n_tokens_train"], "n_tokens_val": corpus.meta["n_tokens_val"]}}
    atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
    shutil.copyfile(corpus.tokenizer_path, run_dir / "tokenizer.model")
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


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> Llama:
    """The trained (or latest checkpointed) model of a run directory."""
    run_dir = Path(run_dir)
    mc, tc, _ = read_run_config(run_dir)
    ckpt = load_checkpoint(run_dir / "ckpt" / "latest.pt")
    if ckpt is None:
        raise FlopwiseError(f"{run_dir} has no checkpoint yet: train it first")
    model = Llama(mc)
    if tc.lora_rank:  # a LoRA run's checkpoint holds adapters: load them, then fold them into the weights
        from flopwise.model.lora import apply_lora, merge_lora

        apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
        model.load_state_dict(ckpt["model"])
        merge_lora(model)
    else:
        model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


@contextlib.contextmanager
def run_lock(run_dir: Path, rank: int = 0):
    """Hold an exclusive lock on a run while training it; released by the OS if the process dies."""
    if rank != 0:
        yield
        return
    import fcntl

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
    import fcntl

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


def train(run_dir: str | Path, quiet: bool = False, log=print) -> dict:
    """Train (or resume) the run in ``run_dir``; returns final.json's content."""
    run_dir = Path(run_dir)
    if (run_dir / "final.json").exists():
        return json.loads((run_dir / "final.json").read_text())
    rank = int(os.environ.get("RANK", "0"))
    with run_lock(run_dir, rank):
        return _train(run_dir, quiet, log)


@dataclass
class TrainingData:
    """What the loop needs of its data: batches by (seed, step), evaluation sets, bytes per token."""

    batches: object  # (global_batch, seed) -> an object with .get(step, lo, hi, device) -> (x, y[, loss mask])
    val: tuple[np.ndarray, np.ndarray | None]  # windows of seq_len + 1 tokens, target masks or None
    val_final: tuple[np.ndarray, np.ndarray | None]
    byte_lengths: np.ndarray
    n_tokens_train: int


def _training_data(run_dir: Path, config: dict, mc: ModelConfig, tc: TrainConfig) -> TrainingData:
    if config["data"].get("kind") == "instructions":
        from flopwise.train.tune import instruction_training_data

        return instruction_training_data(run_dir, config, mc)
    corpus = open_corpus(config["data"]["path"])
    if corpus.meta["hash"] != config["data"]["hash"]:
        raise FlopwiseError(f"the prepared corpus at {corpus.path} changed since this run started: "
                            "re-prepare the original data or start a new run")
    tokens = corpus.tokens("train")
    return TrainingData(
        batches=lambda global_batch, seed: Batches(tokens, mc.seq_len, global_batch, seed),
        val=(eval_windows(corpus.tokens("val"), mc.seq_len, tc.eval_windows), None),
        val_final=(eval_windows(corpus.tokens("val"), mc.seq_len, tc.final_eval_windows), None),
        byte_lengths=np.array(token_byte_lengths(corpus.tokenizer())), n_tokens_train=corpus.meta["n_tokens_train"])


def _train(run_dir: Path, quiet: bool, log) -> dict:
    mc, tc, config = read_run_config(run_dir)
    data = _training_data(run_dir, config, mc, tc)  # checks the data before anything starts
    rank, world = dist.setup()
    device = pick_device(tc.device) if world == 1 else dist.device_for(rank, tc.device)
    precision = pick_precision(tc.precision, device)
    r = resolve(mc, tc, world)
    recorded = config["resolved"]
    if (r["global_batch"], r["steps"]) != (recorded["global_batch"], recorded["steps"]):
        raise FlopwiseError(f"{run_dir}: with {world} process(es) the global batch would be {r['global_batch']} "
                            f"sequences, not the recorded {recorded['global_batch']}: choose --batch-tokens "
                            "divisible by the number of processes")

    torch.manual_seed(tc.seed)
    model = Llama(mc)
    ckpt = load_checkpoint(run_dir / "ckpt" / "latest.pt")
    start_step, wall_before = 0, 0.0
    init_dir = tc.init_from is not None and Path(tc.init_from).is_dir()
    if ckpt is None and init_dir:  # tuning: the base run's weights, a fresh optimizer
        model.load_state_dict(load_model(tc.init_from).state_dict())
    if tc.lora_rank:
        from flopwise.model.lora import apply_lora

        apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
    model = model.to(device)
    optimizer = make_optimizer(model, tc, r["lr"], device)
    if ckpt is None and tc.init_from and not init_dir:
        ckpt = load_checkpoint(Path(tc.init_from))
        if ckpt is None:
            raise FlopwiseError(f"{run_dir} starts from {tc.init_from}, which does not exist: train its trunk first")
        ckpt = {**ckpt, "wall_seconds": 0.0}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_step, wall_before = ckpt["step"], ckpt["wall_seconds"]
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0:
        atomic_write_text(metrics_path, "".join(line + "\n" for line in _read_metrics(metrics_path, start_step)))
    dist.barrier()
    net = dist.wrap(model, device) if world > 1 else model
    if tc.compile:
        net = torch.compile(net)

    batches = data.batches(r["global_batch"], tc.seed)
    val, val_mask = data.val
    val_final, val_final_mask = data.val_final
    byte_lengths = data.byte_lengths
    peak = measured_peak(device, precision) * world
    n_train = data.n_tokens_train
    epochs = r["n_tokens"] / n_train
    if rank == 0 and not quiet:
        est = r["flops"] / (peak * 0.5)
        log(f"training {n_params_total(mc):,} params on {r['n_tokens']:,} tokens ({epochs:.2f} epochs of "
            f"{n_train:,}), {r['flops']:.3g} FLOPs, {r['steps']} steps of {r['tokens_per_step']:,} tokens, "
            f"lr {r['lr']:.2g}, {precision} on {device.type}{f' x{world}' if world > 1 else ''}; "
            f"about {_fmt_seconds(est)}" + (f"; resuming at step {start_step}" if start_step else ""))
    if epochs > 1 and rank == 0 and not quiet:
        log(f"note: the run repeats its {n_train:,} training tokens {epochs:.1f} times")

    lo = rank * r["micro_batch"] * r["grad_accum"]
    progress = _progress(quiet or rank != 0, r["steps"], start_step)
    t_start = time.perf_counter()
    t_log, tokens_log = t_start, 0
    metrics = open(metrics_path, "a") if rank == 0 else None
    # a run resumed from its final checkpoint (killed before final.json) trains no step: keep its last loss
    kept = _read_metrics(metrics_path, start_step)
    loss_sum = json.loads(kept[-1])["loss"] if kept else float("nan")
    final_eval = None
    try:
        for step in range(start_step, r["steps"]):
            lr = lr_at(step, r["steps"], r["lr"], r["warmup_steps"], tc.min_lr_ratio, tc.schedule,
                       tc.cooldown_fraction, tc.cooldown_shape)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            try:
                for micro in range(r["grad_accum"]):
                    a = lo + micro * r["micro_batch"]
                    x, y, *m = batches.get(step, a, a + r["micro_batch"], device)  # m: loss mask (tuning)
                    with dist.no_sync(net, micro < r["grad_accum"] - 1), \
                            torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        loss = net(x, y, loss_mask=m[0] if m else None) / r["grad_accum"]
                    loss.backward()
                    loss_sum += float(loss.detach())
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e).lower():
                    raise
                raise FlopwiseError(f"a micro-batch of {r['micro_batch']} sequences of {mc.seq_len} tokens does not "
                                    f"fit in memory: lower --micro-batch (gradient accumulation keeps the global "
                                    f"batch of {r['global_batch']})") from None
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = dist.mean(loss_sum, device)
            tokens_log += r["tokens_per_step"]
            last = step == r["steps"] - 1
            evaluate_now = (step + 1) % r["eval_every"] == 0 or last
            val_loss = None
            if last:  # the final evaluation, once, on the larger window set
                final_eval = evaluate(model, val_final, r["micro_batch"], precision, device, byte_lengths,
                                      val_final_mask)
                val_loss = final_eval[0]
            elif evaluate_now:
                val_loss = evaluate(model, val, r["micro_batch"], precision, device, masks=val_mask)[0]
            if rank == 0 and ((step + 1) % r["log_every"] == 0 or evaluate_now):
                now = time.perf_counter()
                tok_s = tokens_log / max(now - t_log, 1e-9)
                t_log, tokens_log = now, 0
                rec = {"step": step, "tokens": (step + 1) * r["tokens_per_step"],
                       "flops": (step + 1) * r["tokens_per_step"] * r["flops_per_token"], "lr": lr,
                       "loss": loss_sum, "tok_per_s": tok_s, "mfu": tok_s * r["flops_per_token"] / peak}
                if val_loss is not None:
                    rec["val_loss"] = val_loss
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
                progress.update(step + 1, loss_sum, tok_s, rec["mfu"], val_loss)
            if rank == 0 and step + 1 in tc.save_at_steps:
                save_checkpoint(run_dir / "ckpt" / f"step-{step + 1}.pt", model, optimizer, step + 1,
                                wall_before + time.perf_counter() - t_start)
            if rank == 0 and ((step + 1) % r["ckpt_every"] == 0 or last):
                save_checkpoint(run_dir / "ckpt" / "latest.pt", model, optimizer, step + 1,
                                wall_before + time.perf_counter() - t_start)
            if (step + 1) % r["ckpt_every"] == 0:
                dist.barrier()
    finally:
        progress.close()
        if metrics:
            metrics.close()
    wall = wall_before + time.perf_counter() - t_start
    if final_eval is None:
        final_eval = evaluate(model, val_final, r["micro_batch"], precision, device, byte_lengths, val_final_mask)
    val_loss, val_bpb = final_eval
    final = {"val_loss": val_loss, "val_bpb": val_bpb, "train_loss": loss_sum, "n_params": n_params_total(mc),
             "n_params_non_embedding": n_params_non_embedding(mc), "n_tokens": r["n_tokens"], "flops": r["flops"],
             "flops_6nd": 6.0 * n_params_total(mc) * r["n_tokens"], "epochs": epochs, "steps": r["steps"],
             "wall_seconds": wall, "tokens_per_s": r["n_tokens"] / wall if wall > 0 else None,
             "mfu": r["flops"] / wall / peak if wall > 0 else None, "precision": precision, "device": device.type,
             "world_size": world,
             "val_tokens": int(val_final[:, 1:].size if val_final_mask is None else val_final_mask.sum()), **tc.extra}
    if rank == 0:
        atomic_write_text(run_dir / "final.json", json.dumps(final, indent=2) + "\n")
    dist.barrier()
    dist.teardown()
    return final


def _fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class _progress:
    """A rich progress bar with tokens/s, ETA, loss and MFU (nothing when quiet)."""

    def __init__(self, quiet: bool, total: int, done: int):
        self.bar = None
        if quiet:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            TextColumn("{task.fields[info]}"), transient=False)
        self.task = self.bar.add_task("train", total=total, completed=done, info="")
        self.bar.start()

    def update(self, done: int, loss: float, tok_s: float, mfu: float, val_loss: float | None) -> None:
        if self.bar is not None:
            info = f"loss {loss:.3f}" + (f" val {val_loss:.3f}" if val_loss is not None else "")
            self.bar.update(self.task, completed=done, info=f"{info}  {tok_s:,.0f} tok/s  MFU {mfu:.0%}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
