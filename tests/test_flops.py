import math

import pytest

from flopwise.errors import FlopwiseError
from flopwise.laws.flops import (
    Shape,
    flops_6nd,
    forward_flops_per_token,
    n_params,
    n_params_non_embedding,
    n_params_total,
    training_flops,
    training_flops_per_token,
    weight_shapes,
)

# Two small configs whose counts were worked out by hand (see the comments).
GQA_UNTIED = Shape(vocab_size=100, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, seq_len=8)
MHA_TIED = Shape(vocab_size=256, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, seq_len=16,
                 tie_embeddings=True)


def test_hand_counted_params_gqa_untied():
    # layer: wq,wo 2*16*16=512; wk,wv 2*16*8=256; mlp 3*16*48=2304; norms 32 -> 3104; x2 + final norm 16
    assert n_params_non_embedding(GQA_UNTIED) == 6224
    assert n_params_total(GQA_UNTIED) == 6224 + 2 * 100 * 16


def test_hand_counted_params_mha_tied():
    # layer: 4*32*32=4096; mlp 3*32*64=6144; norms 64 -> 10304; + final norm 32; embedding counted once
    assert n_params_non_embedding(MHA_TIED) == 10336
    assert n_params_total(MHA_TIED) == 10336 + 256 * 32
    assert n_params(MHA_TIED, "non_embedding") == 10336


def test_hand_counted_flops():
    # per layer: qkv 2*16*32=1024, QK 2*8*16=256, AV 256, out 512, mlp 6*16*48=4608 -> 6656; logits 3200
    assert forward_flops_per_token(GQA_UNTIED) == 2 * 6656 + 3200
    assert training_flops_per_token(GQA_UNTIED) == 3 * 16512
    # qkv 2*32*96=6144, QK 1024, AV 1024, out 2048, mlp 12288 -> 22528; logits 16384
    assert forward_flops_per_token(MHA_TIED) == 22528 + 16384
    assert training_flops(MHA_TIED, 1000) == 3 * 38912 * 1000


@pytest.mark.parametrize("shape", [GQA_UNTIED, MHA_TIED])
def test_param_count_equals_literal_weight_count(shape):
    literal = 0
    for name, dims in weight_shapes(shape).items():
        count = math.prod(dims)
        literal += count * (shape.n_layers if name.startswith("layers.*") else 1)
    assert literal == n_params_total(shape)


def test_attention_flops_grow_with_context():
    longer = Shape(**{**GQA_UNTIED.to_dict(), "seq_len": 16})
    # each layer gains 4 * d_model FLOPs per extra context position
    assert forward_flops_per_token(longer) - forward_flops_per_token(GQA_UNTIED) == 2 * 4 * 16 * 8


def test_6nd_identity_on_chinchilla():
    assert flops_6nd(70e9, 1.4e12) == pytest.approx(5.88e23, rel=1e-12)


def test_bad_shapes_name_the_fix():
    with pytest.raises(FlopwiseError, match="n_heads dividing d_model"):
        Shape(vocab_size=10, d_model=30, n_layers=1, n_heads=4, n_kv_heads=4, d_ff=8)
    with pytest.raises(FlopwiseError, match="n_kv_heads dividing n_heads"):
        Shape(vocab_size=10, d_model=32, n_layers=1, n_heads=4, n_kv_heads=3, d_ff=8)
    with pytest.raises(FlopwiseError, match="missing"):
        Shape.from_dict({"vocab_size": 10})


def test_shape_json_round_trip():
    assert Shape.from_dict(GQA_UNTIED.to_dict()) == GQA_UNTIED
