"""Benchmark: wall time to a validation loss. A plain fp32 eager AdamW loop trains for a fixed token budget; flopwise
with AdamW and with Muon (precision and compile chosen as `train` chooses them) must reach that loop's final
validation loss, on the same windows, in less wall time.

A run only reaches its loss once its schedule has decayed at its own token count, so flopwise is run for a ladder
of token budgets (the loop's budget times LADDER); the time to the loss is interpolated in log-tokens between the
two ladder runs whose final losses bracket the target (log-log in wall time), or reported as "not reached". Same
model, init seed, data order, batch, peak LR (DeepSeek LLM's rule) and warmup for every run. Prints each run and
the ratio loop time / flopwise time. Issue 16's targets: flopwise's best optimizer at <= 1/3 of the loop's time
at d384 L6 and <= 1/2 at d128 L4.

    .venv/bin/python benchmarks/time_to_loss.py [--only 10M|1M] [--tokens N] [--ladder 0.35,0.6,1]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

# the same plain loop (benchmarks/ is on the path of a script)
from train_throughput import in_fresh_process, plain_setup

from flopwise.config import TrainConfig, resolve
from flopwise.data.prepare import prepare
from flopwise.laws.flops import n_params_total
from flopwise.model.llama import ModelConfig
from flopwise.run import new_run
from flopwise.training.batches import eval_windows
from flopwise.training.schedule import lr_at
from flopwise.training.trainer import evaluate, train

CONFIGS = {  # context 256, batch 16 x 256 tokens
    "10M": (dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, d_ff=1024, seq_len=256), 400_000),
    "1M": (dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=352, seq_len=256), 1_600_000),
}
BATCH_SEQS = 16
EVAL_WINDOWS = 128


def plain_loop(mc: ModelConfig, tc: TrainConfig, corpus) -> tuple[float, float]:
    """(final validation loss, wall seconds): fp32, eager, default AdamW, flopwise's schedule and data order."""
    r = resolve(mc, tc)
    model, opt, batches = plain_setup(mc, tc, corpus, r)
    t0 = time.perf_counter()
    for step in range(r.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r.steps, r.lr, r.warmup_steps, tc.min_lr_ratio)
        x, y = batches.get(step, 0, r.global_batch)
        model(x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    windows = eval_windows(corpus.tokens("val"), mc.seq_len, EVAL_WINDOWS)
    return evaluate(model, windows, BATCH_SEQS, "fp32", torch.device("cpu"))[0], seconds


def flopwise_run(mc: ModelConfig, tc: TrainConfig, corpus) -> tuple[float, float, dict]:
    """(final validation loss, wall seconds including compiling, final.json) of one flopwise run."""
    tmp = Path(tempfile.mkdtemp())
    try:
        t0 = time.perf_counter()
        final = train(new_run(tmp / "run", mc, tc, corpus), quiet=True)
        return final["val_loss"], time.perf_counter() - t0, final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def time_to(target: float, ladder: list[tuple[float, float, float]]) -> float | None:
    """Interpolated wall seconds to ``target`` over (tokens, loss, seconds) runs of increasing length."""
    for (_, l0, s0), (_, l1, s1) in zip(ladder, ladder[1:], strict=False):
        if l0 > target >= l1:
            f = (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(l1))
            return math.exp(math.log(s0) + f * (math.log(s1) - math.log(s0)))
    return ladder[0][2] if ladder and ladder[0][1] <= target else None


def config(mc: ModelConfig, loop_tokens: int, n_tokens: int, **kw) -> TrainConfig:
    """A run of ``n_tokens`` with the loop's peak LR and warmup, so the ladder's runs differ only in length."""
    step_tokens = BATCH_SEQS * mc.seq_len
    lr = resolve(mc, TrainConfig(n_tokens=loop_tokens, batch_tokens=step_tokens)).lr
    return TrainConfig(n_tokens=n_tokens, lr=lr, batch_tokens=step_tokens, micro_batch=BATCH_SEQS,
                       warmup_steps=max(1, int(0.05 * loop_tokens / step_tokens)), eval_every=10**9,
                       ckpt_every=10**9, final_eval_windows=EVAL_WINDOWS, eval_windows=1, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=list(CONFIGS))
    ap.add_argument("--tokens", type=int, help="the loop's token budget (default: per model)")
    ap.add_argument("--ladder", default="0.35,0.6,1", help="flopwise's budgets as fractions of the loop's")
    args = ap.parse_args()
    corpus = prepare(vocab_size=4096, log=lambda m: None)
    ladder = [float(x) for x in args.ladder.split(",")]
    for name, (shape, default_tokens) in CONFIGS.items():
        if args.only and name != args.only:
            continue
        tokens = args.tokens or default_tokens
        mc = ModelConfig(vocab_size=corpus.vocab_size, tie_embeddings=True, **shape)
        step_tokens = BATCH_SEQS * mc.seq_len
        target, base_s = in_fresh_process(plain_loop, mc, config(mc, tokens, tokens), corpus)
        print(f"\n{name}: {n_params_total(mc):,} params ({mc.n_layers} x d{mc.d_model}, ctx {mc.seq_len}, vocab "
              f"{mc.vocab_size}), batch {BATCH_SEQS} x {mc.seq_len}; plain fp32 AdamW loop: {tokens:,} tokens "
              f"-> val loss {target:.4f} in {base_s:.1f} s", flush=True)
        best = None
        for optimizer in ("adamw", "muon"):
            runs = []
            for frac in ladder:
                n = int(tokens * frac) // step_tokens * step_tokens
                loss, seconds, final = flopwise_run(mc, config(mc, tokens, n, optimizer=optimizer), corpus)
                runs.append((n, loss, seconds))
                print(f"  flopwise {optimizer:5s} {n:>10,} tokens: val loss {loss:.4f} in {seconds:6.1f} s "
                      f"({final['precision']}, {'compiled' if final.get('compiled') else 'eager'})", flush=True)
            t = time_to(target, runs)
            ratio = base_s / t if t else None
            at_most = "at most " if t and runs[0][1] <= target else ""  # the ladder's shortest run already did
            print(f"  flopwise {optimizer}: reaches {target:.4f} in {at_most}"
                  + (f"{t:.1f} s: {'at least ' if at_most else ''}{ratio:.2f}x faster than the loop "
                     f"({t / base_s:.2f} of its time)" if t else "no run of the ladder (not reached)"), flush=True)
            if ratio and (best is None or ratio > best[1]):
                best = (optimizer, ratio)
        goal = 3.0 if name == "10M" else 2.0
        print(f"  best: {best[0] if best else '-'} at {best[1] if best else 0:.2f}x (target >= {goal:g}x: "
              f"{'met' if best and best[1] >= goal else 'MISSED'})", flush=True)
    print(json.dumps({"note": "wall times include compiling where flopwise compiles"}))


if __name__ == "__main__":
    main()
