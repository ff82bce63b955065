"""The C training step (flopwise/training/step.c): the same loss and gradients as the PyTorch model, in every
build and thread count; chosen by measurement, remembered, and left cleanly where it cannot be built."""

import json
import shutil

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
from flopwise.training.trainer import train

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")

SHAPES = [  # tied and untied, grouped-query attention, contexts that are not a multiple of the C step's blocks
    dict(vocab_size=1024, d_model=16, n_layers=2, n_heads=1, n_kv_heads=1, d_ff=48, seq_len=128, tie_embeddings=True),
    dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, seq_len=40,
         tie_embeddings=False),
    dict(vocab_size=300, d_model=48, n_layers=1, n_heads=3, n_kv_heads=3, d_ff=128, seq_len=77, tie_embeddings=True),
]


def _model(shape: dict, seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    model = Llama(ModelConfig(**shape))
    with torch.no_grad():
        for p in model.parameters():  # away from the initialisation's ones and small normals: every path matters
            p += 0.05 * torch.randn_like(p)
    return model


@pytest.mark.parametrize("shape", SHAPES, ids=["d16-tied", "d64-gqa-untied", "d48-t77"])
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


def test_a_run_through_the_c_step_tracks_pytorch_fp32_and_keeps_its_choice(bundled, tmp_path, monkeypatch):
    """Where auto picks the C step, the run trains it (two micro-batches a step, accumulated), follows PyTorch's fp32
    run with the same seed, and records the choice in speed.json and final.json; a resume keeps it."""
    monkeypatch.setattr(trainer_module, "faster_kernel", lambda *a: "c")
    eager = train(_tiny_run(bundled, tmp_path, "eager", precision="fp32", compile="off"), quiet=True)
    lines = []
    run = _tiny_run(bundled, tmp_path, "c")
    c = train(run, log=lines.append)
    assert (eager["kernel"], c["kernel"], c["precision"], c["compiled"]) == ("torch", "c", "fp32", False)
    assert json.loads((run / "speed.json").read_text()) == {"precision": "fp32", "compile": False, "kernel": "c"}
    assert ", C step on cpu" in lines[0]
    want = [json.loads(x) for x in (tmp_path / "eager" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got] == [m["step"] for m in want]
    for a, b in zip(got, want, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    assert c["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-4)


def test_where_the_c_step_cannot_be_built_runs_train_with_pytorch(bundled, tmp_path, monkeypatch):
    """No compiler: auto measures nothing in C and trains PyTorch; a run that chose the C step and resumes on such
    a machine says so in one line and trains PyTorch in the same precision."""
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_FAILED", None)
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    monkeypatch.delenv("CC", raising=False)
    assert probe.native_rate(SHAPES[0], 1, 2) is None
    assert probe.faster_kernel.__wrapped__(tuple(sorted(SHAPES[0].items())), 2, 1, "auto") == "torch"
    run = _tiny_run(bundled, tmp_path, "r", n_tokens=64 * 8 * 2)
    (run / "speed.json").write_text(json.dumps({"precision": "fp32", "compile": False, "kernel": "c"}))
    lines = []
    final = train(run, log=lines.append)
    assert final["kernel"] == "torch" and final["precision"] == "fp32"
    assert [x for x in lines if x.startswith("note:")] == [
        "note: no C compiler (cc, gcc or clang; or set CC); training with PyTorch (slower)"]


def test_the_kernel_choice_is_measured_once_and_remembered(tmp_path, monkeypatch):
    """faster_kernel: the C step's measured rate against PyTorch eager's, saved in compiled.json under the C source's
    digest; a later process (or a second worker) reads it instead of measuring; an unknown value is ignored."""
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(probe, "native_rate", lambda *a, **k: measured.append("c") or 2e9)
    monkeypatch.setattr(probe, "training_rate", lambda *a, **k: measured.append("torch") or 1e9)
    shape = tuple(sorted(SHAPES[0].items()))
    assert probe.faster_kernel.__wrapped__(shape, 8, 1, "auto") == "c" and measured == ["c", "torch"]
    assert probe.faster_kernel.__wrapped__(shape, 8, 1, "auto") == "c" and len(measured) == 2
    saved = json.loads((tmp_path / "compiled.json").read_text())["kernel"]
    assert list(saved.values()) == ["c"] and native.SOURCE_DIGEST in next(iter(saved))
    monkeypatch.setattr(probe, "native_rate", lambda *a, **k: 0.5e9)  # slower at another micro-batch
    assert probe.faster_kernel.__wrapped__(shape, 16, 1, "auto") == "torch"
    saved = json.loads((tmp_path / "compiled.json").read_text())
    saved["kernel"] = {k: "fast" for k in saved["kernel"]}
    (tmp_path / "compiled.json").write_text(json.dumps(saved))
    assert probe._registry()["kernel"] == {}


def test_the_c_step_is_not_used_for_adapters_or_compile_off(bundled, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module, "faster_kernel", lambda *a: "c")
    assert train(_tiny_run(bundled, tmp_path, "off", n_tokens=64 * 8 * 2, compile="off"), quiet=True)["kernel"] == \
        "torch"
    model = _model(SHAPES[0])
    apply_lora(model, 4, 8.0, ("wq", "wv"))
    with pytest.raises(NativeUnavailable, match="without adapters"):
        NativeTrainStep(model)
