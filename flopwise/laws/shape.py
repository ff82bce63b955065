"""Shape suggestion: a concrete LLaMA-style configuration for a target parameter count.

The rule
--------
* Aspect ratio: d_model / n_layers close to 64 (N / 1e8)^0.1, clipped to [32, 128]. This
  interpolates GPT-3 Small and Pythia-160M (about 64 at 1e8 parameters) and LLaMA-7B/70B
  (about 100-128 at 1e10); Kaplan et al. 2020 (Fig. 5) found loss within a few percent over
  aspect ratios 20-200, so the rule picks a sensible default rather than an optimum.
* Head size 32 below d_model 256, 64 up to 2048, 128 above (LLaMA); grouped-query attention
  with n_heads / 4 key-value heads once there are 16 heads or more (LLaMA-2 70B, Mistral).
* SwiGLU d_ff near 8/3 d_model (LLaMA), adjusted by a few steps to land on the target.
* d_model and d_ff are multiples of 32 (the block of GGUF's q4_0/q8_0), and of 256 from
  d_model 1024 on (the k-quant super-block), so quantised export needs no fallbacks.
* Vocabulary (when not given): 32000 from 3e8 parameters, smaller below so embeddings do
  not swallow a tiny model; embeddings are tied below 5e8 parameters.

Among candidates within 5% of the target, the one nearest the aspect rule wins.
"""

from __future__ import annotations

import math

from flopwise.errors import FlopwiseError
from flopwise.laws.flops import Shape, n_params

TOLERANCE = 0.05


def target_aspect_ratio(n: float) -> float:
    """d_model / n_layers suggested for a model of ``n`` parameters."""
    return min(128.0, max(32.0, 64.0 * (n / 1e8) ** 0.1))


def default_vocab_size(n: float) -> int:
    if n >= 3e8:
        return 32000
    if n >= 3e7:
        return 8192
    if n >= 2e6:
        return 4096
    if n >= 3e5:
        return 2048
    return 512


def _granularity(d_model: int) -> int:
    return 256 if d_model >= 1024 else 32


def _head_dim(d_model: int) -> int:
    return 32 if d_model < 256 else 64 if d_model <= 2048 else 128


def _kv_heads(n_heads: int) -> int:
    if n_heads < 16:
        return n_heads
    return max(k for k in range(1, n_heads // 4 + 1) if n_heads % k == 0)


def _round_up(x: float, m: int) -> int:
    return max(m, int(math.ceil(x / m)) * m)


NARROW = ((0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6, 1.8, 2.0), 4)
WIDE = ((0.25, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6, 1.8, 2.0), 6)  # when NARROW finds nothing


def _candidates(n_target: float, vocab: int, seq_len: int, tie: bool, search=NARROW):
    widths, ff_steps = search
    aspect = target_aspect_ratio(n_target)
    # N_non_embedding ~ 12 L d^2 with d = aspect * L gives the depth to start from.
    l0 = max(1.0, (n_target / (12.0 * aspect**2)) ** (1 / 3))
    for n_layers in range(max(1, int(l0 / 2)), int(l0 * 2) + 3):
        d_mid = aspect * n_layers
        for d_model in sorted({_round_up(d_mid * f, _granularity(int(d_mid * f))) for f in
                               widths}):
            hd = _head_dim(d_model)
            if d_model % hd:
                continue
            g = _granularity(d_model)
            ff0 = _round_up(8 * d_model / 3, g)
            for step in range(-ff_steps, ff_steps + 1):
                d_ff = ff0 + step * g
                if d_ff < g:
                    continue
                n_heads = d_model // hd
                yield Shape(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                            n_kv_heads=_kv_heads(n_heads), d_ff=d_ff, seq_len=seq_len, tie_embeddings=tie)


def suggest_shape(n_target: float, convention: str = "total", vocab_size: int | None = None,
                  seq_len: int = 2048, tie_embeddings: bool | None = None) -> Shape:
    """A shape whose exact parameter count (in ``convention``) is within 5% of ``n_target``."""
    if not (math.isfinite(n_target) and n_target >= 1e3):
        raise FlopwiseError(f"target parameter count must be at least 1e3, got {n_target:g}")
    if n_target > 1e13:
        raise FlopwiseError(f"target parameter count {n_target:.3g} is beyond 1e13: check the budget")
    vocab = vocab_size or default_vocab_size(n_target)
    tie = bool(n_target < 5e8) if tie_embeddings is None else bool(tie_embeddings)
    aspect = target_aspect_ratio(n_target)
    best, best_score = None, math.inf
    for search in (NARROW, WIDE):
        for s in _candidates(n_target, vocab, seq_len, tie, search):
            err = abs(n_params(s, convention) / n_target - 1.0)
            if err > TOLERANCE:
                continue
            score = (abs(math.log(s.d_model / s.n_layers / aspect)) + 4.0 * err
                     + 0.5 * abs(math.log(3 * s.d_ff / (8 * s.d_model))))
            if score < best_score:
                best, best_score = s, score
        if best is not None:
            break
    if best is None:
        smallest = Shape(vocab_size=vocab, d_model=32, n_layers=1, n_heads=1, n_kv_heads=1, d_ff=32,
                         seq_len=seq_len, tie_embeddings=tie)
        raise FlopwiseError(
            f"no shape within 5% of {n_target:.3g} parameters with vocab {vocab} "
            f"(the smallest has {n_params(smallest, convention):,}): use a smaller --vocab-size or a larger target"
        )
    return best


# ---------------------------------------------------------------- the sweep family: one dial

FAMILY_HEAD_DIM = 16
FAMILY_MIN_LAYERS = 2  # one block is attention-only-like; its loss does not follow deeper models


def family_depth(n: float) -> int:
    """The depth a sweep around ``n`` parameters keeps for every size: the aspect rule's depth at ``n``."""
    aspect = target_aspect_ratio(n)
    return max(FAMILY_MIN_LAYERS, round((n / (12.0 * aspect**2)) ** (1 / 3)))


def family_shape_at(d_model: int, n_layers: int, vocab_size: int, seq_len: int) -> Shape:
    """The family member of width ``d_model``: head size 16, SwiGLU d_ff near 8/3 d_model, no grouped KV."""
    step = 32 if d_model % 32 == 0 else 16
    n_heads = d_model // FAMILY_HEAD_DIM
    return Shape(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_heads,
                 d_ff=_round_up(8 * d_model / 3, step), seq_len=seq_len, tie_embeddings=True)


def family_shape(n_target: float, n_layers: int, vocab_size: int, seq_len: int, step: int = 16) -> Shape:
    """The family member nearest ``n_target`` total parameters (in log N) at fixed depth: width is the one dial.

    Sweeps use this family so that loss against N moves smoothly (suggest_shape jumps between depths and
    widths, which shows up as zig-zags in IsoFLOP profiles). Widths are multiples of ``step`` (16 in sweeps;
    32 for a model to be exported with 32-blocked quantisation).
    """
    if step % FAMILY_HEAD_DIM:
        raise FlopwiseError(f"the family's width step must be a multiple of {FAMILY_HEAD_DIM}, got {step}")
    # N ~ V d + 12 L d^2 (tied embeddings, SwiGLU at 8/3): solve for d, then look at the widths around it
    d0 = (-vocab_size + math.sqrt(vocab_size**2 + 48.0 * n_layers * max(n_target, 1.0))) / (24.0 * n_layers)
    widths = range(max(step, (int(d0) // step - 2) * step), (int(d0) // step + 4) * step, step)
    return min((family_shape_at(d, n_layers, vocab_size, seq_len) for d in widths),
               key=lambda s: abs(math.log(n_params(s, "total") / n_target)))
