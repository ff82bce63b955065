"""Comparing two recipes' laws: the compute multiplier, and the optimizer a law holds for."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from flopwise.laws.compare import compare_laws, flops_for_loss, optimal_loss
from flopwise.laws.fit import fit_runs, law_json, synthetic_runs
from flopwise.laws.law import ParametricLaw, law_from_dict
from flopwise.laws.runs import load_runs

BASE = ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30)
BUDGETS = np.geomspace(1e17, 1e20, 4)


def better_by(k: float) -> ParametricLaw:
    """A law that reaches at C what BASE reaches at k C: N and D each worth sqrt(k) more (L_B(N, D) =
    L_BASE(sqrt(k) N, sqrt(k) D), so its optimal loss at C is BASE's at k C)."""
    s = math.sqrt(k)
    return ParametricLaw(E=BASE.E, A=BASE.A * s**-BASE.alpha, B=BASE.B * s**-BASE.beta, alpha=BASE.alpha,
                         beta=BASE.beta)


def _theta(law):
    return np.array([[math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta]])


def test_optimal_loss_and_its_inverse_match_the_law():
    for c in (1e18, 1e22):
        n, d = BASE.optimal(c)
        assert optimal_loss(_theta(BASE), c)[0] == pytest.approx(float(BASE.loss(n, d)), rel=1e-12)
        assert flops_for_loss(_theta(BASE), BASE.loss(n, d))[0] == pytest.approx(c, rel=1e-9)
    assert flops_for_loss(_theta(BASE), BASE.E - 0.1)[0] == np.inf  # below E: never
    assert optimal_loss(_theta(better_by(1.5)), 1e19)[0] == pytest.approx(optimal_loss(_theta(BASE), 1.5e19)[0])


def test_a_known_compute_multiplier_is_recovered_within_its_interval():
    a = fit_runs(synthetic_runs(BASE, BUDGETS, 7, noise=0.003, seed=0), approach="3", n_boot=300)
    b = fit_runs(synthetic_runs(better_by(1.5), BUDGETS, 7, noise=0.003, seed=1), approach="3", n_boot=300)
    r = compare_laws(a, b, [1e18, 1e20], names=("adamw", "muon"))
    for row in r["budgets"]:
        iv = row["compute_multiplier_interval"]
        assert row["stronger"] == "muon" and row["loss_difference"] < 0
        assert iv["lower"] <= 1.5 <= iv["upper"] and row["compute_multiplier"] == pytest.approx(1.5, rel=0.1)
    assert set(r["exponents"]) == {"adamw", "muon"} and r["exponents"]["muon"]["a"] == pytest.approx(BASE.a, abs=0.05)
    same = compare_laws(a, a, [1e19])["budgets"][0]
    assert same["compute_multiplier"] == pytest.approx(1.0) and same["loss_difference"] == 0.0


def _sweep(path, law, optimizer, seed):
    runs = synthetic_runs(law, BUDGETS, 6, noise=0.003, seed=seed)
    for i, (n, d, y, c) in enumerate(zip(runs.n_params, runs.n_tokens, runs.loss, runs.budget, strict=True)):
        (path / f"r{i}").mkdir(parents=True)
        (path / f"r{i}" / "final.json").write_text(json.dumps(
            {"n_params": n, "n_tokens": d, "val_loss": y, "flops": c, "budget": c, "optimizer": optimizer}))
    return path


def test_sweep_compare_cli_and_the_optimizer_in_law_json(tmp_path):
    a, b = _sweep(tmp_path / "adamw", BASE, "adamw", 0), _sweep(tmp_path / "muon", better_by(2.0), "muon", 1)
    assert load_runs(b).optimizer == "muon"
    law = law_from_dict(law_json(fit_runs(load_runs(b), approach="3", n_boot=0)))
    assert law.extra["optimizer"] == "muon"  # law.json says which optimizer its runs were trained with
    res = subprocess.run([sys.executable, "-m", "flopwise", "sweep", "compare", str(a), str(b), "--bootstrap", "100",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["names"] == ["adamw", "muon"] and len(out["plots"]) == 2
    assert (tmp_path / "adamw-vs-muon" / "compare.json").exists()
    rows = {r["flops"]: r for r in out["budgets"]}
    assert len(rows) == 6  # the 4 budgets, 10x and 100x the largest
    inside = rows[min(rows)]
    assert inside["stronger"] == "muon" and inside["compute_multiplier"] == pytest.approx(2.0, rel=0.15)
    plain = subprocess.run([sys.executable, "-m", "flopwise", "sweep", "compare", str(a), str(b), "--bootstrap", "0",
                            "--budgets", "1e19", "--json", "--out", str(tmp_path / "c0")],
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr
    row = json.loads(plain.stdout)["budgets"][0]  # no resamples: estimates without intervals, valid JSON
    assert row["compute_multiplier_interval"] is None and row["compute_multiplier"] == pytest.approx(2.0, rel=0.15)
    bad = subprocess.run([sys.executable, "-m", "flopwise", "sweep", "compare", str(a), str(b), "--budgets", "1e20,x"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--budgets must be" in bad.stderr and "Traceback" not in bad.stderr
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in list(a.iterdir())[:3] + list(b.iterdir())[:3]:
        (mixed / (p.parent.name + p.name)).mkdir()
        (mixed / (p.parent.name + p.name) / "final.json").write_text((p / "final.json").read_text())
    runs = load_runs(mixed)
    assert runs.optimizer == "mixed" and any("different optimizers" in w for w in runs.warnings)


def test_autopilot_optimizer_comparison_section_and_option_check(tmp_path):
    from flopwise.autopilot import autopilot
    from flopwise.config import AutopilotConfig
    from flopwise.errors import FlopwiseError
    from flopwise.report.report import _optimizer_section

    with pytest.raises(FlopwiseError, match="--compare-optimizer must be the other optimizer"):
        autopilot(tmp_path / "ap", None, AutopilotConfig(compare_optimizer="muon"), log=lambda m: None)
    assert not (tmp_path / "ap").exists()  # refused before anything is written
    a = fit_runs(synthetic_runs(BASE, BUDGETS, 7, noise=0.003, seed=0), approach="3", n_boot=100)
    b = fit_runs(synthetic_runs(better_by(1.5), BUDGETS, 7, noise=0.003, seed=1), approach="3", n_boot=100, seed=1)
    c = compare_laws(a, b, [1e18, 1e20], names=("adamw", "muon"))
    c.update(sweep="ap/sweep-muon", sweep_flops=1e20, verdicts={"adamw": "sound", "muon": "not informative"})
    [(head, paras, rows)] = _optimizer_section({"optimizer_comparison": c})
    assert head == "Optimizers: adamw against muon" and rows[0][1:3] == ["loss, adamw", "loss, muon"]
    assert len(rows) == 3 and rows[-1][3] == "muon" and float(rows[-1][4]) == pytest.approx(1.5, rel=0.1)
    assert "muon is stronger" in paras[0] and "say little" in paras[1]
