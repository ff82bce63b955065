import json
import os

import pytest

from flopwise.laws.hardware import get_gpu
from flopwise.training.probe import probe, save_probe


def test_probe_measures_and_feeds_local_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    r = probe("cpu", size=256, repeats=2)
    assert r["fp32_flops"] > 1e8 and r["bf16_flops"] > 1e8 and r["bandwidth_bytes_per_s"] > 1e8
    path = save_probe(r)
    assert json.loads(open(path).read())["bf16_flops"] == r["bf16_flops"]
    assert get_gpu("local").peak_flops == r["bf16_flops"]


def test_cpu_share_uses_the_cores_other_processes_leave(monkeypatch):
    """The decision, on made-up /proc/stat readings: 2 cores, and other processes using 0.1, 0.9 or 2 of them."""
    import flopwise.training.probe as pr

    monkeypatch.setattr(pr, "_allowed_cpus", lambda: {0, 1})
    monkeypatch.setattr(pr.time, "sleep", lambda s: None)
    clock = {"t": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(pr, "_cpu_sample", lambda: (clock["t"], clock["busy"], clock["own"]))
    monkeypatch.setattr(pr.torch, "set_num_threads", lambda n: clock.update(set=n))
    share = pr.CpuShare(2)
    chosen = []
    for others, own in ((0.1, 1.9), (0.9, 1.0), (2.0, 0.5), (0.0, 1.0), (0.3, 1.7)):  # CPU-seconds in one second
        clock.update(t=clock["t"] + 1.0, busy=clock["busy"] + others + own, own=clock["own"] + own)
        chosen.append(share.update())
    assert chosen == [2, 1, 1, 2, 1] and clock["set"] == 1  # torch follows every change
    assert share.mean_threads == pytest.approx((2 + 2 + 1 + 1 + 2) / 5)  # each second at the count it ran with
    fixed = pr.CpuShare(3, adapt=False)
    clock.update(t=clock["t"] + 1.0, busy=clock["busy"] + 2.0)
    assert fixed.update() == 3 and clock["set"] == 3


def test_cpu_share_drops_a_thread_beside_a_busy_process():
    import subprocess
    import sys
    import time

    import torch

    from flopwise.training.probe import CpuShare

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two cores")
    before = torch.get_num_threads()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        share = CpuShare(2, interval_s=0.5)
        time.sleep(1.0)
        assert share.update() == 1 and torch.get_num_threads() == 1
    finally:
        busy.kill()
        busy.wait()
        torch.set_num_threads(before)


def test_cpu_share_counts_a_child_it_waited_for_as_its_own():
    """A child that ran while the run waited (the C step's compiler, during the run's first measurements) is this
    process' CPU time, not another process': its second of CPU is in the sample's own share (it had been counted
    as another process and cut the run to one thread), however busy the machine is."""
    import subprocess
    import sys

    import flopwise.training.probe as pr

    before = pr._cpu_sample()
    if before is None:
        pytest.skip("no /proc/stat here")
    subprocess.run([sys.executable, "-c", "import time\nt = time.process_time()\n"
                    "while time.process_time() - t < 1.0: pass"], check=True)
    assert pr._cpu_sample()[2] - before[2] >= 1.0


def test_threads_option_and_environment(monkeypatch):
    from flopwise.config import requested_threads
    from flopwise.errors import FlopwiseError

    monkeypatch.delenv("FLOPWISE_THREADS", raising=False)
    assert requested_threads(0) == 0 and requested_threads(3) == 3
    monkeypatch.setenv("FLOPWISE_THREADS", "1")
    assert requested_threads(0) == 1 and requested_threads(2) == 2
    for bad_env in ("0", "two", "-1"):
        monkeypatch.setenv("FLOPWISE_THREADS", bad_env)
        with pytest.raises(FlopwiseError, match="FLOPWISE_THREADS"):
            requested_threads(0)
    with pytest.raises(FlopwiseError, match="--threads must be 0"):
        requested_threads(-2)


def test_auto_precision_is_the_faster_one_measured_per_shape(monkeypatch, tmp_path):
    import torch

    from flopwise.training import probe, registry

    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    measured = []

    def fake_rate(shape, threads, micro_batch, precisions):
        rates = {("fp32", 16): 2.0, ("bf16", 16): 1.0, ("fp32", 512): 1.0, ("bf16", 512): 3.0}
        measured.extend((shape["d_model"], p) for p in precisions)
        return {p: rates[p, shape["d_model"]] for p in precisions}

    monkeypatch.setattr(probe, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(probe, "eager_best_rates", fake_rate)
    probe.faster_precision.cache_clear()
    cpu = torch.device("cpu")
    tiny, wide = ({"d_model": d, "n_layers": 2} for d in (16, 512))
    assert probe.pick_precision("auto", cpu, tiny) == "fp32"
    assert probe.pick_precision("auto", cpu, wide) == "bf16"
    assert probe.pick_precision("auto", cpu, tiny) == "fp32" and len(measured) == 4  # measured once per shape
    probe.faster_precision.cache_clear()  # a new process: the choice comes from compiled.json, not measured again
    assert probe.pick_precision("auto", cpu, tiny) == "fp32" and probe.pick_precision("auto", cpu, wide) == "bf16"
    assert len(measured) == 4 and set(registry.read()["precision"].values()) >= {"fp32", "bf16"}
    assert probe.pick_precision("bf16", cpu, tiny) == "bf16"  # an explicit choice is kept
    monkeypatch.setattr(probe, "cpu_has_fast_bf16", lambda: False)
    assert probe.pick_precision("auto", cpu, wide) == "fp32"  # no bf16 instructions: nothing to measure
    probe.faster_precision.cache_clear()


def test_the_remembered_precision_survives_old_registries_and_a_worker_measuring_at_once(monkeypatch, tmp_path):
    """compiled.json in its oldest form (a list of compiled keys) keeps its keys and gains the precision section;
    when another sweep worker saves its answer for the same shape while this one measures, the first saved wins,
    so sibling runs train in one precision."""
    import json

    from flopwise.training import probe, registry

    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    (tmp_path / "compiled.json").write_text(json.dumps(["an old compiled key"]))
    shape = (("d_model", 24), ("n_layers", 1))
    key = json.dumps([probe.__version__, probe.torch.__version__, probe._cpu_name(), list(shape), 8, 1,
                      probe.CHOICE_METHOD])

    def rate(shape, threads, micro_batch, precisions):
        registry.update(lambda reg: reg["precision"].__setitem__(key, "bf16"))  # another worker saves bf16 meanwhile
        return {"fp32": 2.0, "bf16": 1.0}

    monkeypatch.setattr(probe, "eager_best_rates", rate)
    probe.faster_precision.cache_clear()
    assert probe.faster_precision(shape, 8, 1) == "bf16"  # measured fp32 faster, but the first saved answer wins
    reg = registry.read()
    assert reg["keys"] == ["an old compiled key"] and reg["precision"] == {key: "bf16"}
    (tmp_path / "compiled.json").write_text(json.dumps({"keys": [], "precision": {key: "fp16", "x": 3}}))
    probe.faster_precision.cache_clear()
    assert probe.faster_precision(shape, 8, 1) == "bf16" and registry.read()["precision"][key] == "bf16"
    probe.faster_precision.cache_clear()


def test_competing_steps_are_raced_and_compared_by_their_fastest_step(monkeypatch):
    """_race times one step of each variant a round, after a warm-up step of each, and reports each one's rate at
    its fastest and at its mean step. A slow phase of the machine (here 3x, over three steps' time) that fell
    whole on one variant measured after the other made the slower variant win by the mean; raced, the faster
    variant wins."""
    import flopwise.training.probe as pr
    from flopwise.laws.flops import training_flops_per_token
    from flopwise.model.llama import ModelConfig

    clock, calls = {"t": 0.0}, []
    cost = {"fp32": 1.0, "bf16": 0.8}  # seconds a step, outside the slow phase

    def fake_step(mc, micro_batch, bf16, **kw):
        name = "bf16" if bf16 else "fp32"

        def step():
            calls.append(name)
            slow = 3.0 if 2.0 <= clock["t"] < 5.0 else 1.0
            clock["t"] += cost[name] * slow
        return step

    monkeypatch.setattr(pr, "_training_step", fake_step)
    monkeypatch.setattr(pr.time, "perf_counter", lambda: clock["t"])
    mc = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, seq_len=8)
    flops = training_flops_per_token(mc) * 4 * 8
    rates = pr._race(mc, 4, {"fp32": dict(bf16=False), "bf16": dict(bf16=True)}, rounds=3)
    assert calls == ["fp32", "bf16"] + ["fp32", "bf16"] * 3  # warm-ups, then in turn
    # timed: fp32 from t=1.8 (1 s), bf16 from 2.8 (2.4 s: the slow phase), then 1, 0.8, 1, 0.8
    assert rates["bf16"] == pytest.approx((flops / 0.8, flops * 3 / 4.0))
    assert rates["fp32"] == pytest.approx((flops / 1.0, flops / 1.0))
    assert max(rates, key=lambda p: rates[p][0]) == "bf16"
    clock["t"] = 0.0  # measured one after another (as before): bf16 whole in the slow phase loses by its mean
    one = {p: pr._measure_rate(mc, 4, 3, p == "bf16") for p in ("bf16", "fp32")}
    assert one["fp32"] > one["bf16"]


def test_the_c_steps_race_leaves_out_a_failing_precision_and_remembers_the_mean_rates(monkeypatch, tmp_path):
    """native_best_rates: a precision whose C step fails (out of memory for its workspace) is left out and the
    other still measured; the race's mean rates are native_rate's (the ETA's), read without measuring again, here
    and in a later process."""
    import flopwise.training.probe as pr
    from flopwise.laws.flops import training_flops_per_token
    from flopwise.model.llama import ModelConfig

    monkeypatch.setenv("FLOPWISE_CACHE", str(tmp_path))
    monkeypatch.setattr(pr, "_RATES", {})
    clock = {"t": 0.0}
    seconds = iter([0.5, 0.5, 0.7, 0.6])  # fp32: the warm-up, then three steps

    def fake_step(mc, micro_batch, bf16, native=False, **kw):
        assert native
        if bf16:
            raise RuntimeError("could not allocate the C step's workspace")
        return lambda: clock.__setitem__("t", clock["t"] + next(seconds))

    monkeypatch.setattr(pr, "_training_step", fake_step)
    monkeypatch.setattr(pr.time, "perf_counter", lambda: clock["t"])
    shape = dict(vocab_size=64, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32, seq_len=8)
    flops = training_flops_per_token(ModelConfig(**shape)) * 4 * 8
    assert pr.native_best_rates(shape, 1, 4, ("fp32", "bf16")) == {"fp32": pytest.approx(flops / 0.5)}

    def no_more(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(pr, "_measure_rate", no_more)
    assert pr.native_rate(shape, 1, 4, "fp32") == pytest.approx(flops * 3 / 1.8)
    monkeypatch.setattr(pr, "_RATES", {})  # a new process: from compiled.json
    monkeypatch.setattr(pr, "builds", lambda: True)
    assert pr.native_rate(shape, 1, 4, "fp32") == pytest.approx(flops * 3 / 1.8)
