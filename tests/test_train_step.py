"""The C training step (flopwise/training/step.c): the same loss and gradients as the PyTorch model, in every
build and thread count; chosen by measurement, remembered, and left cleanly where it cannot be built."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from flopwise.config import TrainConfig
from flopwise.errors import FlopwiseError
from flopwise.model.llama import Llama, ModelConfig
from flopwise.model.lora import apply_lora
from flopwise.run import new_run
from flopwise.training import native, probe
from flopwise.training import trainer as trainer_module
from flopwise.training.native import NativeTrainStep, NativeUnavailable
from flopwise.training.trainer import KILL_AT_STEP_ENV, train

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")

SHAPES = [  # tied and untied, grouped-query attention, contexts that are not a multiple of the C step's blocks
    dict(vocab_size=1024, d_model=16, n_layers=2, n_heads=1, n_kv_heads=1, d_ff=48, seq_len=128, tie_embeddings=True),
    dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, seq_len=40,
         tie_embeddings=False),
    dict(vocab_size=300, d_model=48, n_layers=1, n_heads=3, n_kv_heads=3, d_ff=128, seq_len=77, tie_embeddings=True),
    dict(vocab_size=1000, d_model=24, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=64, seq_len=32, tie_embeddings=False),
]


def _model(shape: dict, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(ModelConfig(**shape))
    with torch.no_grad():
        for p in model.parameters():  # away from the initialisation's ones and small normals: every path matters
            p += 0.05 * torch.randn_like(p)
    return model


@pytest.mark.parametrize("shape", SHAPES, ids=["d16-tied", "d64-gqa-untied", "d48-t77", "d24"])
@pytest.mark.parametrize("threads", [1, 2])
def test_loss_and_gradients_equal_autograds(shape, threads):
    model = _model(shape)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, shape["vocab_size"], (5, shape["seq_len"]), generator=g)
    y = torch.randint(0, shape["vocab_size"], (5, shape["seq_len"]), generator=g)
    loss = model(x, y)
    loss.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    if threads > 1:
        assert native.library().fw_build() & 1  # OpenMP: the split below is what runs
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the step splits 5 sequences 3 + 2 between two threads
    try:
        got = NativeTrainStep(model).step(x, y)
    finally:
        torch.set_num_threads(before)
    assert got == pytest.approx(loss.item(), rel=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], rtol=1e-4, atol=1e-6 * want[name].abs().max()), name


def test_gradients_accumulate_scaled_and_the_buffers_follow_zero_grad():
    """Two half micro-batches at scale 1/2 give the whole batch's gradient (gradient accumulation); after
    zero_grad(set_to_none=True) the next step starts from zero in the same buffers."""
    shape = SHAPES[0]
    model = _model(shape)
    x = torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(2))
    model(x, x).backward()
    whole = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    step = NativeTrainStep(model)
    step.step(x[:2], x[:2], 0.5)
    step.step(x[2:], x[2:], 0.5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, whole[name], rtol=1e-4, atol=1e-7), name
    buffers = [p.grad.data_ptr() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    step.step(x, x)
    assert [p.grad.data_ptr() for p in model.parameters()] == buffers
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, whole[name], rtol=1e-4, atol=1e-7), name


def test_bad_input_is_refused_in_one_line():
    model = _model(SHAPES[2])
    step = NativeTrainStep(model)
    x = torch.zeros(2, 77, dtype=torch.long)
    with pytest.raises(FlopwiseError, match="a token outside the model's vocabulary"):
        step.step(x, x + 300)
    with pytest.raises(FlopwiseError, match="sequence of 78 tokens exceeds the model's context 77"):
        step.step(torch.zeros(1, 78, dtype=torch.long), torch.zeros(1, 78, dtype=torch.long))


def test_a_workspace_past_half_the_memory_is_refused_before_it_is_touched(monkeypatch):
    """Linux overcommits: torch.empty of more than the machine has succeeds and the step's writes get the process
    killed, so the step refuses first, as an out-of-memory error (the trainer names the fix; measuring skips it)."""
    step = NativeTrainStep(_model(SHAPES[0]))
    monkeypatch.setattr(native, "available_memory", lambda: 1 << 20)
    x = torch.zeros(4, 128, dtype=torch.long)
    with pytest.raises(RuntimeError, match="can't allocate memory: the C training step's workspace for 4 x 128"):
        step.step(x, x)


def test_plain_and_avx2_builds_give_the_same_step(monkeypatch):
    """The tiles are written with GCC's vector extensions: the AVX-512, AVX2 and plain-C builds agree."""
    model = _model(SHAPES[1])
    x = torch.randint(0, 1000, (3, 40), generator=torch.Generator().manual_seed(3))
    results = []
    avx512 = "avx512f" in open("/proc/cpuinfo").read()
    builds = {flags: native.library(flags) for flags in ((), ("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2"))}
    for flags, lib in builds.items():
        assert bool(lib.fw_build() & 4) == (avx512 and not flags)
        monkeypatch.setattr(native, "library", lambda lib=lib: lib)
        model.zero_grad(set_to_none=True)
        loss = NativeTrainStep(model).step(x, x)
        results.append((loss, torch.cat([p.grad.flatten() for p in model.parameters()])))
    for loss, grad in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        assert torch.allclose(grad, results[0][1], rtol=1e-4, atol=1e-7)


def _tiny_run(bundled, tmp_path, name, **kw):
    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=96,
                     seq_len=64, tie_embeddings=True)
    tc = TrainConfig(**{**dict(n_tokens=64 * 8 * 12, batch_tokens=64 * 8, micro_batch=4, eval_every=6,
                               eval_windows=4, final_eval_windows=8, log_every=1), **kw})
    return new_run(tmp_path / name, mc, tc, bundled)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_through_the_c_step_tracks_pytorch_and_records_its_choice(bundled, tmp_path, monkeypatch, precision):
    """Where auto picks the C step, the run trains it (two micro-batches a step, accumulated), follows PyTorch's run
    in the same precision with the same seed (fp32 to 1e-4; bf16 to bf16's rounding), and records the choice in
    speed.json and final.json."""
    if precision == "bf16" and not native.has_bf16():
        pytest.skip("no AVX512_BF16 here")
    monkeypatch.setattr(trainer_module, "faster_kernel", lambda *a: ("c", precision))
    eager = train(_tiny_run(bundled, tmp_path, "eager", precision=precision, compile="off"), quiet=True)
    lines = []
    run = _tiny_run(bundled, tmp_path, "c")
    c = train(run, log=lines.append)
    assert (eager["kernel"], c["kernel"], c["precision"], c["compiled"]) == ("torch", "c", precision, False)
    assert json.loads((run / "speed.json").read_text()) == {"precision": precision, "compile": False, "kernel": "c"}
    assert f"{precision}, C step on cpu" in lines[0]
    want = [json.loads(x) for x in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got] == [m["step"] for m in want]
    rel = 1e-4 if precision == "fp32" else 2e-2
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel)
    assert c["val_loss"] == pytest.approx(eager["val_loss"], rel=rel)


def test_where_the_c_step_cannot_be_built_runs_train_with_pytorch(bundled, tmp_path, monkeypatch):
    """No compiler: auto measures nothing in C and trains PyTorch; a run that chose the C step and resumes on such
    a machine says so in one line and trains PyTorch in the same precision."""
    monkeypatch.setattr(native.library, "lib", None)
    monkeypatch.setattr(native.library, "failed", None)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.delenv("CC", raising=False)
    assert probe.native_rate(SHAPES[0], 1, 2) is None
    assert probe.faster_kernel.__wrapped__(tuple(sorted(SHAPES[0].items())), 2, 1, "auto") == ("torch", "auto")
    run = _tiny_run(bundled, tmp_path, "r", n_tokens=64 * 8 * 2)
    (run / "speed.json").write_text(json.dumps({"precision": "fp32", "compile": False, "kernel": "c"}))
    lines = []
    final = train(run, log=lines.append)
    assert final["kernel"] == "torch" and final["precision"] == "fp32"
    assert [x for x in lines if x.startswith("note:")] == [
        "note: no C compiler (cc, gcc or clang; or set CC); training with PyTorch (slower)"]


def test_the_kernel_choice_is_measured_once_and_remembered(tmp_path, monkeypatch):
    """faster_kernel: the C step's measured rates (fp32, and bf16 where the build has it) against PyTorch eager's,
    saved in compiled.json under the C source's digest; a later process (or a second worker) reads it instead of
    measuring; an unknown value is ignored."""
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    measured = []
    c_rates = {"fp32": 2e9, "bf16": 3e9}
    monkeypatch.setattr(probe, "has_bf16", lambda: True)
    monkeypatch.setattr(probe, "native_rate", lambda shape, th, mb, p: measured.append(p) or c_rates[p])
    monkeypatch.setattr(probe, "training_rate", lambda *a, **k: measured.append("torch") or 1e9)
    shape = tuple(sorted(SHAPES[0].items()))
    assert probe.faster_kernel.__wrapped__(shape, 8, 1, "auto") == ("c", "bf16")
    assert measured == ["fp32", "bf16", "torch"]
    assert probe.faster_kernel.__wrapped__(shape, 8, 1, "auto") == ("c", "bf16") and len(measured) == 3
    assert probe.faster_kernel.__wrapped__(shape, 8, 1, "fp32") == ("c", "fp32")  # --precision fp32: fp32 only
    saved = json.loads((tmp_path / "compiled.json").read_text())["kernel"]
    assert sorted(saved.values()) == ["c:bf16", "c:fp32"] and all(native.source_digest() in k for k in saved)
    c_rates.update(fp32=0.5e9, bf16=0.9e9)  # slower than PyTorch at another micro-batch
    assert probe.faster_kernel.__wrapped__(shape, 16, 1, "auto") == ("torch", "auto")
    wide = tuple(sorted({**SHAPES[0], "d_model": 768, "n_heads": 12, "n_kv_heads": 12}.items()))
    before = len(measured)
    assert probe.faster_kernel.__wrapped__(wide, 8, 1, "auto") == ("torch", "auto") and len(measured) == before
    saved = json.loads((tmp_path / "compiled.json").read_text())
    saved["kernel"] = {k: "fast" for k in saved["kernel"]}
    (tmp_path / "compiled.json").write_text(json.dumps(saved))
    assert probe._registry()["kernel"] == {}


def test_the_c_step_is_not_used_for_adapters_or_compile_off(bundled, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "faster_kernel", lambda *a: ("c", "fp32"))
    assert train(_tiny_run(bundled, tmp_path, "off", n_tokens=64 * 8 * 2, compile="off"), quiet=True)["kernel"] == \
        "torch"
    model = _model(SHAPES[0])
    apply_lora(model, 4, 8.0, ("wq", "wv"))
    with pytest.raises(NativeUnavailable, match="without adapters"):
        NativeTrainStep(model)


def test_a_smaller_openmp_team_than_planned_still_computes_every_sequence(tmp_path):
    """OMP_THREAD_LIMIT=1 with two torch threads: the step plans two chunks, one thread takes both, and the loss and
    gradients are autograd's."""
    script = (
        "import torch\n"
        "from flopwise.model.llama import Llama, ModelConfig\n"
        "from flopwise.training.native import NativeTrainStep\n"
        "torch.manual_seed(0)\n"
        f"m = Llama(ModelConfig(**{SHAPES[3]!r}))\n"
        "x = torch.randint(0, 1000, (4, 32))\n"
        "want = m(x, x).item()\n"
        "m(x, x).backward()\n"
        "ref = torch.cat([p.grad.flatten() for p in m.parameters()])\n"
        "torch.set_num_threads(2)\n"
        "m.zero_grad(set_to_none=True)\n"
        "got = NativeTrainStep(m).step(x, x)\n"
        "grad = torch.cat([p.grad.flatten() for p in m.parameters()])\n"
        "print(want, got, float((grad - ref).norm() / ref.norm()))\n")
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    want, got, grad_error = map(float, r.stdout.split())
    assert got == pytest.approx(want, rel=1e-6) and grad_error < 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=["d16-tied", "d64-gqa-untied", "d48-t77", "d24"])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_products_stay_within_bf16s_rounding_of_fp32(shape, threads):
    """bf16 (AVX512_BF16 builds): the loss and gradients move from fp32's by about bf16's rounding (PyTorch's bf16
    autocast moves them as far), and do move: the products really are bf16. Batch 5 gives odd product depths (5 x 77
    tokens), the narrow tiles (d16) and partial panels (d24, d48)."""
    if not native.has_bf16():
        pytest.skip("no AVX512_BF16 here")
    model = _model(shape)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, shape["vocab_size"], (5, shape["seq_len"]), generator=g)
    want = model(x, x).item()
    model(x, x).backward()
    fp32 = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = NativeTrainStep(model, bf16=True).step(x, x)
    finally:
        torch.set_num_threads(before)
    assert abs(got - want) < 2e-3 * want and got != pytest.approx(want, rel=1e-7)
    for name, p in model.named_parameters():
        assert (p.grad - fp32[name]).norm() <= 3e-2 * fp32[name].norm(), name


def test_a_bf16_choice_resumed_where_the_step_has_no_bf16_trains_pytorch_bf16(bundled, tmp_path, monkeypatch):
    monkeypatch.setattr(native, "has_bf16", lambda: False)
    run = _tiny_run(bundled, tmp_path, "r", n_tokens=64 * 8 * 2)
    (run / "speed.json").write_text(json.dumps({"precision": "bf16", "compile": False, "kernel": "c"}))
    lines = []
    final = train(run, log=lines.append)
    assert (final["kernel"], final["precision"]) == ("torch", "bf16")
    assert [x for x in lines if x.startswith("note:")] == [
        "note: the C training step's bf16 needs AVX512_BF16, which this CPU or compiler lacks; training with PyTorch "
        "(slower)"]


def test_a_killed_run_through_the_c_step_resumes_to_the_same_losses(bundled, tmp_path):
    """kill -9 mid-run, resume: the C step's losses equal an uninterrupted run's (the step is deterministic at a
    fixed thread count)."""
    straight, killed = (_tiny_run(bundled, tmp_path, name, n_tokens=64 * 8 * 30, ckpt_every=4, eval_every=10)
                        for name in ("straight", "killed"))
    for run in (straight, killed):  # the choice recorded before the first start: kept, as a resumed run keeps it
        (run / "speed.json").write_text(json.dumps({"precision": "fp32", "compile": False, "kernel": "c"}))
    expected = train(straight, quiet=True)
    assert expected["kernel"] == "c"
    proc = subprocess.run([sys.executable, "-m", "flopwise", "train", str(killed), "--quiet"],
                          env={**os.environ, KILL_AT_STEP_ENV: "13"}, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL and not (killed / "final.json").exists()
    r = subprocess.run([sys.executable, "-m", "flopwise", "train", str(killed), "--quiet"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    final = json.loads((killed / "final.json").read_text())
    assert final["kernel"] == "c" and final["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    lines = [[json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
             for run in (straight, killed)]
    assert lines[0] == pytest.approx(lines[1], rel=1e-6)
