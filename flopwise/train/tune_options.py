"""How to tune, without torch: the CLI shows these defaults before anything heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass, field

from flopwise.laws.flops import BLOCK_PROJECTIONS


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
