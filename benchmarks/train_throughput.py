"""Benchmark: flopwise's trainer against a plain fp32 eager PyTorch loop, same model, batch and steps.

Both train the same LLaMA-style architecture on the bundled corpus with the same data order,
learning-rate schedule and optimizer settings; the baseline is a nanoGPT-style loop (fp32, eager,
default AdamW). Prints tokens/s of each, the ratio, final losses and MFU against this machine's
measured bf16 and fp32 matmul peaks. Targets on the 2-core dev machine: >= 2.5x at ~10M params,
>= 1.5x at ~1M, final losses within 2%.

    .venv/bin/python benchmarks/train_throughput.py [--steps 30] [--only 10M|1M|d32L1|d64L2|d128L4]
        [--precision auto|bf16|fp32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flopwise.config import TrainConfig, resolve
from flopwise.data.prepare import prepare
from flopwise.laws.flops import n_params_total, training_flops_per_token
from flopwise.model.llama import Llama, ModelConfig
from flopwise.run import new_run
from flopwise.train.batches import Batches
from flopwise.train.probe import probe
from flopwise.train.schedule import lr_at
from flopwise.train.trainer import train

CONFIGS = {
    "10M": dict(d_model=384, n_layers=6, n_heads=6, n_kv_heads=6, d_ff=1024, seq_len=256),
    "1M": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=352, seq_len=256),
    # sweep-sized (the autopilot's sweeps and final runs): context 128, batch 32 x 128 = 4,096 tokens
    "d32L1": dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=96, seq_len=128),
    "d64L2": dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=192, seq_len=128),
    "d128L4": dict(d_model=128, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=352, seq_len=128),
}
SWEEP_SIZED = ("d32L1", "d64L2", "d128L4")


def baseline(mc: ModelConfig, tc: TrainConfig, corpus, r: dict) -> tuple[float, float]:
    """Plain fp32 eager loop: same init seed, data, schedule, clipping and AdamW hyper-parameters."""
    torch.manual_seed(tc.seed)
    model = Llama(mc)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=r.lr, betas=(tc.beta1, tc.beta2))
    batches = Batches(corpus.tokens("train"), mc.seq_len, r.global_batch, tc.seed)
    t0, loss_sum = None, 0.0
    for step in range(r.steps):
        if step == 1:
            t0 = time.perf_counter()  # the first step warms up allocators, like the trainer's
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r.steps, r.lr, r.warmup_steps, tc.min_lr_ratio)
        loss_sum = 0.0
        for micro in range(r.grad_accum):
            x, y = batches.get(step, micro * r.micro_batch, (micro + 1) * r.micro_batch)
            loss = model(x, y) / r.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    tok_s = (r.steps - 1) * r.tokens_per_step / (time.perf_counter() - t0)
    return tok_s, loss_sum


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--only", choices=list(CONFIGS))
    ap.add_argument("--compile", action="store_true", help="flopwise's run with torch.compile")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="flopwise's run (auto: the faster of fp32 and bf16, measured for the shape)")
    args = ap.parse_args()
    corpus = prepare(log=lambda m: None)
    peaks = probe("cpu", size=2048, repeats=5)
    print(f"machine: {peaks['device']}, {peaks['threads']} threads; matmul peak fp32 {peaks['fp32_flops'] / 1e9:.0f}, "
          f"bf16 {peaks['bf16_flops'] / 1e9:.0f} GFLOP/s")
    for name, shape in CONFIGS.items():
        if args.only and name != args.only:
            continue
        mc = ModelConfig(vocab_size=corpus.vocab_size, tie_embeddings=True, **shape)
        micro = 32 if name in SWEEP_SIZED else args.micro_batch
        tokens_per_step = micro * mc.seq_len
        tc = TrainConfig(n_tokens=tokens_per_step * args.steps, batch_tokens=tokens_per_step,
                         micro_batch=micro, eval_every=10**9, ckpt_every=10**9, log_every=1,
                         final_eval_windows=1, eval_windows=1, precision=args.precision, compile=args.compile)
        r = resolve(mc, tc)
        fpt = training_flops_per_token(mc)
        tmp = Path(tempfile.mkdtemp())
        try:
            run = new_run(tmp / "run", mc, tc, corpus)
            final = train(run, quiet=True)
            # one line per step; drop the warm-up (compilation) and the last (its time includes the final eval)
            lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][2:-1]
            fw_tok_s = len(lines) / sum(1.0 / m["tok_per_s"] for m in lines)
            fw_loss, fw_precision = final["train_loss"], final["precision"]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        base_tok_s, base_loss = baseline(mc, tc, corpus, r)
        print(f"\n{name}: {n_params_total(mc):,} params, {mc.n_layers} layers x d_model {mc.d_model}, "
              f"ctx {mc.seq_len}, batch {r.global_batch} x {mc.seq_len} tokens, {r.steps} steps")
        fw_label = f"flopwise ({args.precision} -> {fw_precision}, fused AdamW{', compiled' if args.compile else ''})"
        for label, tok_s, loss in ((fw_label, fw_tok_s, fw_loss),
                                   ("baseline (fp32 eager)", base_tok_s, base_loss)):
            achieved = tok_s * fpt
            print(f"  {label:50s} {tok_s:9,.0f} tok/s  final loss {loss:.4f}  MFU {achieved / peaks['bf16_flops']:.0%} "
                  f"of bf16 peak, {achieved / peaks['fp32_flops']:.0%} of fp32 peak")
        print(f"  speed-up {fw_tok_s / base_tok_s:.2f}x; final losses differ by {abs(fw_loss / base_loss - 1):.2%}")


if __name__ == "__main__":
    main()
