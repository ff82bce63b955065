import json
import os
import subprocess
import sys

import pytest

from flopwise.laws.flops import Shape, n_params_total, training_flops_per_token
from flopwise.laws.law import REGISTRY
from flopwise.laws.plan import make_plan

ENV = {**os.environ, "COLUMNS": "200"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "flopwise", *args], capture_output=True, text=True, env=ENV,
                          timeout=120)


def test_plan_json_keys_and_values():
    p = make_plan(1e21, "chinchilla")
    n, d = REGISTRY["chinchilla"].optimal(1e21)
    assert p["n_params"] == pytest.approx(n) and p["n_tokens"] == pytest.approx(d)
    assert p["tokens_per_param"] == pytest.approx(d / n)
    assert p["loss"] == pytest.approx(float(REGISTRY["chinchilla"].loss(n, d)))
    shape = Shape.from_dict(p["shape"])
    assert p["shape"]["n_params_total"] == n_params_total(shape)
    assert abs(n_params_total(shape) / n - 1) < 0.05
    assert p["flops_exact"] == pytest.approx(training_flops_per_token(shape) * d)
    json.dumps(p)  # JSON-ready


def test_plan_exact_composes_with_a_device_cap_and_refuses_the_rest():
    from flopwise.errors import FlopwiseError

    p = make_plan(1e23, "chinchilla", device="rpi5", bits=4, exact_flops=True, vocab_size=32000, seq_len=2048)
    assert p["device"]["capped"] and p["notes"][0].startswith("N and D minimise the law under the exact FLOP count")
    assert p["flops_exact"] == pytest.approx(1e23, rel=0.02)  # the capped model spends the budget by exact count
    # 6ND is of the N and D shown (below the budget here), and time is the exact count at the MFU
    assert p["flops_6nd"] == pytest.approx(6 * p["n_params"] * p["n_tokens"]) and p["flops_6nd"] < 1e23
    c = p["compute"]
    assert c["hours"] == pytest.approx(p["flops_exact"] / (c["mfu"] * 989e12 * c["n_gpus"]) / 3600, rel=0.01)
    for extra in ({"unique_tokens": 1e9}, {"inference_tokens": 1e12}):
        with pytest.raises(FlopwiseError, match="--exact and --.*-tokens cannot be combined"):
            make_plan(1e21, exact_flops=True, **extra)
    r = run_cli("plan", "--flops", "1e21", "--exact", "--unique-tokens", "1e9")
    assert r.returncode == 2 and r.stderr.strip().endswith("plan with one of them") and not r.stdout


def test_plan_device_caps_params():
    p = make_plan(1e23, "chinchilla", device="rpi5", bits=4)
    assert p["device"]["capped"] and p["n_params"] == pytest.approx(8e9 * 0.5 * 8 / 4.5)
    assert 6 * p["n_params"] * p["n_tokens"] == pytest.approx(1e23)
    assert p["device"]["decode_tokens_per_s"] == pytest.approx(17.1e9 / (p["n_params"] * 4.5 / 8))
    assert any("caps" in w for w in p["warnings"])


def test_plan_allocation_only_law_has_no_loss():
    p = make_plan(1.21e20, "chinchilla-approach1")
    assert p["loss"] is None and p["tradeoff"] == []
    assert p["n_params"] == pytest.approx(1e9, rel=0.03)


def test_cli_plan_json():
    r = run_cli("plan", "--flops", "1e21", "--law", "epoch", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    for key in ("law", "flops", "n_params", "n_tokens", "tokens_per_param", "loss", "shape"):
        assert key in p
    assert p["law"] == "epoch"


def test_cli_plan_gpu_hours_and_table():
    r = run_cli("plan", "--gpu", "h100", "--gpus", "8", "--hours", "24", "--inference-tokens", "2e12")
    assert r.returncode == 0, r.stderr
    for word in ("parameters N", "tokens / parameter", "expected loss", "cost", "energy", "bigger is not better",
                 "lifetime FLOPs"):
        assert word in r.stdout


def test_cli_version_and_laws():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("flopwise ")
    r = run_cli("laws")
    assert r.returncode == 0 and "Hoffmann" in r.stdout and "Besiroglu" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--flops", "0"], "--flops must be a positive number"),
    (["--flops", "-1e20"], "--flops must be a positive number"),
    (["--flops", "nan"], "--flops must be a positive number"),
    (["--flops", "1e36"], "check the exponent"),
    (["--gpu", "h1000", "--hours", "3"], "did you mean h100"),
    (["--flops", "1e21", "--dollars", "500"], "give one budget"),
    ([], "no budget given"),
    (["--flops", "1e21", "--law", "nope.json"], "unknown law"),
    (["--flops", "1e21", "--unique-tokens", "1e9", "--law", "kaplan"], "allocation only"),
    (["--flops", "1e21", "--max-memory", "lots"], "as a size"),
])
def test_cli_bad_input_one_line_exit_2(args, message):
    r = run_cli("plan", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_law_file_missing_keys(tmp_path):
    path = tmp_path / "law.json"
    path.write_text(json.dumps({"form": "chinchilla", "E": 1.7}))
    r = run_cli("plan", "--flops", "1e21", "--law", str(path))
    assert r.returncode == 2 and "missing A, B, alpha, beta" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args,msg", [
    (["serve", "any-run", "--port", "70000"], "--port must be between 1 and 65535, got 70000"),
    (["serve", "any-run", "--max-queue", "0"], "--max-queue must be at least 1"),
    (["generate", "any-run", "--threads", "-2"], "--threads must be 0"),
    (["generate", "any-run", "--backend", "vllm"], "--backend must be flopwise or llama.cpp, got 'vllm'"),
    (["chat", "any-run", "--compile", "yes"], "--compile must be auto, on or off, got 'yes'"),
    (["serve", "any-run", "--compile", "maybe"], "--compile must be auto, on or off, got 'maybe'"),
])
def test_serving_options_are_checked_before_loading(args, msg):
    r = run_cli(*args)
    assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
