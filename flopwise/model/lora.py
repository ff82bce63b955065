"""LoRA (Hu et al., 2021): a frozen weight W plus a trainable low-rank update (alpha / r) B A.

B starts at zero, so a freshly wrapped model computes exactly what the base model does. After
tuning, ``merge_lora`` folds the update into W and gives back a plain ``Llama`` whose
state_dict has the base model's names, so export, generation and evaluation need not know
that LoRA was used.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from flopwise.errors import FlopwiseError
from flopwise.laws.flops import BLOCK_PROJECTIONS as TARGETS  # every projection; also the default


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.base.weight.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype) @ self.lora_b.t().to(x.dtype)) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + (self.lora_b @ self.lora_a) * self.scale


def parse_targets(targets: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    bad = [t for t in names if t not in TARGETS]
    if bad or not names:
        raise FlopwiseError(f"LoRA target(s) {bad or '(none)'} unknown: choose from {', '.join(TARGETS)}")
    return names


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=TARGETS) -> nn.Module:
    """Freeze every parameter of ``model`` and wrap the target projections of each block in LoRA."""
    if rank < 1:
        raise FlopwiseError(f"LoRA rank must be at least 1, got {rank}")
    targets = parse_targets(targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.layers:
        for name in targets:
            setattr(layer, name, LoRALinear(getattr(layer, name), rank, alpha))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its weight, in place; the module tree is the base model's again."""
    with torch.no_grad():
        for layer in model.layers:
            for name, child in list(layer.named_children()):
                if isinstance(child, LoRALinear):
                    child.base.weight.copy_(child.merged_weight())
                    setattr(layer, name, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
