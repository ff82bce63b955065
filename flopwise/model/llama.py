"""The LLaMA-style decoder: RMSNorm, rotary position embeddings (rotate-half convention, as
Hugging Face's LlamaForCausalLM), grouped-query attention, SwiGLU MLP, no biases, optional
tied embeddings. Weight names follow ``flopwise.laws.flops.weight_shapes`` so that the
parameter count is the laws' count by construction (and a test checks it).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flopwise.errors import FlopwiseError
from flopwise.laws.flops import Shape


@dataclass(frozen=True)
class ModelConfig(Shape):
    """A Shape plus what does not change the counts."""

    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, d: dict, strict: bool = False) -> ModelConfig:
        """A config from a dict; ``strict`` (a user's --config) refuses keys that are not fields, so a typo
        does not silently train the default."""
        fields = cls.__dataclass_fields__
        unknown = sorted(set(d) - set(fields))
        if strict and unknown:
            raise FlopwiseError(f"model config: unknown key(s) {', '.join(unknown)}: the fields are "
                                f"{', '.join(fields)}")
        known = {k: v for k, v in d.items() if k in fields}
        try:
            return cls(**known)
        except TypeError as e:
            raise FlopwiseError(f"model config: {e} (unknown keys: {unknown or 'none'})") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def shape(self) -> Shape:
        return Shape(**{k: getattr(self, k) for k in Shape.__dataclass_fields__})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability under bf16 autocast
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_len, head_dim) for the rotate-half convention."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos/sin: (T, hd). Rotates pairs (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    """Causal attention, (B, H, T, hd) in and out, in the dtype of ``q``; on a CPU with autocast off (the caller
    chooses fp32 there: see Block.attention)."""
    with torch.autocast("cpu", enabled=False) if q.device.type == "cpu" else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


class Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        kv = c.n_kv_heads * c.head_dim
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.wq = nn.Linear(c.d_model, c.d_model, bias=False)
        self.wk = nn.Linear(c.d_model, kv, bias=False)
        self.wv = nn.Linear(c.d_model, kv, bias=False)
        self.wo = nn.Linear(c.d_model, c.d_model, bias=False)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.w_gate = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w_up = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.w_down = nn.Linear(c.d_ff, c.d_model, bias=False)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # On a CPU, rotary embeddings and attention run in fp32 even under bf16 autocast: there the bf16
        # flash-attention backward with 16-wide heads took 48 ms a call against fp32's 9 (batch 32 x 128 tokens,
        # 2-core Xeon with AMX), more than the rest of the step together; q, k and v are cast once, here.
        work = torch.float32 if x.device.type == "cpu" else x.dtype
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2).to(work)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2).to(work)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2).to(work)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, self.n_kv_heads != self.n_heads).to(x.dtype)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(_matmul_input(self.attn_norm(x)), cos, sin)
        h = _matmul_input(self.mlp_norm(x))
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


def _matmul_input(h: torch.Tensor) -> torch.Tensor:
    """``h`` in the dtype autocast multiplies in, cast once: autocast would cast it again for every projection
    that reads it (q, k and v; gate and up), and casts were the largest cost after the matmuls in bf16 on a CPU."""
    device = h.device.type
    return h.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else h


class _CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of fp32 logits (N, V) against targets (N,), weighted by ``weights`` (N,) when given.
    The gradient is written in one pass from the saved log-probabilities (softmax minus one-hot), where autograd's
    path through nll_loss and log_softmax fills a dense (N, V) gradient first and reads it back."""

    @staticmethod
    def forward(ctx, logits, targets, weights):
        logp = torch.log_softmax(logits, dim=-1)
        picked = logp.gather(1, targets[:, None])[:, 0]
        denom = picked.new_tensor(float(len(targets))) if weights is None else weights.sum().clamp_min(1.0)
        loss = -(picked if weights is None else picked * weights).sum() / denom
        ctx.save_for_backward(logp, targets, weights, denom)
        return loss

    @staticmethod
    def backward(ctx, grad):
        logp, targets, weights, denom = ctx.saved_tensors
        g = logp.exp_()  # softmax; logp is not needed again
        g[torch.arange(len(targets), device=targets.device), targets] -= 1.0
        scale = grad / denom
        g *= scale if weights is None else (weights * scale)[:, None]
        return g, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy (nats) of fp32 logits (N, V) against targets (N,); with ``weights`` (N,) of 0/1, the mean
    over the rows weighted 1."""
    return _CrossEntropy.apply(logits, targets, weights)


class Llama(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) everywhere; residual projections scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def n_params(self) -> int:
        """Unique parameters (a tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, V), or the mean cross-entropy (nats/token) over targets when given.

        ``loss_mask`` (B, T) of 0/1 restricts the loss to some positions (instruction tuning).
        Decoding with a KV cache is the inference engine's (flopwise.infer.generate).
        """
        t = tokens.shape[1]
        if t > self.config.seq_len:
            raise FlopwiseError(f"sequence of {t} tokens exceeds the model's context {self.config.seq_len}")
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.rope_cos[:t], self.rope_sin[:t])
        logits = self.head(self.norm(x))
        if targets is None:
            return logits
        weights = None if loss_mask is None else loss_mask.reshape(-1).float()
        return cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), weights)
