import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flopwise.errors import FlopwiseError
from flopwise.laws.flops import Shape, n_params_total, training_flops_per_token
from flopwise.laws.law import REGISTRY
from flopwise.laws.runs import load_runs
from flopwise.laws.shape import family_shape_at
from flopwise.run import run_is_locked
from flopwise.sweep.design import RunSpec, budgets_for, design_sweep, read_design, total_flops, write_design
from flopwise.sweep.runner import run_sweep, status, sweep_seconds, worker_pool

FAST = {"eval_every": 10**9, "eval_windows": 2, "final_eval_windows": 8, "micro_batch": 8, "batch_tokens": 1024}


def test_design_brackets_prior_optimum_and_spends_each_budget():
    runs = design_sweep([1e12, 3e12], vocab_size=1024, seq_len=128, n_sizes=5, spread=4)
    for b in (1e12, 3e12):
        group = [r for r in runs if r.budget == b]
        n_opt = float(REGISTRY["chinchilla"].optimal(b)[0])
        assert len(group) == 5
        assert min(r.n_params for r in group) < n_opt < max(r.n_params for r in group)
        for r in group:
            fpt = training_flops_per_token(Shape(**r.shape))
            assert b - fpt < r.flops <= b  # exact FLOPs equal the budget to within one token
    assert sum(budgets_for(1e13, 3, 3.0, 5)) * 5 == pytest.approx(1e13)


def test_design_rejects_budget_too_small():
    with pytest.raises(FlopwiseError, match="too small for an informative sweep .* the smallest budget that works"):
        design_sweep([1e3], vocab_size=1024, seq_len=128)


def _make_sweep(path: Path, corpus, budgets=(2e10, 6e10), sizes=3):
    """A tiny sweep for the runner's mechanics (resume, locks, Ray): sizes of the family at widths 16, 32, ...,
    too short to be informative, so written by hand rather than by design_sweep (which refuses them)."""
    specs = []
    for b in budgets:
        for d in range(16, 16 * (sizes + 1), 16):
            shape = family_shape_at(d, 2, corpus.vocab_size, 64)
            n = n_params_total(shape)
            specs.append(RunSpec(name=f"c{b:.2e}-n{n:09d}".replace("+", ""), budget=b, shape=shape.to_dict(),
                                 n_params=n, n_tokens=int(b / training_flops_per_token(shape))))
    write_design(path, specs, {"corpus": str(corpus.path), "corpus_hash": corpus.meta["hash"],
                               "budgets": list(budgets), "train_options": FAST})
    return specs


def test_sweep_runs_then_does_nothing_more(bundled, tmp_path, monkeypatch):
    """A sweep trains every run once, reporting its progress as its runs train (not only as they finish: the bar's
    ETA), and a second call trains nothing."""
    from flopwise.sweep import runner

    specs = _make_sweep(tmp_path / "s", bundled)
    seen = []
    monkeypatch.setattr(runner, "PROGRESS_SECONDS", 0.02)
    run_sweep(tmp_path / "s", workers=2, threads=1, progress=lambda d, t, k, n: seen.append((d, k, n)))
    assert seen[-1] == (pytest.approx(total_flops(specs)), len(specs), len(specs))
    assert any(d > 0 for d, k, _ in seen if k == 0)  # the first runs' steps counted before either finished
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))  # never backwards
    rows = status(tmp_path / "s")
    assert all(r["state"] == "done" for r in rows)
    runs = load_runs(tmp_path / "s")
    assert len(runs) == len(specs) and sorted(set(runs.budget)) == pytest.approx([2e10, 6e10], rel=0.01)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("*/final.json")}
    run_sweep(tmp_path / "s", workers=2, threads=1)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").glob("*/final.json")} == mtimes


def test_sweep_resumes_after_kill9_of_parent(bundled, tmp_path):
    sweep = tmp_path / "k"
    specs = _make_sweep(sweep, bundled, budgets=(1e11, 2e11), sizes=3)
    code = ("import sys; from flopwise.sweep.runner import run_sweep; "
            f"run_sweep({str(sweep)!r}, workers=2, threads=1)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:
        done = list(sweep.glob("*/final.json"))
        partial = [p for p in sweep.glob("*/ckpt/latest.pt") if not (p.parent.parent / "final.json").exists()]
        if done and partial:
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done and partial, "the sweep finished before it could be killed"
    # workers die with their parent and release their runs
    deadline = time.time() + 30
    while any(run_is_locked(sweep / s.name) for s in specs) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(run_is_locked(sweep / s.name) for s in specs)
    before = {p: p.stat().st_mtime_ns for p in sweep.glob("*/final.json")}
    states = {r["name"]: r["state"] for r in status(sweep)}
    assert "partial" in states.values() and "done" in states.values()
    resumed = next(n for n, s in states.items() if s == "partial")
    step_at_kill = len((sweep / resumed / "metrics.jsonl").read_text().splitlines())
    run_sweep(sweep, workers=2, threads=1)
    assert all(r["state"] == "done" for r in status(sweep))
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing done was re-done
    steps = [json.loads(x)["step"] for x in (sweep / resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and len(steps) >= step_at_kill  # resumed, not restarted


def test_sweep_cli_dry_run_and_status(bundled, tmp_path):
    r = subprocess.run([sys.executable, "-m", "flopwise", "sweep", "run", "--data", str(bundled.path), "--budgets",
                        "auto", "--n-budgets", "2", "--sizes", "3", "--seq-len", "64", "--out", str(tmp_path / "d"),
                        "--dry-run"], capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "IsoFLOP sweep: 6 runs" in r.stdout and "ETA about" in r.stdout and "steps" in r.stdout
    assert not (tmp_path / "d" / "sweep.json").exists()
    r = subprocess.run([sys.executable, "-m", "flopwise", "sweep", "run", "--data", str(bundled.path), "--budgets",
                        "1e3", "--out", str(tmp_path / "e")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "too small for an informative sweep" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def autopilot_run(tmp_path_factory):
    """One autopilot on a folder of text (--budget auto), shared by the tests that read what it wrote."""
    from flopwise.autopilot import autopilot
    from flopwise.config import AutopilotConfig
    from flopwise.data.prepare import bundled_corpus

    tmp_path = tmp_path_factory.mktemp("autopilot")
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, story in enumerate(bundled_corpus()[0].read_text().split("<|endoftext|>")[:800]):
        (folder / f"story{i:04d}.txt").write_text(story.strip() + "\n")
    cfg = AutopilotConfig(budget_flops=None, sweep_fraction=0.8, n_budgets=3, n_sizes=4, budget_ratio=1.4,
                          bootstrap=40, vocab_size=384, seq_len=64)  # --budget auto: the smallest informative one
    # (80% of it on the sweep: the final run is the test's longest phase, and what it checks does not need more)
    return tmp_path, folder, autopilot(tmp_path / "ap", str(folder), cfg, log=lambda m: None)


def test_autopilot_end_to_end_on_a_folder_of_text(autopilot_run):
    from flopwise.autopilot import autopilot
    from flopwise.config import AutopilotConfig

    tmp_path, folder, s = autopilot_run
    for key in ("budget_flops", "sweep_flops", "n_params_opt", "n_tokens_opt", "predicted_loss",
                "predicted_loss_interval", "measured_loss", "bigger_model_n_params", "bigger_model_loss", "epochs",
                "swept_n_params_min", "swept_n_params_max", "verdict", "checks", "law_used"):
        assert key in s
    assert list(s)[0] == "verdict" and s["verdict"] in ("sound", "usable with caveats", "not informative")
    assert {c["name"] for c in s["checks"]} >= {"min_steps", "exponent_a", "holdout_error", "smoothness"}
    assert s["budget_flops"] == 2.8e12  # the smallest whose sweep brackets the prior for vocab 384, context 64
    assert s["sweep_flops"] <= 0.8 * 2.8e12 * 1.01
    assert s["sweep_flops"] + s["final_flops"] == pytest.approx(2.8e12, rel=0.02)
    lo, hi = s["predicted_loss_interval"]
    assert lo < s["predicted_loss"] < hi
    page = (tmp_path / "ap" / "report.html").read_text()
    assert "data:image/png;base64," in page and "src=\"http" not in page and "Bigger is not better" in page
    report = (tmp_path / "ap" / "report.md").read_text()
    assert report.split("\n## ")[1].startswith(f"Verdict: {s['verdict']}")  # the verdict opens the report
    assert "Headline" in report and f"({s['epochs']:.1f} epochs of the corpus)" in report
    assert json.loads((tmp_path / "ap" / "summary.json").read_text())["measured_loss"] == s["measured_loss"]
    # the same folder with another design is refused
    other = AutopilotConfig(budget_flops=5e12, sweep_fraction=0.6, n_budgets=3, n_sizes=4, budget_ratio=1.7,
                            bootstrap=40, vocab_size=384, seq_len=64)
    with pytest.raises(FlopwiseError, match="holds another sweep"):
        autopilot(tmp_path / "ap", str(folder), other, log=lambda m: None)
    assert read_design(tmp_path / "ap" / "sweep")[0] and total_flops(read_design(tmp_path / "ap" / "sweep")[0]) > 0


# reports what the page did once loaded: every image decoded, and no error (script, resource or console)
PROBE = """<script>
window.__errors = [];
window.addEventListener("error",
  e => __errors.push(String(e.message || (e.target && (e.target.src || e.target.href)))), true);
const _error = console.error; console.error = (...a) => { __errors.push(a.join(" ")); _error(...a); };
window.addEventListener("load", () => {
  const images = [...document.images];
  const pre = document.createElement("pre"); pre.id = "probe";
  pre.textContent = JSON.stringify({images: images.length, errors: __errors,
    undecoded: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)});
  document.body.appendChild(pre);
});
</script>"""


def _browser():
    return next((b for b in ("chromium", "chromium-browser", "google-chrome", "chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no Chromium or Chrome on this machine")
def test_the_report_in_a_real_browser(autopilot_run, tmp_path):
    """report.html opened by headless Chromium: its plots decode (naturalWidth > 0) and nothing errs."""
    page = (autopilot_run[0] / "ap" / "report.html").read_text()
    assert page.count("<head>") == 1
    probed = tmp_path / "report.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    done = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, done.stderr[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    assert result["images"] >= 3 and result["undecoded"] == [] and result["errors"] == [], result


def test_sweep_on_a_local_ray_instance(bundled, tmp_path):
    ray = pytest.importorskip("ray")
    specs = _make_sweep(tmp_path / "r", bundled, budgets=(2e10, 4e10), sizes=3)
    try:
        results = run_sweep(tmp_path / "r", workers=2, threads=1, ray_address="local")
    finally:
        ray.shutdown()
    assert len(results) == len(specs)
    assert all(r["state"] == "done" for r in status(tmp_path / "r"))
    assert len(load_runs(tmp_path / "r")) == len(specs)


def test_wsd_design_shares_trunks_and_saves_flops():
    from flopwise.sweep.design import design_wsd_sweep, equivalent_cosine_flops

    runs = design_wsd_sweep([4e11, 1e12, 2.5e12], vocab_size=1024, seq_len=128)
    trunks = [r for r in runs if r.budget == 0]
    branches = [r for r in runs if r.budget > 0]
    assert trunks and all(r.phase == 0 for r in trunks) and all(r.phase == 1 for r in branches)
    for b in branches:
        trunk = next(t for t in trunks if t.n_params == b.n_params)
        step = int(b.options["branch_from"].split("step-")[1].split(".")[0])
        assert step in trunk.options["save_at_steps"]
        assert trunk.n_tokens >= b.start_tokens and b.start_tokens < b.n_tokens
        assert b.full_flops == pytest.approx(b.budget, rel=0.02)  # each branch ends at its budget
    assert total_flops(runs) < 0.9 * equivalent_cosine_flops(runs)


def test_a_wsd_sweep_written_before_branch_from_reads_the_same(tmp_path):
    """Older sweep.json files name a branch's trunk checkpoint init_from: they resume as the same design."""
    from dataclasses import asdict

    from flopwise.sweep.design import SWEEP_VERSION, design_wsd_sweep

    runs = design_wsd_sweep([4e11, 1e12], vocab_size=1024, seq_len=128)
    old = [asdict(r) for r in runs]
    for r in old:
        if "branch_from" in r["options"]:
            r["options"]["init_from"] = r["options"].pop("branch_from")
    (tmp_path / "sweep.json").write_text(json.dumps({"version": SWEEP_VERSION, "runs": old}))
    assert [r.__dict__ for r in read_design(tmp_path)[0]] == [r.__dict__ for r in runs]


def test_sweep_workers_share_the_threads_out(monkeypatch):
    """The workers' threads together never exceed --threads (or every core): no oversubscribed pool."""
    from flopwise.sweep import runner

    monkeypatch.setattr(runner.os, "cpu_count", lambda: 4)
    monkeypatch.delenv("FLOPWISE_THREADS", raising=False)
    assert [runner.worker_threads(w) for w in (1, 2, 3, 8)] == [(4, False), (2, False), (1, False), (1, False)]
    monkeypatch.setenv("FLOPWISE_THREADS", "6")
    assert [runner.worker_threads(w) for w in (1, 2, 4)] == [(6, True), (3, True), (1, True)]


def test_a_sweep_worker_skips_its_teardown_but_not_its_exit_handlers(tmp_path):
    """A worker ends without tearing down its interpreter (about a second with torch loaded: an object's __del__
    never runs), but each exit handler, registered before its start (torch's at import) or during a task (a run's
    libraries), runs exactly once, its output is flushed, and it exits cleanly."""
    log, torn = tmp_path / "handlers", tmp_path / "torn-down"
    code = f"""
import atexit, sys
from pathlib import Path
log = Path({str(log)!r})
def mark(name):
    with open(log, "a") as fh:
        fh.write(name + "\\n")
class Module:
    def __del__(self):
        Path({str(torn)!r}).touch()
held = Module()
atexit.register(mark, "before")
from flopwise.sweep import runner
runner._init_worker(1, False)
atexit.register(mark, "during a task")
runner._newest_exit()  # as a task's end does
print("trained", end="")
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's output waits in its buffer
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode, done.stdout) == (0, "trained")
    assert log.read_text().splitlines() == ["during a task", "before"]
    assert not torn.exists()


def test_the_eta_measured_in_the_workers_is_remembered_for_the_runs(bundled, monkeypatch):
    """The sweep's ETA is measured in its workers (started while the parent builds the C step): what they measured
    is remembered for the runs, and the same ETA follows here without measuring again."""
    from flopwise.training import probe
    from flopwise.training.native import builds

    if not builds():
        pytest.skip("the C step does not build here: PyTorch's rates are measured per process")
    specs = design_sweep([4e11, 1e12], bundled.vocab_size, 64, 3)
    calls, measure = [], probe._race
    monkeypatch.setattr(probe, "_race", lambda *a, **k: calls.append(a) or measure(*a, **k))
    with worker_pool(2, (1, True)) as pool:
        remote = sweep_seconds(specs, 2, 1, pool)
    assert calls == []  # measured in the workers
    monkeypatch.setattr(probe, "_RATES", {})  # what this process remembers: only compiled.json is left
    monkeypatch.setattr(probe, "_BEST", {})
    for remembered in (probe.faster_kernel, probe.faster_precision, probe.c_step_passes):
        remembered.cache_clear()
    assert sweep_seconds(specs, 2, 1) == remote > 0 and calls == []


def test_a_runs_progress_is_read_from_its_last_logged_step(tmp_path):
    """trained_flops reads the last whole line of metrics.jsonl (0 before the first); a WSD branch's progress
    leaves out its trunk's part and stops at its own FLOPs."""
    from flopwise.run import trained_flops
    from flopwise.sweep.runner import _run_progress

    run = tmp_path / "r"
    run.mkdir()
    assert trained_flops(run) == 0.0
    lines = [json.dumps({"step": i, "flops": 1e9 * (i + 1), "note": "x" * 300}) for i in range(40)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"step": 40, "flo')  # torn: being written
    assert trained_flops(run) == 40e9
    shape = family_shape_at(16, 2, 1024, 64)
    fpt = training_flops_per_token(shape)
    branch = RunSpec(name="b", budget=0, shape=shape.to_dict(), n_params=1, n_tokens=int(60e9 / fpt),
                     start_tokens=int(30e9 / fpt))
    assert _run_progress(run, branch) == pytest.approx(10e9, rel=1e-4)  # 40e9 trained, 30e9 of them the trunk's
    (run / "metrics.jsonl").write_text(json.dumps({"step": 99, "flops": 99e9}) + "\n")
    assert _run_progress(run, branch) == pytest.approx(branch.flops)


def test_an_error_beside_a_running_run_ends_the_sweep_at_once(tmp_path):
    """An error (or Ctrl-C) in the sweep's process while a worker trains ends the workers with it: the pool's own
    shutdown had waited for the run in flight, and then the next one queued, before the process could exit."""
    code = ("import time; from flopwise.sweep.runner import worker_pool\n"
            "with worker_pool(2, (1, True)) as pool:\n"
            "    pool.submit(time.sleep, 60); pool.submit(time.sleep, 60); pool.submit(time.sleep, 60)\n"
            "    time.sleep(1)\n"  # the workers start (import torch), then take the tasks queued for them
            "    raise SystemExit('stopped')\n")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "stopped" in done.stderr
    assert time.perf_counter() - t0 < 30  # not the 60 s of a run in flight


def test_absurd_sweeps_are_refused_before_any_model_is_built(bundled, tmp_path):
    from flopwise.sweep.design import check_feasible

    specs = design_sweep([1e12, 3e12], bundled.vocab_size, 128, 3)
    check_feasible(specs, bundled.meta["n_tokens_train"], memory_bytes=24e9)  # the default-sized sweep passes
    with pytest.raises(FlopwiseError, match="needs ~.* GB for weights and optimizer state, more than this machine"):
        check_feasible(specs, bundled.meta["n_tokens_train"], memory_bytes=1e6)
    with pytest.raises(FlopwiseError, match="repeats the corpus .* times"):
        check_feasible(specs, 1000, memory_bytes=24e9)
    out = tmp_path / "s"
    r = subprocess.run([sys.executable, "-m", "flopwise", "sweep", "run", "--budgets", "1e25", "--out", str(out),
                        "--data", str(bundled.path), "--workers", "1", "--dry-run"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "lower the budgets" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()
