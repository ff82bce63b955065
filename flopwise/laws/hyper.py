"""Hyperparameters as power laws of compute (no torch): what a run uses when the user gives none."""

from __future__ import annotations


def default_lr_and_batch(flops: float) -> tuple[float, float]:
    """DeepSeek LLM (2024, eq. 1) compute power laws: peak LR 0.3118 C^-0.125 and batch
    0.2920 C^0.3271 tokens, C in FLOPs. Below ~1e15 FLOPs the LR is clipped to 3e-3 and the batch
    floored at 4096 tokens: beyond their fitted range, larger LRs diverged here."""
    lr = min(3e-3, 0.3118 * flops**-0.125)
    batch_tokens = max(4096.0, 0.2920 * flops**0.3271)
    return lr, batch_tokens
