import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flopwise.config import TrainConfig
from flopwise.errors import FlopwiseError
from flopwise.infer.generate import Engine, Sampling
from flopwise.laws.flops import training_flops_per_token
from flopwise.model.llama import Llama, ModelConfig
from flopwise.run import SETTING_UP, load_model, new_run, read_run_config
from flopwise.training.native import NativeTrainStep
from flopwise.training.trainer import KILL_AT_STEP_ENV, train

VENV_BIN = Path(sys.executable).parent


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "flopwise", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it), for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small(bundled, **kw):
    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=192,
                     seq_len=64, tie_embeddings=True)
    tc = dict(n_tokens=64 * 8 * 40, batch_tokens=64 * 8, micro_batch=4, ckpt_every=4, eval_every=10,
              eval_windows=8, final_eval_windows=16, log_every=1)
    tc.update(kw)
    return mc, TrainConfig(**tc)


@pytest.mark.slow  # 40 s: the autopilot's end-to-end test trains on real text too, in every run
def test_real_run_learns_english(bundled, tmp_path):
    train_ids = np.asarray(bundled.tokens("train"))
    p = np.bincount(train_ids, minlength=bundled.vocab_size) / len(train_ids)
    unigram = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    r = cli("train", "--data", bundled.path, "--n-params", "1e6", "--tokens", "8e5", "--seq-len", "128",
            "--out", tmp_path / "run", "--quiet")
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    final = json.loads((run / "final.json").read_text())
    for key in ("val_loss", "val_bpb", "n_params", "n_tokens", "flops", "epochs", "wall_seconds"):
        assert key in final
    assert final["val_loss"] < unigram - 1.0, (final["val_loss"], unigram)
    assert final["epochs"] == pytest.approx(final["n_tokens"] / bundled.meta["n_tokens_train"])
    # --precision and --compile auto were chosen at the first start and are what the run used (and a resume would)
    assert json.loads((run / "speed.json").read_text()) == {"precision": final["precision"],
                                                            "compile": final["compiled"], "kernel": final["kernel"]}
    assert final["precision"] in ("bf16", "fp32")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "tokens", "flops", "lr", "loss", "tok_per_s", "mfu"} <= set(lines[0])
    assert lines[-1]["tokens"] == final["n_tokens"] and "val_loss" in lines[-1]
    assert sorted(p.name for p in run.iterdir() if p.name != ".lock") == [
        "ckpt", "config.json", "final.json", "metrics.jsonl", "speed.json", "tokenizer.model"]
    # samples are English: most generated words occur in the training stories
    model = load_model(run)
    sp = bundled.tokenizer()
    # three stories, so that one that ends early (eos) still leaves words enough to judge
    text = " ".join(Engine(model, sp).generate(["Once upon a time", "One day", "The little dog"],
                                               Sampling(max_new_tokens=80, temperature=0.8, top_k=40, seed=0)))
    words = re.findall(r"[a-z]+", text.lower())
    known = set(re.findall(r"[a-z]+", Path(bundled.meta["sources"][0]).read_text().lower()))
    assert len(words) > 30 and np.mean([w in known for w in words]) > 0.85, text


def _losses(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [(m["step"], m["loss"], m.get("val_loss")) for m in map(json.loads, lines)]


def _same(a, b, rel):
    assert len(a) == len(b)
    for (s1, l1, v1), (s2, l2, v2) in zip(a, b, strict=True):
        assert s1 == s2 and l1 == pytest.approx(l2, rel=rel)
        assert (v1 is None) == (v2 is None) and (v1 is None or v1 == pytest.approx(v2, rel=rel))


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_after_kill9_matches_uninterrupted(bundled, tmp_path, optimizer):
    mc, tc = small(bundled, n_tokens=64 * 8 * 60, precision="fp32", optimizer=optimizer)
    straight = new_run(tmp_path / "straight", mc, tc, bundled)
    expected = train(straight, quiet=True)
    killed = new_run(tmp_path / "killed", mc, tc, bundled)
    # killed (SIGKILL) after step 23 of 60: checkpoints every 4 steps, so the last one is step 20 and the
    # metrics of steps 21-23 must be dropped and redone on resume
    proc = subprocess.run([sys.executable, "-m", "flopwise", "train", str(killed), "--quiet"],
                          env={**os.environ, KILL_AT_STEP_ENV: "23"}, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL and not (killed / "final.json").exists()
    assert torch.load(killed / "ckpt" / "latest.pt", weights_only=False)["step"] == 20
    assert len(_losses(killed)) == 23
    r = cli("train", killed, "--quiet")
    assert r.returncode == 0, r.stderr
    _same(_losses(killed), _losses(straight), rel=1e-6)
    final = json.loads((killed / "final.json").read_text())
    assert final["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    assert final["optimizer"] == optimizer
    state = torch.load(killed / "ckpt" / "latest.pt", weights_only=False)["optimizer"]
    assert set(state) == ({"adamw", "muon"} if optimizer == "muon" else {"adamw"})


@pytest.mark.slow
def test_ten_kill9s_at_random_moments_end_at_the_uninterrupted_loss(bundled, tmp_path):
    """SIGKILL at 10 random wall-clock moments (during start-up, a step, a checkpoint or metrics write), resuming
    each time: the finished run's losses equal an uninterrupted run's to 1e-6 (about 85 s)."""
    import time

    mc, tc = small(bundled, n_tokens=64 * 8 * 2000, precision="fp32", ckpt_every=7, eval_every=200)
    expected = train(new_run(tmp_path / "straight", mc, tc, bundled), quiet=True)
    run = new_run(tmp_path / "killed", mc, tc, bundled)
    rng = np.random.default_rng(0)
    kills = 0
    while kills < 10:
        proc = subprocess.Popen([sys.executable, "-m", "flopwise", "train", str(run), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(rng.uniform(1.5, 5.0))
        if proc.poll() is not None:  # finished before the kill came: a later kill would find nothing to do
            break
        proc.kill()
        proc.wait()
        kills += 1
        assert not (run / "final.json").exists()
    assert kills == 10, "the run finished before 10 kills: make it longer"
    r = cli("train", run, "--quiet")
    assert r.returncode == 0, r.stderr
    final = json.loads((run / "final.json").read_text())
    assert final["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)
    _same(_losses(run), _losses(tmp_path / "straight"), rel=1e-6)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_ddp_two_processes_match_single_process(bundled, tmp_path, optimizer):
    mc, tc = small(bundled, n_tokens=64 * 8 * 12, precision="fp32", ckpt_every=100, optimizer=optimizer)
    single = new_run(tmp_path / "single", mc, tc, bundled)
    train(single, quiet=True)
    ddp = new_run(tmp_path / "ddp", mc, tc, bundled)
    r = subprocess.run([str(VENV_BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                        "--master-port", str(free_port()), "-m", "flopwise", "train", str(ddp), "--quiet"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "FLOPWISE_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(single)) == 12
    _same(_losses(single), _losses(ddp), rel=1e-4)
    fa = json.loads((single / "final.json").read_text())
    fb = json.loads((ddp / "final.json").read_text())
    assert fb["world_size"] == 2 and fa["val_loss"] == pytest.approx(fb["val_loss"], rel=1e-4)


def test_budget_from_flops_and_plan(bundled, tmp_path):
    r = cli("train", "--data", bundled.path, "--n-params", "2e5", "--flops", "1e11", "--seq-len", "64",
            "--out", tmp_path / "f", "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    mc, tc, cfg = read_run_config(tmp_path / "f")
    assert tc.n_tokens == int(1e11 / training_flops_per_token(mc))
    assert json.loads(r.stdout)["flops"] == pytest.approx(1e11, rel=0.05)
    plan = json.loads(cli("plan", "--flops", "8e10", "--law", "chinchilla", "--vocab-size", bundled.vocab_size,
                          "--seq-len", "64", "--json").stdout)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    r = cli("train", "--data", bundled.path, "--plan", tmp_path / "plan.json", "--out", tmp_path / "p", "--quiet")
    assert r.returncode == 0, r.stderr
    mc, tc, _ = read_run_config(tmp_path / "p")
    assert tc.n_tokens == int(plan["n_tokens"]) and mc.d_model == plan["shape"]["d_model"]


def test_a_run_gives_the_process_its_thread_count_back(bundled, tmp_path, monkeypatch):
    """The next run in the same process (a sweep worker, the autopilot's --compare run) starts from the same count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        monkeypatch.setenv("FLOPWISE_THREADS", "2")
        mc, tc = small(bundled, n_tokens=64 * 8 * 2)
        final = train(new_run(tmp_path / "r", mc, tc, bundled), quiet=True)
        assert final["threads_mean"] == 2 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_bad_training_input(bundled, tmp_path):
    """Damaged and empty corpora (option errors are in tests/test_hostile.py's table)."""
    damaged = tmp_path / "damaged"
    shutil.copytree(bundled.path, damaged)
    with open(damaged / "tokens-train.bin", "ab") as f:
        f.write(b"\0")  # half a token
    r = cli("train", "--data", damaged, "--n-params", "2e5", "--tokens", "1e5", "--out", tmp_path / "z")
    assert r.returncode == 2 and "prepare the corpus again" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "z").exists()  # refused before the run folder was made
    r = cli("train", "--data", tmp_path / "nope", "--n-params", "2e5", "--tokens", "1e5", "--out", tmp_path / "x")
    assert r.returncode == 2 and "does not exist" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("")
    r = cli("train", "--data", empty, "--n-params", "2e5", "--tokens", "1e5", "--out", tmp_path / "y")
    assert r.returncode == 2 and "holds no text" in r.stderr


def test_oom_failed_start_is_replaced_and_a_trained_run_is_not(bundled, tmp_path, monkeypatch):
    mc, tc = small(bundled, n_tokens=64 * 8 * 4)
    run = new_run(tmp_path / "r", mc, tc, bundled)
    forward, c_step = Llama.forward, NativeTrainStep.step

    def no_memory(self, *a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000000000 bytes")

    monkeypatch.setattr(Llama, "forward", no_memory)
    monkeypatch.setattr(NativeTrainStep, "step", no_memory)  # where the C step trains, its workspace
    with pytest.raises(FlopwiseError, match="does not fit in memory: lower --micro-batch"):
        train(run, quiet=True)
    assert not (run / "final.json").exists() and (run / "config.json").exists()
    # no step was trained: a new run may take the folder, and says that it replaced a failed start
    notes = []
    new_run(run, mc, dataclasses.replace(tc, micro_batch=2), bundled, log=notes.append)
    assert "never trained a step" in notes[0] and read_run_config(run)[1].micro_batch == 2
    monkeypatch.setattr(Llama, "forward", forward)
    monkeypatch.setattr(NativeTrainStep, "step", c_step)
    train(run, quiet=True)
    with pytest.raises(FlopwiseError, match="already holds a run"):
        new_run(run, mc, tc, bundled)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FlopwiseError, match="holds other files"):
        new_run(tmp_path / "mine", mc, tc, bundled)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_set_up_killed_before_config_is_replaced_and_user_files_are_not(bundled, tmp_path):
    """A new run's set-up killed part-way (a sweep's parent killed: its workers die mid-set-up) leaves its tokenizer
    and no config.json; the next start replaces it. A set-up still running, or files without flopwise's mark, are
    refused and left as they were."""
    mc, tc = small(bundled, n_tokens=64 * 8 * 4)
    killed = tmp_path / "killed"
    code = ("import os, signal, flopwise.run as run; from flopwise.data.prepare import open_corpus; "
            "from flopwise.config import TrainConfig; from flopwise.model.llama import ModelConfig; "
            "run.write_config = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
            f"run.new_run({str(killed)!r}, ModelConfig(**{mc.to_dict()!r}), TrainConfig(**{dataclasses.asdict(tc)!r}), "
            f"open_corpus({str(bundled.path)!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert sorted(p.name for p in killed.iterdir()) == [SETTING_UP, "tokenizer.model"]
    dead_mark = (killed / SETTING_UP).read_text()
    notes = []
    new_run(killed, mc, tc, bundled, log=notes.append)
    assert "never trained a step" in notes[0]
    assert sorted(p.name for p in killed.iterdir()) == [".lock", "config.json", "tokenizer.model"]
    assert read_run_config(killed)[0] == mc
    live_mark = f"flopwise set-up: pid {os.getpid()} on {socket.gethostname()}\n"
    for name, files in (("live", {SETTING_UP: live_mark, "tokenizer.model": "x"}),  # a set-up still running
                        ("theirs", {"tokenizer.model": "my tokenizer"}),  # no mark: the user's
                        ("mixed", {SETTING_UP: dead_mark, "tokenizer.model": "x", "notes.txt": "mine"}),
                        ("model", {SETTING_UP: dead_mark, "config.json": "{}", "tokenizer.model": "x"})):
        (tmp_path / name).mkdir()
        for f, text in files.items():
            (tmp_path / name / f).write_text(text)
        with pytest.raises(FlopwiseError, match="holds other files"):
            new_run(tmp_path / name, mc, tc, bundled)
        assert {p.name: p.read_text() for p in (tmp_path / name).iterdir()} == files


def test_wsd_branch_continues_its_trunk_exactly(bundled, tmp_path):
    """A cooldown branch started from a constant-LR trunk's checkpoint equals a WSD run from scratch."""
    from flopwise.training.schedule import wsd_cooldown_start

    steps, warmup = 30, 3
    start = wsd_cooldown_start(steps, warmup, 0.2) + 1
    common = dict(lr=2e-3, warmup_steps=warmup, precision="fp32", ckpt_every=100)
    mc, straight_tc = small(bundled, n_tokens=64 * 8 * steps, schedule="wsd", cooldown_fraction=0.2, **common)
    straight = train(new_run(tmp_path / "straight", mc, straight_tc, bundled), quiet=True)
    _, trunk_tc = small(bundled, n_tokens=64 * 8 * (start + 5), schedule="constant", save_at_steps=[start], **common)
    train(new_run(tmp_path / "trunk", mc, trunk_tc, bundled), quiet=True)
    assert (tmp_path / "trunk" / "ckpt" / f"step-{start}.pt").exists()
    _, branch_tc = small(bundled, n_tokens=64 * 8 * steps, schedule="wsd", cooldown_fraction=0.2,
                         branch_from=str(tmp_path / "trunk" / "ckpt" / f"step-{start}.pt"), **common)
    branch = train(new_run(tmp_path / "branch", mc, branch_tc, bundled), quiet=True)
    assert branch["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)
    tail = [x for x in _losses(tmp_path / "straight") if x[0] >= start]
    _same(_losses(tmp_path / "branch"), tail, rel=1e-6)


def test_compiled_run_tracks_eager_and_keeps_its_choice(bundled, tmp_path):
    """--compile on: the same run as eager (same seed) to within compiled-kernel rounding, the choice recorded in
    speed.json and in final.json; where this machine cannot compile, the run says so and trains eager."""
    from flopwise.model.compiling import can_compile
    mc = ModelConfig(vocab_size=bundled.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=96,
                     seq_len=32, tie_embeddings=True)
    tc = dict(n_tokens=32 * 8 * 20, batch_tokens=32 * 8, micro_batch=8, eval_every=10, eval_windows=8,
              final_eval_windows=8, log_every=1, precision="fp32")
    eager = train(new_run(tmp_path / "eager", mc, TrainConfig(**tc, compile="off"), bundled), quiet=True)
    lines = []
    compiled = train(new_run(tmp_path / "compiled", mc, TrainConfig(**tc, compile="on"), bundled), log=lines.append)
    assert compiled["compiled"] is can_compile(torch.device("cpu")) and eager["compiled"] is False
    assert json.loads((tmp_path / "compiled" / "speed.json").read_text()) == {
        "precision": "fp32", "compile": compiled["compiled"], "kernel": "torch"}
    assert ", compiled on cpu" in lines[0] or "torch.compile failed" in "\n".join(lines)
    _same(_losses(tmp_path / "compiled"), _losses(tmp_path / "eager"), rel=1e-3)


def test_compile_option_values_and_legacy_runs(bundled, tmp_path):
    from flopwise.run import read_speed
    from flopwise.training.compile_choice import choose_compile
    assert TrainConfig.from_dict({"n_tokens": 10, "compile": True}).compile == "on"
    assert TrainConfig.from_dict({"n_tokens": 10, "compile": False}).compile == "off"
    with pytest.raises(FlopwiseError, match="--compile must be auto, on or off, got 'yes'"):
        TrainConfig(n_tokens=10, compile="yes").check()
    cpu = torch.device("cpu")
    shape = dict(vocab_size=bundled.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=96, seq_len=32)
    assert choose_compile("on", cpu, shape, 4, lambda: 1.0, precision="fp32", eager_precision="fp32")[0]
    assert not choose_compile("off", cpu, shape, 4, lambda: 1e6, precision="fp32", eager_precision="fp32")[0]
    # a run started before speed.json: its precision.txt still decides, eager
    (tmp_path / "precision.txt").write_text("bf16\n")
    assert read_speed(tmp_path) == {"precision": "bf16", "compile": False, "kernel": "torch", "passes": 0}


def test_auto_compiles_where_the_measured_compiled_rate_repays_the_compile(monkeypatch, tmp_path):
    """auto's decision from measured rates (compiled FLOP/s per precision, measured once per shape and remembered)
    against the run's measured eager rate: never by an assumed speed-up once measured."""
    import flopwise.training.compile_choice as cc
    import flopwise.training.probe as pr
    from flopwise.training import registry
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    monkeypatch.setattr(cc, "use_compile_cache", lambda: None)
    monkeypatch.setattr(cc, "can_compile", lambda device: True)
    monkeypatch.setattr(pr, "cpu_has_fast_bf16", lambda: True)
    measured = []
    speeds = {"fp32": 1.2e9, "bf16": 2.0e9}  # FLOP/s, compiled; eager: 1e9

    def fake_measure(mc, micro_batch, steps, bf16, compiled=False):
        assert compiled
        measured.append("bf16" if bf16 else "fp32")
        return speeds[measured[-1]]

    monkeypatch.setattr(pr, "_measure_rate", fake_measure)
    cpu = torch.device("cpu")
    shape = dict(vocab_size=512, d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=96, seq_len=32)

    def choose(seconds, measure=True):
        return cc.choose_compile("auto", cpu, shape, 4, lambda: seconds, eager_precision="fp32",
                                 eager_rate=lambda: 1e9, measure=measure)

    # too short to repay even a compile at the usual speed-up: nothing is measured
    assert choose(60.0) == (False, "fp32") and measured == []
    # long enough: both precisions are measured once; bf16 compiled is 2x eager: 10 s + 300 / 2 < 300
    assert choose(300.0) == (True, "bf16") and sorted(measured) == ["bf16", "fp32"]
    assert choose(300.0) == (True, "bf16") and len(measured) == 2  # remembered, not measured again
    assert cc.recorded_compiled_rate(shape, 4, "bf16", torch.get_num_threads()) == 2.0e9
    assert choose(15.0) == (False, "fp32")  # measured, but 10 s + 7.5 s > 15 s
    # measured slower than eager: never compiled, however long the run
    speeds.update(fp32=0.8e9, bf16=0.9e9)
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path / "other"))
    assert choose(1e5) == (False, "fp32") and len(measured) == 4
    assert cc.expected_seconds(1e5, 1e9, shape, 4) == 1e5  # and the estimate knows it
    # a compile that fails while measuring leaves the run eager
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path / "failing"))

    def failing(*a, **k):
        raise OSError("no space left on device")

    monkeypatch.setattr(pr, "_measure_rate", failing)
    assert choose(1e5) == (False, "fp32")
    # tuning runs (their graphs differ from the measured one) are never measured
    monkeypatch.setattr(pr, "_measure_rate", fake_measure)
    assert cc.choose_compile("auto", cpu, shape, 4, lambda: 1e5, eager_rate=lambda: 1e9, tuning=True) == (False, "fp32")
    assert len(measured) == 4
    # the sweep's estimate measures nothing: an unmeasured shape is estimated at the usual speed-up
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path / "third"))
    monkeypatch.setattr(pr, "_measure_rate", fake_measure)
    assert cc.expected_seconds(300.0, 1e9, shape, 4) == pytest.approx(cc.compiled_seconds(300.0, False) + 40)
    assert len(measured) == 4
    # an older registry (a list of compiled keys) still reads, as graphs compiled before
    key = cc.compile_key(shape, 4, "fp32")
    (tmp_path / "third").mkdir(exist_ok=True)
    (tmp_path / "third" / "compiled.json").write_text(json.dumps([key]))
    assert registry.compiled_before(key) and cc.recorded_compiled_rate(shape, 4, "fp32", 1) is None


def test_a_failed_compile_trains_eager_and_says_so(bundled, tmp_path, monkeypatch):
    def broken_compile(module, **kw):
        def fails(*a, **k):
            raise RuntimeError("")  # inductor's errors come in many kinds, some without a message
        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    mc, tc = small(bundled, n_tokens=64 * 8 * 6, compile="on", precision="fp32")
    run = new_run(tmp_path / "r", mc, tc, bundled)
    lines = []
    final = train(run, log=lines.append)
    assert "note: torch.compile failed (RuntimeError: ); training eager" in lines
    assert final["compiled"] is False and len(_losses(run)) == 6
    assert json.loads((run / "speed.json").read_text()) == {"precision": "fp32", "compile": False, "kernel": "torch"}
