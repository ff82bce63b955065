"""Parameter and FLOP counts of the LLaMA-style decoder: the one place these numbers live.

The architecture (see DESIGN.md): token embedding, ``n_layers`` blocks of
[RMSNorm -> grouped-query attention (no biases, RoPE) -> RMSNorm -> SwiGLU MLP],
a final RMSNorm and an output projection that may be tied to the embedding.

Conventions
-----------
* ``n_params_total``: every weight, embedding and output head included (Chinchilla's N).
* ``n_params_non_embedding``: total minus every vocab x d_model matrix (the input
  embedding and, when untied, the output head); norms are kept (Kaplan's N).
* FLOPs: one multiply-add is 2 FLOPs. Only matrix multiplications are counted, in the
  spirit of Chinchilla's Appendix F: QKV and output projections, the attention score
  (QK^T) and value (AV) products over the full context, the MLP and the output logits.
  The embedding lookup is free; norms, RoPE, softmax and activations are ignored (they
  are under 1% for the shapes flopwise suggests). Like Chinchilla, the attention terms
  count the full ``seq_len`` x ``seq_len`` square, not only its causal half.
  Backward = 2 x forward, so training = 3 x forward.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass

from flopwise.errors import FlopwiseError


@dataclass(frozen=True)
class Shape:
    """The numbers that fix a model's parameter and FLOP counts."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FlopwiseError(f"shape field {name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise FlopwiseError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}: pick n_heads dividing d_model"
            )
        if self.n_heads % self.n_kv_heads:
            raise FlopwiseError(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}: "
                "grouped-query attention needs n_kv_heads dividing n_heads"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Shape:
        fields = cls.__dataclass_fields__
        missing = [k for k in fields if k not in d and fields[k].default is MISSING]
        if missing:
            raise FlopwiseError(f"shape is missing {', '.join(missing)}: give all of {', '.join(fields)}")
        return cls(**{k: d[k] for k in fields if k in d})


# the projection matrices of a block, by the names weight_shapes and the model use (LoRA's default targets)
BLOCK_PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def weight_shapes(s: Shape) -> dict[str, tuple[int, ...]]:
    """Every weight tensor's shape, by name (the layout the model module uses).

    Per-layer tensors are listed once with a ``layers.*`` prefix; multiply by n_layers.
    """
    kv = s.n_kv_heads * s.head_dim
    shapes = {
        "embed": (s.vocab_size, s.d_model),
        "layers.*.attn_norm": (s.d_model,),
        "layers.*.wq": (s.d_model, s.d_model),
        "layers.*.wk": (kv, s.d_model),
        "layers.*.wv": (kv, s.d_model),
        "layers.*.wo": (s.d_model, s.d_model),
        "layers.*.mlp_norm": (s.d_model,),
        "layers.*.w_gate": (s.d_ff, s.d_model),
        "layers.*.w_up": (s.d_ff, s.d_model),
        "layers.*.w_down": (s.d_model, s.d_ff),
        "norm": (s.d_model,),
    }
    if not s.tie_embeddings:
        shapes["head"] = (s.vocab_size, s.d_model)
    return shapes


def params_per_layer(s: Shape) -> int:
    """Weights in one transformer block: attention, SwiGLU MLP and two RMSNorm gains."""
    kv = s.n_kv_heads * s.head_dim
    attn = 2 * s.d_model * s.d_model + 2 * s.d_model * kv
    mlp = 3 * s.d_model * s.d_ff
    return attn + mlp + 2 * s.d_model


def n_params_embedding(s: Shape) -> int:
    """Weights in vocab x d_model matrices: the embedding, plus the head when untied."""
    return s.vocab_size * s.d_model * (1 if s.tie_embeddings else 2)


def n_params_non_embedding(s: Shape) -> int:
    """Kaplan's N: all blocks plus the final norm, no vocab x d_model matrix."""
    return s.n_layers * params_per_layer(s) + s.d_model


def n_params_total(s: Shape) -> int:
    """Chinchilla's N: every weight (a tied embedding counted once)."""
    return n_params_non_embedding(s) + n_params_embedding(s)


def n_params(s: Shape, convention: str = "total") -> int:
    """Parameter count in the named convention: ``total`` or ``non_embedding``."""
    if convention == "total":
        return n_params_total(s)
    if convention in ("non_embedding", "non-embedding"):
        return n_params_non_embedding(s)
    raise FlopwiseError(f"unknown parameter convention {convention!r}: use 'total' or 'non_embedding'")


def forward_flops_per_token(s: Shape) -> int:
    """Forward-pass FLOPs per token (matmuls only, full-context attention, free embedding)."""
    d, kv = s.d_model, s.n_kv_heads * s.head_dim
    qkv = 2 * d * (d + 2 * kv)
    scores = 2 * s.seq_len * d  # QK^T: every query against seq_len keys, all heads
    values = 2 * s.seq_len * d  # softmax(QK^T) V
    out = 2 * d * d
    mlp = 2 * 3 * d * s.d_ff
    logits = 2 * d * s.vocab_size
    return s.n_layers * (qkv + scores + values + out + mlp) + logits


def training_flops_per_token(s: Shape) -> int:
    """Training FLOPs per token: forward + backward, backward = 2 x forward."""
    return 3 * forward_flops_per_token(s)


def training_flops(s: Shape, n_tokens: float) -> float:
    """Exact training FLOPs of ``n_tokens`` tokens through shape ``s``."""
    return float(training_flops_per_token(s)) * float(n_tokens)


def flops_6nd(n_params: float, n_tokens: float) -> float:
    """The C = 6 N D approximation (N in whatever convention the caller's law uses)."""
    return 6.0 * float(n_params) * float(n_tokens)
