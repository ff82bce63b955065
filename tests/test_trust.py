"""Sweeps that can be trusted: the step floor, per-budget windows, one shape family, the smallest useful
budget, and the checks behind the verdict (each must fire on a degenerate data set and not on a sound one)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from flopwise.errors import FlopwiseError
from flopwise.laws.fit import fit_runs, synthetic_runs, widen
from flopwise.laws.law import DEFAULT_LAW, REGISTRY, ParametricLaw
from flopwise.laws.runs import Runs
from flopwise.laws.shape import FAMILY_HEAD_DIM
from flopwise.laws.trust import MIN_STEPS, NOT_INFORMATIVE, SOUND, trust_checks, verdict
from flopwise.sweep.design import BRACKET, LEAN, MIN_BATCH_SEQS, design_sweep, smallest_budget

CHINCHILLA = REGISTRY["chinchilla"]


@pytest.mark.parametrize("budgets", [[4e11, 1e12, 2.5e12], [2e12, 6e12, 1.8e13], [1e14, 1e15]])
def test_every_run_gets_the_step_floor_and_each_budget_brackets_its_own_optimum(budgets):
    runs = design_sweep(budgets, vocab_size=1024, seq_len=128)
    depths = {r.shape["n_layers"] for r in runs}
    assert len(depths) == 1  # one family: fixed depth ...
    for b in budgets:
        group = sorted((r for r in runs if r.budget == b), key=lambda r: r.n_params)
        assert len(group) >= 3
        batch = {r.options["batch_tokens"] for r in group}
        assert len(batch) == 1 and batch.pop() >= MIN_BATCH_SEQS * 128
        for r in group:
            assert r.n_tokens // r.options["batch_tokens"] >= MIN_STEPS
            assert r.shape["d_model"] // r.shape["n_heads"] == FAMILY_HEAD_DIM  # ... width the one dial
        widths = [r.shape["d_model"] for r in group]
        assert widths == sorted(widths) and len(set(widths)) == len(widths)
        centre = float(REGISTRY[DEFAULT_LAW].optimal(b)[0]) / LEAN[DEFAULT_LAW]  # the default prior and its lean
        assert group[0].n_params <= centre / BRACKET * 1.6 and group[-1].n_params >= centre * BRACKET / 1.6
    windows = [sorted(r.n_params for r in runs if r.budget == b) for b in budgets]
    assert windows[0] != windows[-1]  # the window moves with the budget


def test_a_budget_below_the_floor_is_refused_naming_one_that_is_accepted():
    with pytest.raises(FlopwiseError, match=r"too small for an informative sweep .* the smallest budget that works "
                                            r"is ([0-9.e+]+) FLOPs") as e:
        design_sweep([2e10], vocab_size=1024, seq_len=128)
    named = float(str(e.value).rsplit(" is ", 1)[1].split()[0])
    runs = design_sweep([named], vocab_size=1024, seq_len=128)
    assert runs and min(r.n_tokens // r.options["batch_tokens"] for r in runs) >= MIN_STEPS
    with pytest.raises(FlopwiseError):
        design_sweep([named * 0.9], vocab_size=1024, seq_len=128)
    # a smaller vocabulary allows smaller models; asking more steps per run raises the floor
    small_vocab = smallest_budget(lambda b: bool(_works([b], vocab=256)))
    assert small_vocab < named
    assert smallest_budget(lambda b: bool(_works([b], vocab=256, min_steps=400))) > small_vocab
    assert smallest_budget(lambda b: bool(_works([b], min_steps=400))) > named


def _works(budgets, vocab=1024, min_steps=MIN_STEPS):
    try:
        return design_sweep(budgets, vocab_size=vocab, seq_len=128, min_steps=min_steps)
    except FlopwiseError:
        return []


def test_autopilot_refuses_a_budget_below_its_floor_before_writing(tmp_path, bundled):
    out = tmp_path / "ap"
    r = subprocess.run([sys.executable, "-m", "flopwise", "autopilot", "--data", str(bundled.path), "--budget", "1e12",
                        "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "--budget auto picks it" in r.stderr
    assert not out.exists()
    from flopwise.autopilot import _design
    from flopwise.config import AutopilotConfig

    named = float(r.stderr.split("the smallest that works is ")[1].split()[0])
    assert _design(AutopilotConfig(budget_flops=named), named, bundled.vocab_size) is not None
    r = subprocess.run([sys.executable, "-m", "flopwise", "autopilot", "--budget", "lots", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'auto'" in r.stderr and not out.exists()


# ---------------------------------------------------------------- the checks, on constructed data


def _sweep(law=CHINCHILLA, budgets=(1e18, 3e18, 1e19, 3e19), noise=0.004, seed=0, **kw):
    return synthetic_runs(law, budgets, n_per_budget=7, noise=noise, seed=seed, **kw)


def _fit(runs, **kw):
    return fit_runs(runs, n_boot=kw.pop("n_boot", 100), holdout_largest=1, seed=0, workers=1, **kw)


def _by_name(result):
    return {c["name"]: c for c in result["checks"]}


@pytest.fixture(scope="module")
def sound():
    return _fit(_sweep())


def test_data_from_chinchillas_law_with_noise_is_sound(sound):
    checks = _by_name(sound)
    assert sound["verdict"] == SOUND, [c for c in sound["checks"] if not c["passed"]]
    assert set(checks) >= {"bounds", "exponent_a", "a_interval", "approach2_a", "largest_bracketed",
                           "holdout_error", "holdout_coverage", "smoothness"}
    assert checks["exponent_a"]["value"] == pytest.approx(CHINCHILLA.a, abs=0.05)


def test_steps_below_the_floor_fail(sound):
    runs = _sweep()
    runs.steps = np.full(len(runs), 40.0)
    checks = {c["name"]: c for c in trust_checks(sound, runs)}
    assert not checks["min_steps"]["passed"] and checks["min_steps"]["value"] == 40
    runs.steps[:] = MIN_STEPS
    assert {c["name"]: c for c in trust_checks(sound, runs)}["min_steps"]["passed"]


def test_exponents_outside_the_published_range_fail():
    odd = ParametricLaw(E=1.7, A=400.0, B=400.0, alpha=0.9, beta=0.1)  # N_opt ~ C^0.1
    checks = _by_name(_fit(_sweep(odd, noise=0.002)))
    assert not checks["exponent_a"]["passed"] and checks["exponent_a"]["value"] < 0.2
    assert not checks["approach2_a"]["passed"]


def test_a_law_that_does_not_depend_on_data_sits_on_a_bound_or_negligible():
    flat = _sweep()
    flat.loss = 1.7 + 400.0 / flat.n_params**0.34  # no D term at all
    result = _fit(flat)
    assert not _by_name(result)["bounds"]["passed"] and result["verdict"] == NOT_INFORMATIVE


def test_unbracketed_largest_budget_fails():
    runs = _sweep()
    top = runs.budget == runs.budgets[-1]
    keep = ~top | (runs.n_params < np.median(runs.n_params[top]) * 0.99)  # only its small models
    checks = _by_name(_fit(runs.subset(keep)))
    assert not checks["largest_bracketed"]["passed"]


def test_noisy_few_runs_give_a_wide_interval_of_a():
    runs = synthetic_runs(CHINCHILLA, (1e18, 2e18, 4e18), n_per_budget=4, noise=0.03, seed=3)
    checks = _by_name(_fit(runs))
    assert not checks["a_interval"]["passed"] and checks["a_interval"]["value"] > 0.15


def test_a_largest_budget_off_the_law_fails_the_holdout_checks():
    runs = _sweep()
    runs.loss = np.where(runs.budget == runs.budgets[-1], runs.loss * 1.08, runs.loss)
    checks = _by_name(_fit(runs))
    assert not checks["holdout_error"]["passed"] and checks["holdout_error"]["value"] > 0.03
    assert not checks["holdout_coverage"]["passed"]


def test_zigzag_losses_fail_smoothness():
    runs = _sweep()
    runs.loss = runs.loss + 0.12 * (np.arange(len(runs)) % 2 - 0.5)  # ±0.06 nats
    checks = _by_name(_fit(runs))
    assert not checks["smoothness"]["passed"] and checks["smoothness"]["value"] > 0.01


def test_verdict_order():
    ok = {"passed": True, "severity": "critical"}
    assert verdict([ok]) == SOUND
    assert verdict([ok, {"passed": False, "severity": "caveat"}]) == "usable with caveats"
    assert verdict([{"passed": False, "severity": "caveat"}, {"passed": False, "severity": "critical"}]) == \
        NOT_INFORMATIVE


def test_fallback_fit_holds_the_exponents_and_draws_them_with_the_stated_spread():
    runs = _sweep()
    fixed = {"alpha": 0.3, "beta": 0.3}
    result = fit_runs(runs, approach="3", n_boot=200, seed=0, workers=1, fixed=fixed,
                      fixed_sd={"alpha": 0.05, "beta": 0.05})
    assert result["alpha"] == 0.3 and result["beta"] == 0.3 and result["a"] == pytest.approx(0.5)
    assert result["intervals"]["alpha"]["se"] == pytest.approx(0.05, rel=0.2)
    assert "approach2_a" not in _by_name(result)  # not attempted: not a failure
    held = fit_runs(runs, approach="3", n_boot=0, fixed=fixed)
    assert held["alpha"] == 0.3 and held["beta"] == 0.3


def test_widen_adds_relative_error_in_quadrature():
    lo, hi = widen(2.0, 1.9, 2.2, 0.0, 0.9)
    assert (float(lo), float(hi)) == pytest.approx((1.9, 2.2))
    lo, hi = widen(2.0, 2.0, 2.0, 0.01, 0.9)
    assert float(hi) - 2.0 == pytest.approx(1.6448536 * 0.02, rel=1e-6) and float(lo) == pytest.approx(2 - 0.0328971)
    lo, hi = widen(2.0, 1.9, 2.2, 0.01, 0.9)
    assert float(hi) == pytest.approx(2.0 + np.hypot(0.2, 0.0328971), rel=1e-6)


def test_fit_cli_prints_the_verdict_and_writes_it(tmp_path):
    runs = _sweep()
    path = tmp_path / "runs.csv"
    lines = ["n_params,n_tokens,loss"] + [f"{n},{d},{loss}" for n, d, loss in zip(runs.n_params, runs.n_tokens,
                                                                                    runs.loss, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    r = subprocess.run([sys.executable, "-m", "flopwise", "fit", str(path), "--bootstrap", "50", "--no-plots",
                        "--holdout-largest", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Verdict:" in r.stdout and "a_interval" in r.stdout
    saved = json.loads((tmp_path / "runs-fit" / "fit.json").read_text())
    assert saved["verdict"] in ("sound", "usable with caveats") and {c["name"] for c in saved["checks"]} >= {
        "exponent_a", "holdout_error"}


def test_runs_carry_steps_from_a_table():
    from flopwise.laws.runs import runs_from_records

    runs = runs_from_records([{"n_params": 1e6, "n_tokens": 2e7, "loss": 3.0, "steps": 120},
                              {"n_params": 2e6, "n_tokens": 1e7, "loss": 3.1}])
    assert isinstance(runs, Runs) and runs.steps[0] == 120 and np.isnan(runs.steps[1])


def test_runs_that_repeat_their_data_fit_on_effective_tokens():
    from dataclasses import replace

    from flopwise.laws.allocate import effective_tokens

    runs = _sweep(noise=0.0)
    unique = np.median(runs.n_tokens) / 4  # most runs repeat their data, some 20+ times
    truth = CHINCHILLA.loss(runs.n_params, effective_tokens(runs.n_tokens, unique))
    runs = replace(runs, loss=truth, epochs=runs.n_tokens / unique)
    fitted = fit_runs(runs, approach="3", n_boot=0, effective_data=True)
    assert fitted["tokens"] == "effective"
    assert fitted["alpha"] == pytest.approx(CHINCHILLA.alpha, rel=0.02)
    assert fitted["beta"] == pytest.approx(CHINCHILLA.beta, rel=0.02)
    raw = fit_runs(runs, approach="3", n_boot=0)
    assert raw["tokens"] == "raw" and abs(raw["beta"] - CHINCHILLA.beta) > 0.02
    with pytest.raises(FlopwiseError, match="need each run's epochs"):
        fit_runs(replace(runs, epochs=None), approach="3", n_boot=0, effective_data=True)
    with pytest.raises(FlopwiseError, match="can be held"):
        fit_runs(runs, approach="3", n_boot=0, fixed={"E": 1.7})


def test_unimodal_residual_is_zero_for_profiles_that_fall_then_rise():
    from flopwise.laws.trust import unimodal_residual

    assert unimodal_residual([3.0, 2.0, 1.0, 2.0, 3.0]) == 0.0
    assert unimodal_residual([3.8, 3.9, 4.3, 4.5]) == 0.0  # monotone: the minimum lies below the window
    assert unimodal_residual([4.0, 3.0, 3.5, 3.0, 4.0]) == pytest.approx(np.sqrt(0.125 / 5))


def test_a_corpus_too_small_for_one_validation_window_is_refused_before_writing(tmp_path):
    from flopwise.data.prepare import bundled_corpus, prepare

    text = tmp_path / "few.txt"
    text.write_text("<|endoftext|>".join(bundled_corpus()[0].read_text().split("<|endoftext|>")[:40]))
    corpus = prepare([text], vocab_size=384, out=tmp_path / "prepared", log=lambda m: None)
    assert corpus.meta["n_tokens_val"] < 1025 <= corpus.meta["n_tokens_train"]
    for argv in (["autopilot", "--budget", "auto"], ["sweep", "run", "--budgets", "auto"]):
        out = tmp_path / argv[0]
        r = subprocess.run([sys.executable, "-m", "flopwise", *argv, "--data", str(corpus.path), "--seq-len", "1024",
                            "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "less than one context window" in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()


def test_sweep_run_refuses_a_folder_holding_another_design(tmp_path, bundled):
    from flopwise.sweep.design import write_design

    out = tmp_path / "sw"
    runs = design_sweep([4e11, 1e12], vocab_size=bundled.vocab_size, seq_len=128)
    write_design(out, runs, {"corpus": str(bundled.path), "corpus_hash": bundled.meta["hash"]})
    before = (out / "sweep.json").read_bytes()
    r = subprocess.run([sys.executable, "-m", "flopwise", "sweep", "run", "--data", str(bundled.path), "--budgets",
                        "5e11,1e12", "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds another sweep" in r.stderr and "Traceback" not in r.stderr
    assert (out / "sweep.json").read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["sweep.json"]


def test_autopilot_falls_back_to_the_priors_exponents_when_the_free_fit_is_not_identifiable():
    from dataclasses import replace

    from flopwise.autopilot import _fallback_fit, _plan_checks
    from flopwise.config import AutopilotConfig

    odd = ParametricLaw(E=1.7, A=400.0, B=400.0, alpha=0.9, beta=0.1)
    runs = replace(_sweep(odd, noise=0.002), epochs=None)
    free = _fit(runs)
    assert free["verdict"] == NOT_INFORMATIVE
    runs = replace(runs, epochs=np.full(len(runs), 0.5))  # a sweep's runs carry epochs; none repeats its data
    fit, used = _fallback_fit(runs, free, AutopilotConfig(bootstrap=100), 1, 1e20, None)
    prior = REGISTRY[DEFAULT_LAW]  # the autopilot's prior
    assert fit["alpha"] == prior.alpha and fit["beta"] == prior.beta and "fallback" in used["law"]
    assert used["why"].startswith("the free fit is not identifiable") and "N_opt ~ C^0.1" in used["why"]
    checks, verdict_ = _plan_checks(free, fit, used)
    names = {c["name"] for c in checks}
    assert "law" in names and "free_fit.exponent_a" in names
    assert verdict_ in ("usable with caveats", NOT_INFORMATIVE) and verdict_ != SOUND
    assert _plan_checks(free, free, {"law": "fitted"}) == (free["checks"], free["verdict"])


def test_prediction_width_check():
    from flopwise.laws.trust import prediction_check

    assert prediction_check(3.0, [2.85, 3.15])["passed"]  # ±5%
    wide = prediction_check(2.747, [1.660, 3.826])  # autopilot at 3.2e13 FLOPs (Chinchilla prior), bundled corpus
    assert not wide["passed"] and wide["value"] == pytest.approx(0.394, abs=1e-3) and wide["severity"] == "caveat"


@pytest.mark.parametrize("min_steps", [100, 400])
def test_designed_batches_are_kept_by_the_trainer_so_steps_and_wsd_checkpoints_line_up(min_steps):
    """resolve() rounds a batch that gradient accumulation cannot split evenly; the design must not pick one
    (a WSD trunk would end before the checkpoint its branch starts from, and the step floor would be missed)."""
    from flopwise.config import SWEEP_MICRO_BATCH, TrainConfig, resolve
    from flopwise.laws.flops import Shape
    from flopwise.sweep.design import design_wsd_sweep

    budgets = [2.61e12, 2.61e12 * 2.5, 2.61e12 * 6.25]
    for runs in (design_sweep(budgets, 1024, 128, min_steps=min_steps),
                 design_wsd_sweep(budgets, 1024, 128, min_steps=min_steps)):
        for r in runs:
            res = resolve(Shape(**r.shape), TrainConfig(n_tokens=r.n_tokens, micro_batch=SWEEP_MICRO_BATCH,
                                                        **{k: v for k, v in r.options.items()
                                                           if k in ("batch_tokens", "warmup_steps", "lr")}))
            assert res.tokens_per_step == r.options["batch_tokens"]
            if r.budget > 0:
                assert res.steps >= min_steps
            if r.options.get("save_at_steps"):
                assert res.steps >= max(r.options["save_at_steps"])


def test_the_named_budget_is_accepted_when_a_larger_one_would_deepen_the_sweep():
    with pytest.raises(FlopwiseError) as e:
        design_sweep([1e12], vocab_size=256, seq_len=1024)
    named = float(str(e.value).rsplit(" is ", 1)[1].split()[0])
    assert design_sweep([named], vocab_size=256, seq_len=1024)


def test_an_optimum_beyond_the_start_grid_is_a_caveat_not_a_failure():
    hard = ParametricLaw(E=3.4, A=400.0, B=410.0, alpha=0.34, beta=0.28)  # e = log 3.4 > 1, the grid's edge
    result = _fit(_sweep(hard))
    checks = _by_name(result)
    assert checks["grid_edge"]["value"] == ["e"] and not checks["grid_edge"]["passed"]
    assert checks["bounds"]["passed"] and result["verdict"] == "usable with caveats"
    assert result["E"] == pytest.approx(3.4, rel=0.05)
