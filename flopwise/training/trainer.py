"""The training engine: one run directory in, a trained model and final.json out.

A run without final.json resumes from its checkpoint and, because batches are a function of
(seed, step), continues exactly as the uninterrupted run would have. The run directory's format
lives in ``flopwise.run``; this module only trains. One run is four steps: ``_restore`` (model,
optimizer and step from a checkpoint, a trunk or a base run), ``_step`` (one optimizer step over
the micro-batches), ``_evaluate`` (on the schedule, the last one on the larger window set) and
``_finish`` (final.json).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flopwise.cbuild import NativeUnavailable
from flopwise.config import Resolved, TrainConfig, resolve
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text
from flopwise.laws.flops import BLOCK_PROJECTIONS, flops_6nd, n_params_non_embedding, n_params_total
from flopwise.model.compiling import use_compile_cache
from flopwise.model.llama import Llama
from flopwise.model.lora import apply_lora
from flopwise.progress import Bar
from flopwise.run import (
    latest_checkpoint,
    load_checkpoint,
    load_model,
    read_final,
    read_metrics,
    read_run_config,
    read_speed,
    run_lock,
    save_checkpoint,
    write_final,
    write_speed,
)
from flopwise.training import distributed as dist
from flopwise.training.batches import TrainingData, training_data
from flopwise.training.compile_choice import choose_compile, compile_key, compiled_seconds, recorded_compiled_rate
from flopwise.training.malloc import keep_freed_memory
from flopwise.training.native import NativeTrainStep, NativeUpdate
from flopwise.training.probe import (
    C_STEP_ETA_OVERHEAD,
    ETA_OVERHEAD,
    CpuShare,
    c_step_passes,
    faster_kernel,
    measured_peak,
    native_rate,
    pick_device,
    pick_precision,
    requested_threads,
    training_rate,
)
from flopwise.training.registry import compiled_before, remember_compiled
from flopwise.training.schedule import lr_at
from flopwise.training.tracking import Tracker, open_tracker

# Testing hook: the process kills itself (SIGKILL, as `kill -9`) once this many steps are done and logged,
# so resume tests interrupt a run at a known step instead of racing it.
KILL_AT_STEP_ENV = "FLOPWISE_KILL_AT_STEP"


OPTIMIZERS = ("adamw", "muon")


def param_groups(model: torch.nn.Module, optimizer: str) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The trainable parameters by who updates them: ``muon`` gets the blocks' 2-D projection matrices (hidden
    layers: Muon orthogonalises matrix updates, which embeddings, the head and gains are not); ``adamw_decay``
    the other matrices (embedding, head; LoRA adapters); ``adamw`` the norm gains (no weight decay). With
    ``optimizer="adamw"`` nothing goes to Muon."""
    groups: dict[str, list] = {"muon": [], "adamw_decay": [], "adamw": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden = (p.dim() == 2 and name.startswith("layers.") and name.endswith(".weight")
                  and name.rsplit(".", 2)[-2] in BLOCK_PROJECTIONS)
        groups["muon" if optimizer == "muon" and hidden else "adamw_decay" if p.dim() >= 2 else "adamw"].append(
            (name, p))
    return groups


class Optimizers:
    """Several optimizers stepped as one (Muon for hidden matrices beside AdamW for the rest): the trainer sets
    learning rates through ``param_groups`` and saves ``state_dict`` in checkpoints, as with one optimizer."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if "param_groups" in state:  # a checkpoint written before runs could use Muon: one AdamW
            state = {"adamw": state}
        if set(state) != set(self.optimizers):
            raise FlopwiseError(f"the checkpoint holds the state of {' and '.join(sorted(state))}, not of "
                                f"{' and '.join(sorted(self.optimizers))}: train it with the optimizer it started with")
        for name, o in self.optimizers.items():
            o.load_state_dict(state[name])


def make_optimizer(model: torch.nn.Module, train: TrainConfig, lr: float) -> Optimizers:
    """AdamW over the trainable parameters (weight decay on matrices only, not norm gains; fused kernels where
    available), with ``train.optimizer == "muon"`` Muon for the blocks' hidden matrices instead.

    Muon (torch.optim.Muon's update with its Newton-Schulz iterations batched across same-shape matrices,
    ``training/muon.py``: Newton-Schulz orthogonalised Nesterov momentum, Jordan et al. 2024) runs with
    ``adjust_lr_fn="match_rms_adamw"``: each matrix's learning rate is multiplied by 0.2 sqrt(max(rows, cols)), so
    its update has an RMS of about 0.2 like AdamW's, the scaling Moonshot's "Muon is Scalable" (Liu et al. 2025)
    derive so that AdamW's learning rate and weight decay carry over, width included. Both optimizers follow the
    schedule's one learning rate, Muon's times ``train.muon_lr_scale`` (the group's ``lr_scale``; its decoupled weight
    decay, lr x decay, scales with it). Newton-Schulz's FLOPs (about 5 d / tokens-per-step of a d x d matrix's
    training FLOPs) are not in a run's FLOP count, which follows the model (C = 6ND)."""
    g = param_groups(model, train.optimizer)
    adamw = [grp for grp in ({"params": [p for _, p in g["adamw_decay"]], "weight_decay": train.weight_decay},
                             {"params": [p for _, p in g["adamw"]], "weight_decay": 0.0}) if grp["params"]]
    kwargs = dict(lr=lr, betas=(train.beta1, train.beta2), eps=1e-8)
    try:
        out = {"adamw": torch.optim.AdamW(adamw, fused=True, **kwargs)}
    except (RuntimeError, TypeError):
        out = {"adamw": torch.optim.AdamW(adamw, **kwargs)}
    if g["muon"]:
        if not hasattr(torch.optim, "Muon"):
            raise FlopwiseError(f"--optimizer muon needs torch.optim.Muon (torch 2.9 or later); this is torch "
                                f"{torch.__version__}: upgrade torch or use --optimizer adamw")
        from flopwise.training.muon import BatchedMuon  # here: it subclasses torch.optim.Muon (torch >= 2.9)

        out["muon"] = BatchedMuon([p for _, p in g["muon"]], lr=lr, weight_decay=train.weight_decay,
                                  momentum=MUON_MOMENTUM, nesterov=True, adjust_lr_fn="match_rms_adamw")
        for grp in out["muon"].param_groups:  # kept in the checkpoint: a resumed run keeps its scale
            grp["lr_scale"] = train.muon_lr_scale
    return Optimizers(out)


MUON_MOMENTUM = 0.95  # Jordan et al.'s and Moonshot's value (torch's default)


@torch.no_grad()
def evaluate(model: Llama, windows: np.ndarray, micro_batch: int, precision: str, device: torch.device,
             byte_lengths: np.ndarray | None = None, masks: np.ndarray | None = None,
             native: NativeTrainStep | None = None) -> tuple[float, float | None]:
    """Mean loss (nats/token) over ``windows`` and bits per byte (when byte lengths are given).

    With ``masks`` (n, seq_len) only the targets marked 1 count (the responses of instruction data). With
    ``native`` (the C step bound to ``model``) unmasked windows run through its forward: 1.4-5.6x PyTorch's speed
    at a sweep's sizes, in the step's precision (bf16 products with fp32 outputs, where autocast rounds outputs too,
    and attention's products in bf16, where PyTorch keeps them fp32 on a CPU: on the bundled sweep's 14 trained
    models within 1.6e-4 nats of PyTorch's bf16 loss and 3.7e-4 of fp32's).
    """
    was_training = model.training
    model.eval()
    total_nats, total_tokens, total_bytes = 0.0, 0, 0
    for i in range(0, len(windows), micro_batch):
        rows = torch.from_numpy(windows[i:i + micro_batch]).to(device)
        x, y = rows[:, :-1], rows[:, 1:]
        m = None if masks is None else torch.from_numpy(masks[i:i + micro_batch]).to(device)
        if native is not None and m is None:
            loss = native.loss(x, y)
        else:
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


def train(run_dir: str | Path, quiet: bool = False, log=print) -> dict:
    """Train (or resume) the run in ``run_dir``; returns final.json's content. Sets glibc's allocator for the whole
    process, for good (``training/malloc.py``): the process keeps memory it has freed."""
    run_dir = Path(run_dir)
    done = read_final(run_dir)
    if done is not None:
        return done
    keep_freed_memory()  # every step frees what the next allocates: no page faults for it (training/malloc.py)
    rank = int(os.environ.get("RANK", "0"))
    with run_lock(run_dir, rank):
        run = _Run(run_dir, quiet, log)
        try:
            return run.train()
        finally:
            run.cpu.close()  # the next run in this process starts from the thread count this one found


@dataclass
class _State:
    model: Llama
    optimizer: torch.optim.Optimizer
    step: int  # optimizer steps done
    wall_before: float  # seconds spent before this process (a resumed run)


class _Run:
    """One training run in this process: configs, data, device and the loop's steps."""

    def __init__(self, run_dir: Path, quiet: bool, log):
        self.run_dir, self.log = run_dir, log
        self.mc, self.tc, config = read_run_config(run_dir)
        self.config = config
        self.rank, self.world = dist.setup()
        self.device = pick_device(self.tc.device) if self.world == 1 else dist.device_for(self.rank, self.tc.device)
        self.r: Resolved = resolve(self.mc, self.tc, self.world)
        recorded = config["resolved"]
        if (self.r.global_batch, self.r.steps) != (recorded["global_batch"], recorded["steps"]):
            raise FlopwiseError(f"{run_dir}: with {self.world} process(es) the global batch would be "
                                f"{self.r.global_batch} sequences, not the recorded {recorded['global_batch']}: "
                                "choose --batch-tokens divisible by the number of processes")
        self.data: TrainingData = training_data(run_dir, config, self.mc, self.tc, self.r.global_batch)
        self.quiet = quiet or self.rank != 0
        fixed = requested_threads(0) or self.tc.threads  # --threads / $FLOPWISE_THREADS now, else the run's own
        self.cpu = CpuShare(fixed or torch.get_num_threads(), adapt=not fixed and self.device.type == "cpu")
        self.eager_rate: float | None = None  # measured training FLOP/s uncompiled (CPU): PyTorch's, or the C step's
        self.kernel = "torch"  # until chosen: _eager_rate reads it while _speed measures
        self.passes = 0  # the C step's sequences a pass (measured with the kernel, kept in speed.json)
        self.precision, self.compiled, self.kernel = self._speed()
        self.c_step: NativeTrainStep | None = None  # bound to the model in train()
        self.c_update: NativeUpdate | None = None  # with the C step: clipping and the optimizers' step
        self.peak = measured_peak(self.device, self.precision) * self.world

    def train(self) -> dict:
        s = self._restore()
        eager = dist.wrap(s.model, self.device) if self.world > 1 else s.model
        net = eager
        if self.compiled:
            use_compile_cache()
            net = torch.compile(eager)
        if self.kernel == "c":
            self._bind_c_step(s)
        self._announce(s.step, s.model)
        metrics_path = self.run_dir / "metrics.jsonl"
        kept = read_metrics(self.run_dir, s.step)
        if self.rank == 0:
            atomic_write_text(metrics_path, "".join(line + "\n" for line in kept))
        dist.barrier()
        # a run resumed from its final checkpoint (killed before final.json) trains no step: keep its last loss
        train_loss = json.loads(kept[-1])["loss"] if kept else float("nan")
        kill_at = int(os.environ.get(KILL_AT_STEP_ENV) or 0)
        progress = Bar("train", self.r.steps, s.step, quiet=self.quiet)
        t_start, first_step = time.perf_counter(), s.step
        t_log, tokens_log = t_start, 0
        final_eval = None
        metrics = open(metrics_path, "a") if self.rank == 0 else None
        tracker, final = Tracker(), None
        try:
            if self.rank == 0:
                tracker = open_tracker(self.tc.log_to, self.run_dir, self.config, s.step)
            for step in range(s.step, self.r.steps):
                self.cpu.update()
                lr = lr_at(step, self.r.steps, self.r.lr, self.r.warmup_steps, self.tc.min_lr_ratio,
                           self.tc.schedule, self.tc.cooldown_fraction, self.tc.cooldown_shape)
                if net is not eager and step == s.step:  # the first step compiles: fall back to eager if it fails
                    net, train_loss = self._first_compiled_step(net, eager, s, step, lr)
                else:
                    train_loss = self._step(net, s, step, lr)
                tokens_log += self.r.tokens_per_step
                last = step == self.r.steps - 1
                val_loss = None
                if last:  # the final evaluation, once, on the larger window set
                    final_eval = self._evaluate(s.model, final=True)
                    val_loss = final_eval[0]
                elif (step + 1) % self.r.eval_every == 0:
                    val_loss = self._evaluate(s.model, final=False)[0]
                if self.rank == 0 and ((step + 1) % self.r.log_every == 0 or val_loss is not None):
                    now = time.perf_counter()
                    tok_s = tokens_log / max(now - t_log, 1e-9)
                    t_log, tokens_log = now, 0
                    rec = {"step": step, "time": time.time(), "tokens": (step + 1) * self.r.tokens_per_step,
                           "flops": (step + 1) * self.r.tokens_per_step * self.r.flops_per_token, "lr": lr,
                           "loss": train_loss, "tok_per_s": tok_s, "mfu": tok_s * self.r.flops_per_token / self.peak,
                           "threads": self.cpu.threads}
                    if val_loss is not None:
                        rec["val_loss"] = val_loss
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    tracker.log(rec)
                    # the bar shows the average since this start (steady, and what final.json will say), the
                    # metrics each interval's rate
                    avg = (step + 1 - first_step) * self.r.tokens_per_step / max(now - t_start, 1e-9)
                    progress.update(step + 1, f"step {step + 1}/{self.r.steps}  loss {train_loss:.3f}"
                                    + (f" val {val_loss:.3f}" if val_loss is not None else "")
                                    + f"  {avg:,.0f} tok/s  MFU {avg * self.r.flops_per_token / self.peak:.0%}")
                self._checkpoint(s, step + 1, last, time.perf_counter() - t_start)
                if step + 1 == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            if final_eval is None:
                final_eval = self._evaluate(s.model, final=True)
            final = self._finish(final_eval, train_loss, s.wall_before + time.perf_counter() - t_start)
            return final
        finally:
            progress.close()
            if metrics:
                metrics.close()
            tracker.finish(final)

    def _speed(self) -> tuple[str, bool, str]:
        """(precision, compiled, kernel): as asked, else chosen at the run's first start (measured) and kept on
        resume."""
        tc = self.tc
        own = read_speed(self.run_dir)
        chosen = own
        if chosen is None and tc.branch_from:  # a WSD branch continues its trunk exactly: same precision and graphs
            chosen = read_speed(Path(tc.branch_from).parent.parent)
        if chosen is not None:
            precision = chosen["precision"] if tc.precision == "auto" else tc.precision
            compiled = chosen["compile"] if tc.compile == "auto" else tc.compile == "on"
            kernel = chosen["kernel"] if self._c_step_allowed else "torch"
            self.passes = chosen["passes"]  # the same order of sums as before
        else:
            precision, compiled, kernel = self._choose_speed()
        if kernel != "c":
            self.passes = 0
        if self.rank == 0 and own != {"precision": precision, "compile": compiled, "kernel": kernel,
                                      "passes": self.passes}:
            write_speed(self.run_dir, precision, compiled, kernel, self.passes)
        return precision, compiled, kernel

    @property
    def _c_step_allowed(self) -> bool:
        """Whether this run may train through the C step: a single process on a CPU, pre-training the full model
        (no adapters, no masked targets), with compile auto."""
        tc = self.tc
        return (self.world == 1 and self.device.type == "cpu" and tc.compile == "auto" and not tc.lora_rank
                and not self._tuning)

    def _choose_speed(self) -> tuple[str, bool, str]:
        """Measured: the faster of PyTorch eager (in the faster precision) and the C step, and whether compiling
        beats it (single process on a CPU)."""
        tc, shape, micro = self.tc, self.mc.shape.to_dict(), self.r.micro_batch
        precision = pick_precision(tc.precision, self.device)
        if self.world > 1 or self.device.type != "cpu":  # every process must choose the same: no measuring
            return precision, tc.compile == "on", "torch"
        try:
            eager = pick_precision("auto", self.device, shape, micro) if tc.precision == "auto" else precision
            c_step = False
            if self._c_step_allowed:
                kernel, c_precision = faster_kernel(tuple(sorted(shape.items())), micro, torch.get_num_threads(),
                                                    tc.precision)
                if kernel == "c":  # the rate to beat is the C step's
                    self.passes = c_step_passes(tuple(sorted(shape.items())), micro, torch.get_num_threads(),
                                                c_precision)
                    self.eager_rate = native_rate(shape, torch.get_num_threads(), micro, c_precision, self.passes)
                    c_step = self.eager_rate is not None
                    eager = c_precision if c_step else eager
            compiled, precision = choose_compile(
                tc.compile, self.device, shape, micro,
                lambda: self._remaining_flops(0) / self._eager_rate(eager) * ETA_OVERHEAD, precision=tc.precision,
                eager_precision=eager, tuning=self._tuning, lora_rank=tc.lora_rank,
                eager_rate=lambda: self._eager_rate(eager))
        except RuntimeError:  # e.g. out of memory while measuring: the run says so, clearly, in its first step
            self.eager_rate = None
            return precision, tc.compile == "on", "torch"
        if compiled or (not c_step and precision != eager):
            self.eager_rate = None  # measured for another way of training
        return precision, compiled, "c" if c_step and not compiled else "torch"

    def _bind_c_step(self, s: _State) -> None:
        """The C step bound to the model, and the C update to the optimizers where it runs them (their matrices
        small enough to gain); where the step cannot be bound (no compiler on the machine a run resumed on), one
        note and PyTorch eager in the same precision."""
        try:
            self.c_step = NativeTrainStep(s.model, bf16=self.precision == "bf16", seqs_per_pass=self.passes)
        except NativeUnavailable as e:
            self.log(f"note: {e}; training with PyTorch (slower)")
            self.kernel, self.eager_rate = "torch", None
            return
        try:
            self.c_update = NativeUpdate(list(s.optimizer.optimizers.values()))
        except NativeUnavailable:
            self.c_update = None  # torch's optimizers: larger matrices (as fast there) or options it does not run

    @property
    def _tuning(self) -> bool:
        return self.data.val[1] is not None  # instruction data: targets masked

    def _compile_key(self, precision: str) -> str:
        return compile_key(self.mc.shape.to_dict(), self.r.micro_batch, precision, self._tuning, self.tc.lora_rank)

    def _eager_rate(self, precision: str) -> float:
        """Training FLOP/s of this shape here, eager (a few real steps; small models run far below the matmul
        peak, so a fixed MFU guess was off by 2x and more)."""
        if self.eager_rate is None and self.kernel == "c":
            self.eager_rate = native_rate(self.mc.shape.to_dict(), torch.get_num_threads(), self.r.micro_batch,
                                          self.precision, self.passes)
        if self.eager_rate is None:
            self.eager_rate = training_rate(self.mc.shape.to_dict(), torch.get_num_threads(), self.r.micro_batch,
                                            precision=precision) * self.world
        return self.eager_rate

    def _remaining_flops(self, start_step: int) -> float:
        return self.r.flops - start_step * self.r.tokens_per_step * self.r.flops_per_token

    def _first_compiled_step(self, net, eager, s: _State, step: int, lr: float):
        """The first step of a compiled run (it compiles); where compiling fails, the run goes on eager."""
        try:
            loss = self._step(net, s, step, lr)
        except FlopwiseError:
            raise
        except Exception as e:  # inductor raises many kinds (no compiler, unsupported op): none should end the run
            failure = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
        else:
            try:
                remember_compiled(self._compile_key(self.precision))
            except OSError:
                pass  # the registry only sharpens estimates
            return net, loss
        # retried outside the handler, so the failed step's frames (and their activations) are freed first
        s.optimizer.zero_grad(set_to_none=True)
        self.log(f"note: torch.compile failed ({failure}); training eager")
        self.compiled = False
        if self.rank == 0:
            write_speed(self.run_dir, self.precision, False)  # a resume goes on as this run does: eager
        return eager, self._step(eager, s, step, lr)

    def _restore(self) -> _State:
        """The model and optimizer at the step this run continues from: its own checkpoint, else a WSD trunk's
        checkpoint (``branch_from``), else a base run's weights with a fresh optimizer (``init_weights``)."""
        tc = self.tc
        torch.manual_seed(tc.seed)
        model = Llama(self.mc)
        ckpt = load_checkpoint(latest_checkpoint(self.run_dir))
        if ckpt is None and tc.branch_from:
            ckpt = load_checkpoint(Path(tc.branch_from))
            if ckpt is None:
                raise FlopwiseError(f"{self.run_dir} starts from {tc.branch_from}, which does not exist: "
                                    "train its trunk first")
            ckpt = {**ckpt, "wall_seconds": 0.0}
        if ckpt is None and tc.init_weights:
            model.load_state_dict(load_model(tc.init_weights).state_dict())
        if tc.lora_rank:
            apply_lora(model, tc.lora_rank, tc.lora_alpha, tc.lora_targets)
        model = model.to(self.device)
        optimizer = make_optimizer(model, tc, self.r.lr)
        if ckpt is None:
            return _State(model, optimizer, 0, 0.0)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        return _State(model, optimizer, ckpt["step"], ckpt["wall_seconds"])

    def _step(self, net: torch.nn.Module, s: _State, step: int, lr: float) -> float:
        """One optimizer step over this process' micro-batches; returns the step's mean training loss."""
        r = self.r
        for g in s.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        lo = self.rank * r.micro_batch * r.grad_accum
        loss_sum = 0.0
        # this process' sequences of the step in one gather, sliced into micro-batches (contiguous rows: the C step
        # reads them where they lie); the Python between two C steps runs from a cache the step has emptied
        try:
            share = self.data.batches.get(step, lo, lo + r.micro_batch * r.grad_accum, self.device)
            for micro in range(r.grad_accum):
                a = micro * r.micro_batch
                x, y, *mask = (part[a:a + r.micro_batch] for part in share)  # mask: tuning
                if self.c_step is not None:  # the C step adds its gradients to .grad itself
                    loss_sum += self.c_step.step(x, y, 1.0 / r.grad_accum) / r.grad_accum
                    continue
                with dist.no_sync(net, micro < r.grad_accum - 1), \
                        torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                    loss = net(x, y, loss_mask=mask[0] if mask else None) / r.grad_accum
                loss.backward()
                loss_sum += float(loss.detach())
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not isinstance(e, torch.OutOfMemoryError) and "alloc" not in str(e).lower():
                raise
            raise FlopwiseError(f"a micro-batch of {r.micro_batch} sequences of {self.mc.seq_len} tokens does not "
                                f"fit in memory: lower --micro-batch (gradient accumulation keeps the global "
                                f"batch of {r.global_batch})") from None
        if self.c_update is not None:  # clips, updates and zeroes the gradients in one call
            self.c_update.step(self.tc.grad_clip)
        else:
            if self.tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(s.model.parameters(), self.tc.grad_clip)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
        return dist.mean(loss_sum, self.device)

    def _evaluate(self, model: Llama, final: bool) -> tuple[float, float | None]:
        windows, masks = self.data.val_final if final else self.data.val
        return evaluate(model, windows, self.r.micro_batch, self.precision, self.device,
                        self.data.byte_lengths if final else None, masks, native=self.c_step)

    def _checkpoint(self, s: _State, done: int, last: bool, seconds: float) -> None:
        wall = s.wall_before + seconds
        if self.rank == 0 and done in self.tc.save_at_steps:
            save_checkpoint(self.run_dir / "ckpt" / f"step-{done}.pt", s.model, s.optimizer, done, wall)
        if self.rank == 0 and (done % self.r.ckpt_every == 0 or last):
            save_checkpoint(latest_checkpoint(self.run_dir), s.model, s.optimizer, done, wall)
        if done % self.r.ckpt_every == 0:
            dist.barrier()

    def _announce(self, start_step: int, model: torch.nn.Module) -> None:
        if self.quiet:
            return
        r, mc = self.r, self.mc
        epochs = r.n_tokens / self.data.n_tokens_train
        compiled_rate = None  # measured per process on a CPU
        if self.compiled and self.device.type == "cpu":
            one = recorded_compiled_rate(mc.shape.to_dict(), r.micro_batch, self.precision, torch.get_num_threads())
            compiled_rate = one * self.world if one else None
        try:
            rate = compiled_rate or (self._eager_rate(self.precision) if self.device.type == "cpu"
                                     else self.peak * 0.4)
        except RuntimeError:  # e.g. out of memory: the first step says so, clearly
            rate = float("nan")
        est = self._remaining_flops(start_step) / rate * (C_STEP_ETA_OVERHEAD if self.kernel == "c" else ETA_OVERHEAD)
        if self.compiled:
            warm = compiled_before(self._compile_key(self.precision))
            est = compiled_seconds(est, warm, 1.0) if compiled_rate else compiled_seconds(est, warm)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        what = (f"LoRA rank {self.tc.lora_rank} adapters ({trainable:,} params) of a {n_params_total(mc):,}-"
                "param model" if self.tc.lora_rank else f"{n_params_total(mc):,} params")
        self.log(f"training {what} on {r.n_tokens:,} tokens ({epochs:.2f} epochs of "
                 f"{self.data.n_tokens_train:,}), {r.flops:.3g} FLOPs, {r.steps} steps of {r.tokens_per_step:,} "
                 f"tokens, lr {r.lr:.2g}, {self.precision}{', compiled' if self.compiled else ''}"
                 f"{', C step' if self.kernel == 'c' else ''} on "
                 f"{self.device.type}{f' x{self.world}' if self.world > 1 else ''}{self._threads_note()}; "
                 + (f"about {fmt_seconds(est)}" if est == est else "time unknown")
                 + (f"; resuming at step {start_step}" if start_step else ""))
        if epochs > 1:
            self.log(f"note: the run repeats its {self.data.n_tokens_train:,} training tokens {epochs:.1f} times")

    def _threads_note(self) -> str:
        if self.device.type != "cpu":
            return ""
        return f" with {self.cpu.threads} thread(s)" + (f" (up to {self.cpu.max_threads}: fewer while other processes "
                                                        "are busy)" if self.cpu.adapt else "")

    def _finish(self, final_eval: tuple[float, float | None], train_loss: float, wall: float) -> dict:
        r, mc = self.r, self.mc
        val_final, val_final_mask = self.data.val_final
        final = {"val_loss": final_eval[0], "val_bpb": final_eval[1], "train_loss": train_loss,
                 "n_params": n_params_total(mc), "n_params_non_embedding": n_params_non_embedding(mc),
                 "n_tokens": r.n_tokens, "flops": r.flops, "flops_6nd": flops_6nd(n_params_total(mc), r.n_tokens),
                 "epochs": r.n_tokens / self.data.n_tokens_train, "steps": r.steps, "wall_seconds": wall,
                 "tokens_per_s": r.n_tokens / wall if wall > 0 else None,
                 "mfu": r.flops / wall / self.peak if wall > 0 else None, "precision": self.precision,
                 "compiled": self.compiled, "kernel": self.kernel, "optimizer": self.tc.optimizer,
                 **({"muon_lr_scale": self.tc.muon_lr_scale} if self.tc.optimizer == "muon" else {}),
                 "device": self.device.type, "world_size": self.world, "threads_mean": self.cpu.mean_threads,
                 "val_tokens": int(val_final[:, 1:].size if val_final_mask is None else val_final_mask.sum()),
                 **self.tc.extra}
        if self.rank == 0:
            write_final(self.run_dir, final)
        dist.barrier()
        dist.teardown()
        return final


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"
