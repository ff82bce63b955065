import json

from flopwise.laws.hardware import get_gpu
from flopwise.train.probe import probe, save_probe


def test_probe_measures_and_feeds_local_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    r = probe("cpu", size=256, repeats=2)
    assert r["fp32_flops"] > 1e8 and r["bf16_flops"] > 1e8 and r["bandwidth_bytes_per_s"] > 1e8
    path = save_probe(r)
    assert json.loads(open(path).read())["bf16_flops"] == r["bf16_flops"]
    assert get_gpu("local").peak_flops == r["bf16_flops"]
