"""Learning-rate schedules that end exactly at the planned token count.

Steps are numbered 0 .. total_steps - 1; the last step runs at the minimum learning rate, so
a run's loss is that of a fully decayed schedule at its own token count (Chinchilla's point).
"""

from __future__ import annotations

import math

from flopwise.errors import FlopwiseError


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0, min_lr_ratio: float = 0.1,
          kind: str = "cosine", cooldown_fraction: float = 0.2, cooldown_shape: str = "linear") -> float:
    """Learning rate at ``step``.

    cosine: linear warmup to ``peak_lr``, then cosine to ``min_lr_ratio * peak_lr`` at the last step.
    wsd (warmup-stable-decay, Hägele et al. 2024): warmup, constant, then a cooldown over the
    last ``cooldown_fraction`` of steps, ``linear`` or ``1-sqrt``, to the same minimum.
    constant: warmup then ``peak_lr`` forever (the stable phase of a WSD sweep's trunk run).
    """
    if total_steps < 1:
        raise FlopwiseError("a schedule needs at least one step")
    min_lr = peak_lr * min_lr_ratio
    last = total_steps - 1
    warmup_steps = min(warmup_steps, last)
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return peak_lr
    if kind == "cosine":
        if last == warmup_steps:
            return min_lr
        p = min(1.0, (step - warmup_steps) / (last - warmup_steps))
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "wsd":
        start = wsd_cooldown_start(total_steps, warmup_steps, cooldown_fraction)
        if step <= start:
            return peak_lr if last > start else min_lr
        p = min(1.0, (step - start) / (last - start))
        if cooldown_shape == "linear":
            return peak_lr - (peak_lr - min_lr) * p
        if cooldown_shape == "1-sqrt":
            return min_lr + (peak_lr - min_lr) * (1.0 - math.sqrt(p))
        raise FlopwiseError(f"unknown cooldown shape {cooldown_shape!r}: use linear or 1-sqrt")
    raise FlopwiseError(f"unknown schedule {kind!r}: use cosine, wsd or constant")


def wsd_cooldown_start(total_steps: int, warmup_steps: int, cooldown_fraction: float) -> int:
    """The last step of a WSD schedule at the peak rate: a branch from a constant-rate trunk starts
    after it, i.e. from the trunk's checkpoint taken when this many + 1 steps are done."""
    last = total_steps - 1
    return max(min(warmup_steps, last), last - max(1, round(cooldown_fraction * total_steps)))

