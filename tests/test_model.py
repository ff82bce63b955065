import math

import pytest
import torch
import torch.nn.functional as F

from flopwise.laws.flops import n_params_total
from flopwise.laws.hyper import default_lr_and_batch
from flopwise.model.llama import Llama, ModelConfig, apply_rope, cross_entropy, rope_tables
from flopwise.training.schedule import lr_at

CONFIGS = [
    ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=16),
    ModelConfig(vocab_size=64, d_model=48, n_layers=3, n_heads=3, n_kv_heads=3, d_ff=96, seq_len=8,
                tie_embeddings=True),
    ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=8, n_kv_heads=1, d_ff=160, seq_len=32),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_param_count_equals_laws(config):
    model = Llama(config)
    assert model.n_params() == n_params_total(config)
    assert sum(p.numel() for p in model.parameters()) == n_params_total(config)


@pytest.mark.parametrize("config", CONFIGS)
def test_shapes_and_loss(config):
    torch.manual_seed(0)
    model = Llama(config)
    x = torch.randint(0, config.vocab_size, (2, config.seq_len))
    assert model(x).shape == (2, config.seq_len, config.vocab_size)
    loss = model(x, x)
    assert loss.ndim == 0 and math.isfinite(loss.item())
    with pytest.raises(Exception, match="exceeds the model's context"):
        model(torch.zeros(1, config.seq_len + 1, dtype=torch.long))


def test_rope_depends_only_on_relative_position():
    hd = 16
    cos, sin = rope_tables(hd, 64, 10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(m, n):
        return float((apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-5)
    assert score(40, 0) == pytest.approx(score(50, 10), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 4), abs=1e-3)
    # position 0 is the identity
    assert torch.allclose(apply_rope(q, cos[:1], sin[:1]), q)


def _reference_attention(block, x, cos, sin):
    """Multi-head attention written out: kv heads repeated, explicit causal softmax."""
    b, t, _ = x.shape
    h, kvh, hd = block.n_heads, block.n_kv_heads, block.head_dim
    q = block.wq(x).view(b, t, h, hd).transpose(1, 2)
    k = block.wk(x).view(b, t, kvh, hd).transpose(1, 2).repeat_interleave(h // kvh, dim=1)
    v = block.wv(x).view(b, t, kvh, hd).transpose(1, 2).repeat_interleave(h // kvh, dim=1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return block.wo((F.softmax(s, -1) @ v).transpose(1, 2).reshape(b, t, -1))


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[2]])
def test_gqa_matches_mha_reference(config):
    torch.manual_seed(0)
    model = Llama(config)
    block = model.layers[0]
    x = torch.randn(2, config.seq_len, config.d_model)
    cos, sin = model.rope_cos, model.rope_sin
    assert torch.allclose(block.attention(x, cos, sin), _reference_attention(block, x, cos, sin), atol=1e-5)


def test_gqa_with_shared_kv_equals_mha():
    """A GQA model whose kv heads are copied into an MHA model computes the same logits."""
    torch.manual_seed(0)
    gqa_cfg = CONFIGS[0]
    mha_cfg = ModelConfig(**{**gqa_cfg.to_dict(), "n_kv_heads": gqa_cfg.n_heads})
    gqa, mha = Llama(gqa_cfg), Llama(mha_cfg)
    state = gqa.state_dict()
    rep = gqa_cfg.n_heads // gqa_cfg.n_kv_heads
    for i in range(gqa_cfg.n_layers):
        for name in ("wk", "wv"):
            w = state[f"layers.{i}.{name}.weight"].view(gqa_cfg.n_kv_heads, gqa_cfg.head_dim, -1)
            state[f"layers.{i}.{name}.weight"] = w.repeat_interleave(rep, dim=0).reshape(gqa_cfg.d_model, -1)
    mha.load_state_dict(state)
    x = torch.randint(0, gqa_cfg.vocab_size, (2, gqa_cfg.seq_len))
    assert torch.allclose(gqa(x), mha(x), atol=1e-5)


def test_init_scales_residual_projections():
    model = Llama(ModelConfig(vocab_size=512, d_model=256, n_layers=8, n_heads=4, n_kv_heads=4, d_ff=512))
    assert float(model.layers[0].wq.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(model.layers[0].wo.weight.detach().std()) == pytest.approx(0.02 / 4, rel=0.05)


def test_cosine_schedule_values():
    peak, total, warm = 1e-3, 101, 10
    assert lr_at(0, total, peak, warm) == pytest.approx(peak / warm)
    assert lr_at(warm - 1, total, peak, warm) == pytest.approx(peak)
    assert lr_at(warm, total, peak, warm) == pytest.approx(peak)
    assert lr_at(total - 1, total, peak, warm) == pytest.approx(0.1 * peak, rel=1e-12)  # min LR at the last step
    mid = warm + (total - 1 - warm) / 2
    assert lr_at(int(mid), total, peak, warm) == pytest.approx(0.55 * peak, rel=0.02)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_schedule_values(shape):
    peak, total = 1e-3, 100
    lrs = [lr_at(s, total, peak, 5, 0.1, "wsd", 0.2, shape) for s in range(total)]
    assert lrs[50] == peak and lrs[79] == peak
    assert lrs[-1] == pytest.approx(0.1 * peak, rel=1e-12)
    assert all(a >= b for a, b in zip(lrs[79:], lrs[80:], strict=False))


def test_default_lr_and_batch_follow_deepseek():
    lr, batch = default_lr_and_batch(1e20)
    assert lr == pytest.approx(0.3118 * 1e20**-0.125)
    assert batch == pytest.approx(0.2920 * 1e20**0.3271)
    assert default_lr_and_batch(1e12) == (3e-3, 4096.0)


@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_pytorch_value_and_gradient(weighted):
    torch.manual_seed(0)
    logits = torch.randn(37, 50, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    weights = (torch.rand(37) > 0.4).double() if weighted else None
    ours = cross_entropy(logits, targets, weights)
    (g_ours,) = torch.autograd.grad(ours * 3.0, logits)
    losses = F.cross_entropy(logits, targets, reduction="none")
    ref = losses.mean() if weights is None else (losses * weights).sum() / weights.sum()
    (g_ref,) = torch.autograd.grad(ref * 3.0, logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    if weighted:  # masked-out rows get no gradient at all
        assert g_ours[weights == 0].abs().max() == 0


def test_bf16_autocast_training_step_tracks_fp32():
    """bf16 on a CPU (attention and rotary embeddings kept in fp32, projections cast once): the loss and the
    gradients of one step agree with fp32's to bf16's precision."""
    config = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=160, seq_len=32)
    torch.manual_seed(0)
    model = Llama(config)
    x = torch.randint(0, 128, (4, 33))
    grads = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        grads[precision] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    (l32, g32), (l16, g16) = grads["fp32"], grads["bf16"]
    assert l16 == pytest.approx(l32, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(g16, g32, dim=0) > 0.99
