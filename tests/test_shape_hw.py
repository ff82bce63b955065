import numpy as np
import pytest

from flopwise.errors import FlopwiseError
from flopwise.laws import hardware
from flopwise.laws.flops import n_params
from flopwise.laws.shape import suggest_shape, target_aspect_ratio


@pytest.mark.parametrize("convention", ["total", "non_embedding"])
def test_shape_hits_target_from_1e5_to_1e11(convention):
    for target in np.logspace(5, 11, 25):
        s = suggest_shape(float(target), convention)
        assert abs(n_params(s, convention) / target - 1) <= 0.05, (target, s)
        assert s.d_model % 32 == 0 and s.d_ff % 32 == 0
        if s.d_model >= 1024:
            assert s.d_model % 256 == 0 and s.d_ff % 256 == 0
        assert 16 <= s.d_model / s.n_layers <= 256
        assert s.n_heads % s.n_kv_heads == 0


def test_shape_follows_aspect_rule_and_vocab():
    s = suggest_shape(7e9, vocab_size=32000)
    assert 0.6 < (s.d_model / s.n_layers) / target_aspect_ratio(7e9) < 1.6
    assert s.n_kv_heads < s.n_heads  # GQA at this size
    assert suggest_shape(1e6, vocab_size=4096, seq_len=256).seq_len == 256


def test_shape_impossible_target_names_the_fix():
    with pytest.raises(FlopwiseError, match="smaller --vocab-size"):
        suggest_shape(1e5, vocab_size=32000)


def test_gpu_budget_and_cost_round_trip():
    h100 = hardware.get_gpu("H100")
    flops = hardware.flops_from_gpu_hours(h100, 8, 24, 0.4)
    assert flops == pytest.approx(989e12 * 0.4 * 8 * 24 * 3600)
    c = hardware.cost_of(flops, h100, 8, 0.4)
    assert c["hours"] == pytest.approx(24) and c["gpu_hours"] == pytest.approx(192)
    assert c["dollars"] == pytest.approx(192 * h100.price_per_hour)
    assert c["kwh"] == pytest.approx(192 * 0.7 * 1.2)
    assert c["co2e_kg"] == pytest.approx(c["kwh"] * 0.4)
    assert hardware.flops_from_dollars(h100, 250, price_per_hour=2.5) == pytest.approx(989e12 * 0.4 * 100 * 3600)


def test_unknown_gpu_suggests_closest():
    with pytest.raises(FlopwiseError, match="did you mean h100"):
        hardware.get_gpu("h1000")
    with pytest.raises(FlopwiseError, match="did you mean rpi5"):
        hardware.get_device("rpi")


def test_every_preset_has_a_source():
    for g in hardware.GPUS.values():
        assert g.source and g.peak_flops > 1e13 and g.power_watts > 0
    for d in hardware.DEVICES.values():
        assert d.source and d.bandwidth_bytes_per_s > 1e9


def test_device_bounds():
    n = hardware.max_params_for_memory(4e9, 4)
    assert n == pytest.approx(4e9 * 8 / 4.5)
    # decode reads every weight once per token
    assert hardware.decode_tokens_per_s(1e9, 8, 17.1e9) == pytest.approx(17.1e9 / (1e9 * 8.5 / 8))
    with pytest.raises(FlopwiseError, match="--bits"):
        hardware.bits_per_weight(3)


def test_local_gpu_needs_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    with pytest.raises(FlopwiseError, match="flopwise hw probe"):
        hardware.get_gpu("local")
    (tmp_path / "hw.json").write_text('{"bf16_flops": 4e11, "bandwidth_bytes_per_s": 3e10}')
    assert hardware.get_gpu("local").peak_flops == 4e11
