"""The C training step (flopwise/training/step.c): the same loss and gradients as the PyTorch model, in every
build and thread count; chosen by measurement, remembered, and left cleanly where it cannot be built."""

import json
import math
import os
import platform
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
from flopwise.training import native, probe, registry
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
@pytest.mark.parametrize("passes", [0, 2], ids=["one-pass", "2-seqs-a-pass"])
def test_loss_and_gradients_equal_autograds(shape, threads, passes):
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
    torch.set_num_threads(threads)  # the step splits 5 sequences 2 + 3 between two threads (passes: 2; 2 + 1)
    try:
        got = NativeTrainStep(model, seqs_per_pass=passes).step(x, y)
    finally:
        torch.set_num_threads(before)
    assert got == pytest.approx(loss.item(), rel=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, want[name], rtol=1e-4, atol=1e-6 * want[name].abs().max()), name


@pytest.mark.parametrize("shape", SHAPES, ids=["d16-tied", "d64-gqa-untied", "d48-t77", "d24"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_the_forward_alone_gives_the_steps_loss_and_leaves_the_gradients(shape, threads, bf16):
    """The evaluation's loss (forward only) is the step's own to the bit and autograd's forward in fp32 (in bf16,
    within bf16's rounding); the gradients accumulated so far stay as they were."""
    if bf16 and not native.has_bf16():
        pytest.skip("no AVX512_BF16 here")
    model = _model(shape)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, shape["vocab_size"], (5, shape["seq_len"]), generator=g)
    y = torch.randint(0, shape["vocab_size"], (5, shape["seq_len"]), generator=g)
    with torch.no_grad():
        want = model(x, y).item()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        c = NativeTrainStep(model, bf16=bf16)
        c.step(x[:3], y[:3])  # gradients of another batch, which the forward must not touch
        grads = [p.grad.clone() for p in model.parameters()]
        got = c.loss(x, y)
        assert [torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True)] == [True] * len(grads)
        assert got == c.step(x, y)
    finally:
        torch.set_num_threads(before)
    assert got == pytest.approx(want, rel=2e-3 if bf16 else 1e-6)
    with pytest.raises(FlopwiseError, match="outside the model's vocabulary"):
        c.loss(x, torch.full_like(y, shape["vocab_size"]))


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


def test_processes_building_one_source_at_once_compile_it_once(tmp_path):
    """A sweep's workers start while the parent builds the C step: a process that finds a build under way waits for
    it and loads it, rather than compiling the same source again (the compiler here takes 2 s a build)."""
    log, cc, source = tmp_path / "compiles", tmp_path / "cc", tmp_path / "one.c"
    real = shutil.which("cc") or shutil.which("gcc")
    if real is None:
        pytest.skip("no C compiler")
    cc.write_text(f'#!/bin/sh\ncase "$*" in *-shared*) echo $PPID >> {log}; sleep 2;; esac\nexec {real} "$@"\n')
    cc.chmod(0o755)
    source.write_text("int one(void) { return 1; }\n")
    code = (f"from pathlib import Path; from flopwise.cbuild import load; "
            f"print(load(Path({str(source)!r}), 'one').one())")
    env = {**os.environ, "CC": str(cc), "FLOPWISE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    assert [p.communicate(timeout=120)[0] for p in procs] == ["1\n", "1\n"]
    assert len(set(log.read_text().split())) == 1  # the compiler ran for one process (each flags tried, once)


def _tiny_run(bundled, tmp_path, name, **kw):
    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=96,
                     seq_len=64, tie_embeddings=True)
    tc = TrainConfig(**{**dict(n_tokens=64 * 8 * 12, batch_tokens=64 * 8, micro_batch=4, eval_every=6,
                               eval_windows=4, final_eval_windows=8, log_every=1), **kw})
    return new_run(tmp_path / name, mc, tc, bundled)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_run_through_the_c_step_tracks_pytorch_and_records_its_choice(bundled, tmp_path, monkeypatch, precision):
    """Where auto picks the C step, the run trains it (two micro-batches a step, accumulated) with the C update,
    follows PyTorch's run in the same precision with the same seed (fp32 to 1e-4; bf16 to bf16's rounding), and
    records the choice in speed.json and final.json."""
    if precision == "bf16" and not native.has_bf16():
        pytest.skip("no AVX512_BF16 here")
    monkeypatch.setattr(trainer_module, "faster_kernel", lambda *a: ("c", precision))
    updates = []

    class Counted(native.NativeUpdate):
        def step(self, clip=0.0):
            updates.append(clip)
            return super().step(clip)

    monkeypatch.setattr(trainer_module, "NativeUpdate", Counted)
    eager = train(_tiny_run(bundled, tmp_path, "eager", precision=precision, compile="off"), quiet=True)
    assert not updates  # PyTorch's run keeps torch's optimizers
    lines = []
    run = _tiny_run(bundled, tmp_path, "c")
    c = train(run, log=lines.append)
    assert updates == [1.0] * 12  # and the C step's run clips and steps in C, every step
    assert (eager["kernel"], c["kernel"], c["precision"], c["compiled"]) == ("torch", "c", precision, False)
    assert json.loads((run / "speed.json").read_text()) == {"precision": precision, "compile": False, "kernel": "c",
                                                             "passes": 0}  # micro-batch 4 of 64 tokens: one pass
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
    monkeypatch.setattr(probe, "native_best_rates", lambda shape, th, mb, ps: measured.extend(ps) or
                        {p: c_rates[p] for p in ps})
    monkeypatch.setattr(probe, "pick_precision", lambda p, *a: "fp32" if p == "auto" else p)
    monkeypatch.setattr(probe, "eager_best_rates", lambda shape, th, mb, ps: measured.append(ps) or {ps[0]: 1e9})
    shape = tuple(sorted(SHAPES[0].items()))
    assert probe.faster_kernel.__wrapped__(shape, 8, 1, "auto") == ("c", "bf16")
    assert measured == ["fp32", "bf16", ("fp32",)]  # PyTorch at the precision it would train in
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
    assert registry.read()["kernel"] == {}


def test_the_c_steps_sequences_a_pass_are_measured_once_and_remembered(tmp_path, monkeypatch):
    """c_step_passes: a pass over PASS_TOKENS tokens a thread against one over the whole share, the faster kept in
    compiled.json (a later process reads it); not measured where a thread's share is no larger; bad values ignored."""
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    measured = []
    seconds = [1.0, 0.9]  # one pass, passes of 2
    monkeypatch.setattr(probe, "_pass_seconds", lambda shape, th, mb, p, n: measured.append(n) or tuple(seconds))
    shape = tuple(sorted(SHAPES[0].items()))  # seq_len 128: 2 sequences a pass
    assert probe.c_step_passes.__wrapped__(shape, 12, 1, "bf16") == 2 and measured == [2]
    assert probe.c_step_passes.__wrapped__(shape, 12, 1, "bf16") == 2 and len(measured) == 1
    seconds[1] = 0.99  # faster, but within the margin
    assert probe.c_step_passes.__wrapped__(shape, 12, 2, "bf16") == 0  # two threads: measured afresh
    assert probe.c_step_passes.__wrapped__(shape, 4, 2, "bf16") == 0 and len(measured) == 2  # shares of 2
    saved = json.loads((tmp_path / "compiled.json").read_text())
    assert sorted(saved["passes"].values()) == [0, 2]
    saved["passes"] = {k: "2" for k in saved["passes"]}
    (tmp_path / "compiled.json").write_text(json.dumps(saved))
    assert registry.read()["passes"] == {}


def test_the_c_steps_rate_is_remembered_for_the_next_process(tmp_path, monkeypatch):
    """native_rate measures once per machine (a sweep's ETA then reads compiled.json instead of training a few steps
    of each shape); a remembered rate is not used where the step no longer builds."""
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(probe, "_measure_rate", lambda *a, **k: measured.append(k["seqs_per_pass"]) or 4e9)
    monkeypatch.setattr(probe, "_RATES", {})
    assert probe.native_rate(SHAPES[0], 1, 8, "fp32", 2) == 4e9 and measured == [2]
    monkeypatch.setattr(probe, "_RATES", {})  # a new process
    assert probe.native_rate(SHAPES[0], 1, 8, "fp32", 2) == 4e9 and measured == [2]
    assert probe.native_rate(SHAPES[0], 1, 8, "fp32", 0) == 4e9 and measured == [2, 0]
    monkeypatch.setattr(probe, "_RATES", {})
    monkeypatch.setattr(probe, "builds", lambda: False)
    assert probe.native_rate(SHAPES[0], 1, 8, "fp32", 2) is None


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


# ---- the C update: clipping, AdamW and Muon in one call ----

def _optimizers(model: Llama, lr: float = 3e-3):
    return trainer_module.make_optimizer(model, TrainConfig(n_tokens=1, optimizer="muon"), lr)


def _random_grads(model: Llama, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(p.shape, generator=gen) for p in model.parameters()]


@pytest.mark.parametrize("clip, width", [(0.0, 32), (1.0, 32), (1e-3, 32), (0.0, 80), (0.0, 36)],
                         ids=["no-clip", "clip-loose", "clip-binding", "no-clip-d80", "no-clip-d36"])
def test_the_c_update_steps_as_torchs_clipping_adamw_and_muon(clip, width):
    """Three steps of the C update against clip_grad_norm_ and the optimizers' own step(), fed the same gradients:
    AdamW's updates and every state to a few ulps (without clipping, on x86-64 against torch's fused AdamW, the
    trainer's, to the bit where a tensor is whole 16-float vectors); Muon's (Newton-Schulz in bf16 as torch's)
    within bf16's rounding (bit for bit on the CPUs measured without clipping; clipping's scale, summed in another
    order, can differ by an ulp); the returned norm is torch's total norm, and the gradients are zeroed after. At
    d_model 80 Newton-Schulz's symmetric products span three 32-column panels, two of them mirrored; at 36 the
    norms' gains end in a partial vector."""
    shape = dict(SHAPES[1], d_model=width, n_heads=2, n_kv_heads=1, d_ff=3 * width)
    want, got = _model(shape), _model(shape)
    ow, og = _optimizers(want), _optimizers(got)
    update = native.NativeUpdate(list(og.optimizers.values()))
    muon = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    # torch's fused AdamW kernel's roundings are its x86-64 build's (its FMAs): elsewhere a few ulps
    exact = not clip and platform.machine() in ("x86_64", "AMD64") and ow.optimizers["adamw"].defaults.get("fused")
    for step in range(3):
        grads = _random_grads(want, step, scale=0.05)
        for model in (want, got):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
        before = [p.detach().clone() for p in want.parameters()]
        norm = torch.nn.utils.clip_grad_norm_(want.parameters(), clip if clip else float("inf"))
        ow.step()
        assert update.step(clip) == pytest.approx(float(norm), rel=1e-6)
        assert all(not p.grad.any() for p in got.parameters())
        for (name, a), b, start in zip(want.named_parameters(), got.parameters(), before, strict=True):
            moved = (a - start).detach()
            if name.split(".")[-2] in muon:  # a bf16 rounding flipped early in the iteration moves the rest
                atol = 5e-2 * float(moved.abs().max())
            else:  # a few ulps of the parameters
                atol = 4e-7 * float(start.abs().max())
                if exact and a.numel() % 16 == 0:  # torch's scalar remainder rounds in its own way
                    assert torch.equal(b, a), name
            assert torch.allclose((b - start).detach(), moved, rtol=0, atol=atol), name
    for kind, state in ow.state_dict().items():
        for i, tensors in state["state"].items():
            for name, t in tensors.items():  # a few ulps of each tensor's largest entry (fused sums round alike)
                mine = og.state_dict()[kind]["state"][i][name]
                assert torch.allclose(mine, t, rtol=1e-6, atol=1e-6 * float(t.abs().max())), name
                if exact and kind == "adamw" and t.numel() % 16 == 0:
                    assert torch.equal(mine, t), name


def _two_c_steps_saved(path, clip: float):
    """A model, its optimizers and their C update after two steps of random gradients, saved to ``path``."""
    model = _model(SHAPES[0])
    opts = _optimizers(model)
    update = native.NativeUpdate(list(opts.optimizers.values()))
    for step in range(2):
        for p, g in zip(model.parameters(), _random_grads(model, step), strict=True):
            p.grad = g
        update.step(clip)
    torch.save({"model": model.state_dict(), "opt": opts.state_dict()}, path)
    return model, opts, update


def test_the_c_updates_state_is_torchs_own(tmp_path):
    """The state the C update leaves is torch's own: saved after two C steps and loaded into fresh optimizers, a third
    step under torch matches a third C step from the same checkpoint."""
    _two_c_steps_saved(tmp_path / "ckpt.pt", 1.0)
    results = []
    for use_c in (True, False):
        ckpt = torch.load(tmp_path / "ckpt.pt")  # each its own: optimizers update the loaded state in place
        m = _model(SHAPES[0])
        m.load_state_dict(ckpt["model"])
        o = _optimizers(m)
        o.load_state_dict(ckpt["opt"])
        for p, g in zip(m.parameters(), _random_grads(m, 2), strict=True):
            p.grad = g
        if use_c:  # unclipped: clipping's norm, summed in another order, may flip a bf16 rounding in Muon
            native.NativeUpdate(list(o.optimizers.values())).step()
        else:
            o.step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=4e-7 * float(b.abs().max()))


def test_the_c_update_follows_a_state_loaded_under_it(tmp_path):
    """An update bound once follows its optimizers' state when load_state_dict replaces it (twice: a state dict
    freed and another made may share an address), as a fresh update from the same checkpoint does."""
    model, opts, update = _two_c_steps_saved(tmp_path / "ckpt.pt", 0.0)
    update.step()  # a step the checkpoint does not hold, undone by the loads below
    results = []
    for same in (True, False):
        ckpt = torch.load(tmp_path / "ckpt.pt")
        if same:
            m, o = model, opts
        else:
            m = _model(SHAPES[0])
            o = _optimizers(m)
        m.load_state_dict(ckpt["model"])
        for _ in range(2 if same else 1):
            o.load_state_dict(torch.load(tmp_path / "ckpt.pt")["opt"])
        for p, g in zip(m.parameters(), _random_grads(m, 2), strict=True):
            p.grad = g
        (update if same else native.NativeUpdate(list(o.optimizers.values()))).step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_a_nan_logit_makes_the_loss_nan_in_every_build(monkeypatch):
    """A diverged model's NaN reaches the loss, through the vector softmax as through the portable one."""
    model = _model(SHAPES[1])
    with torch.no_grad():
        model.head.weight[3] = float("nan")
    x = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    builds = [native.library(flags) for flags in ((), ("-mno-avx512f",))]
    for flags, lib in zip(((), ("-mno-avx512f",)), builds, strict=True):
        monkeypatch.setattr(native, "library", lambda lib=lib: lib)
        model.zero_grad(set_to_none=True)
        assert math.isnan(NativeTrainStep(model).step(x, x)), flags


def test_the_c_update_runs_muons_other_options():
    """Muon without Nesterov momentum and with the original learning-rate adjustment (sqrt(max(1, rows / cols))),
    one tall and one wide matrix, against torch.optim.Muon itself, to bf16's rounding."""
    gen = torch.Generator().manual_seed(0)
    want = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((96, 32), (32, 80))]
    got = [torch.nn.Parameter(p.detach().clone()) for p in want]
    kw = dict(lr=0.02, weight_decay=0.1, nesterov=False, adjust_lr_fn="original")
    ow, og = torch.optim.Muon(want, **kw), torch.optim.Muon(got, **kw)
    update = native.NativeUpdate([og])
    for _ in range(2):
        for a, b in zip(want, got, strict=True):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        before = [p.detach().clone() for p in want]
        ow.step()
        update.step()
        for a, b, start in zip(want, got, before, strict=True):
            moved = (a - start).detach()
            assert torch.allclose((b - start).detach(), moved, rtol=0, atol=2e-2 * float(moved.abs().max()))


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["d16-tied", "d64-gqa-untied"])
def test_bf16_passes_change_only_the_order_of_the_sums(shape):
    """bf16 products, two threads, the weights packed once a call and shared (grouped keys and values, an untied
    head): two sequences a pass against one pass over each thread's share give the same loss and gradients to fp32's
    rounding."""
    if not native.has_bf16():
        pytest.skip("no AVX512_BF16 here")
    model = _model(shape)
    x = torch.randint(0, shape["vocab_size"], (7, shape["seq_len"]), generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for passes in (0, 2):
            model.zero_grad(set_to_none=True)
            loss = NativeTrainStep(model, bf16=True, seqs_per_pass=passes).step(x, x.roll(1, dims=1))
            results.append((loss, [p.grad.clone() for p in model.parameters()]))
    finally:
        torch.set_num_threads(before)
    (la, ga), (lb, gb) = results
    assert la == pytest.approx(lb, rel=1e-6)
    for a, b in zip(ga, gb, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_the_c_update_refuses_what_it_does_not_run():
    model = _model(SHAPES[0])
    for opt, why in ((torch.optim.SGD(model.parameters(), lr=0.1), "not SGD"),
                     (torch.optim.AdamW(model.parameters(), amsgrad=True), "without amsgrad")):
        with pytest.raises(NativeUnavailable, match=why):
            native.NativeUpdate([opt])
    big = torch.nn.Parameter(torch.zeros(native.UPDATE_MAX_ELEMENTS // 64 + 1, 64))
    with pytest.raises(NativeUnavailable, match="matrices of up to"):
        native.NativeUpdate([torch.optim.Muon([big])])
