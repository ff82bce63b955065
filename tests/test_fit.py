import json
import math

import numpy as np
import pytest

from flopwise.errors import FlopwiseError
from flopwise.laws.approach3 import PARAMS, bootstrap_thetas, fit_parametric, objective, theta_to_params
from flopwise.laws.fit import fit_runs, law_json, public, synthetic_runs
from flopwise.laws.forms import FORMS, Data
from flopwise.laws.isoflop import fit_isoflop
from flopwise.laws.law import REGISTRY, ParametricLaw, law_from_dict
from flopwise.laws.runs import load_runs, runs_from_records

TRUE = ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30)


def theta_of(law):
    return np.array([math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta])


@pytest.mark.parametrize("form", list(FORMS))
def test_gradient_is_exact(form):
    f = FORMS[form]
    r = synthetic_runs(TRUE, [1e17, 1e18, 1e19], 6, noise=0.01, seed=0)
    unique = r.n_tokens / np.linspace(1.0, 12.0, len(r))  # up to 12 epochs, so R_D* matters
    x = Data(np.log(r.n_params), np.log(r.n_tokens), np.log(unique))
    args = (x, np.log(r.loss), 1e-3, f)
    theta = np.r_[theta_of(TRUE), [0.05] if form == "farseer" else [math.log(10.0)] if f.needs_repeats else []]
    theta = theta + 0.02 * np.arange(1, f.n_params + 1) * (-1.0) ** np.arange(f.n_params)
    _, grad = objective(theta, *args)
    for i in range(f.n_params):
        h = np.zeros(f.n_params)
        h[i] = 1e-6
        numeric = (objective(theta + h, *args)[0] - objective(theta - h, *args)[0]) / 2e-6
        assert grad[i] == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_noise_free_recovery_within_1e_3():
    r = synthetic_runs(TRUE, np.geomspace(1e17, 1e21, 5), 12, noise=0.0)
    p = fit_parametric(r.n_params, r.n_tokens, r.loss).params
    assert abs(p["alpha"] - 0.35) < 1e-3 and abs(p["beta"] - 0.30) < 1e-3
    assert abs(p["E"] / 1.8 - 1) < 1e-3


@pytest.mark.parametrize("n_budgets, per_budget", [(4, 15), (6, 20), (9, 27)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_recovery(n_budgets, per_budget, seed):
    # 60 to 243 runs with 0.5% multiplicative noise
    r = synthetic_runs(TRUE, np.geomspace(1e17, 1e21, n_budgets), per_budget, noise=0.005, seed=seed)
    p = fit_parametric(r.n_params, r.n_tokens, r.loss).params
    assert abs(p["alpha"] - 0.35) < 0.02 and abs(p["beta"] - 0.30) < 0.02
    assert abs(p["E"] / 1.8 - 1) < 0.02


def test_fit_started_at_chinchilla_moves_to_the_data():
    r = synthetic_runs(TRUE, np.geomspace(1e17, 1e21, 5), 10, noise=0.0)
    chin = REGISTRY["chinchilla"]
    only_chinchilla = {p: [v] for p, v in zip(PARAMS, theta_of(chin), strict=True)}
    p = fit_parametric(r.n_params, r.n_tokens, r.loss, grid=only_chinchilla).params
    assert abs(p["alpha"] - 0.35) < 1e-3 and abs(p["beta"] - 0.30) < 1e-3
    assert abs(p["alpha"] - chin.alpha) > 0.005


def test_bootstrap_is_seeded_and_covers_truth():
    r = synthetic_runs(TRUE, np.geomspace(1e17, 1e20, 5), 12, noise=0.005, seed=3)
    fit = fit_parametric(r.n_params, r.n_tokens, r.loss)
    a = bootstrap_thetas(r.n_params, r.n_tokens, r.loss, fit, 120, seed=7, workers=1)
    b = bootstrap_thetas(r.n_params, r.n_tokens, r.loss, fit, 120, seed=7, workers=2)
    assert np.allclose(a, b)
    p = theta_to_params(a)
    lo, hi = np.percentile(p["alpha"], [2.5, 97.5])
    assert lo < 0.35 < hi and hi - lo < 0.1


@pytest.mark.slow
def test_bootstrap_interval_coverage_over_50_seeds():
    covered = {"alpha": 0, "beta": 0}
    for seed in range(50):
        r = synthetic_runs(TRUE, np.geomspace(1e17, 1e20, 5), 12, noise=0.01, seed=seed)
        fit = fit_parametric(r.n_params, r.n_tokens, r.loss, n_starts=8)
        p = theta_to_params(bootstrap_thetas(r.n_params, r.n_tokens, r.loss, fit, 300, seed=seed))
        for key, truth in (("alpha", 0.35), ("beta", 0.30)):
            lo, hi = np.percentile(p[key], [5, 95])
            covered[key] += lo <= truth <= hi
    assert covered["alpha"] >= 40 and covered["beta"] >= 40, covered


def test_approach2_recovers_allocation_exponent():
    r = synthetic_runs(TRUE, np.geomspace(1e17, 1e21, 6), 9, noise=0.002, seed=0, spread=6)
    a2 = fit_isoflop(r, degree=2, n_boot=200)
    assert abs(a2["a"] - TRUE.a) < 0.03
    assert a2["intervals"]["a"]["lower"] < a2["a"] < a2["intervals"]["a"]["upper"]
    a3 = fit_isoflop(r, degree=3, n_boot=0)
    assert abs(a3["a"] - TRUE.a) < 0.03


def test_approach2_warns_when_minimum_not_bracketed():
    r = synthetic_runs(TRUE, [1e18, 1e19, 1e20], 7, noise=0.0, spread=8)
    keep = np.ones(len(r), bool)
    keep[17:] = False  # keep only the three smallest sizes of the last budget: its minimum lies beyond them
    a2 = fit_isoflop(r.subset(keep), n_boot=0)
    assert any("1e+20: the minimum" in w and "outside the runs' range" in w for w in a2["warnings"])
    assert any("1e+20: only 3 runs" in w for w in a2["warnings"])
    assert [g["bracketed"] for g in a2["groups"]] == [True, True, False]


def test_single_budget_is_an_error_for_approach2():
    r = synthetic_runs(TRUE, [1e19], 8)
    with pytest.raises(FlopwiseError, match="two or more FLOP budgets"):
        fit_isoflop(r)


def test_fit_runs_holdout_and_law_json_feed_plan(tmp_path):
    r = synthetic_runs(TRUE, np.geomspace(1e17, 1e20, 5), 8, noise=0.003, seed=0)
    out = fit_runs(r, n_boot=60, holdout_largest=1, budgets=[1e21], workers=1)
    h = out["holdout"]
    assert h["n_test"] == 8 and h["mean_abs_rel_error"] < 0.02
    inside = [r["lower"] <= r["loss"] <= r["upper"] for r in h["runs"]]  # coverage counts these runs' intervals
    assert h["coverage"] == pytest.approx(np.mean(inside)) and all(r["lower"] < r["upper"] for r in h["runs"])
    for key in ("E", "A", "B", "alpha", "beta", "a", "b", "n_runs", "objective", "intervals"):
        assert key in out
    assert set(out["intervals"]["alpha"]) >= {"lower", "upper", "level"}
    doc = json.loads(json.dumps(law_json(public(out))))
    law = law_from_dict(doc)
    assert isinstance(law, ParametricLaw) and law.alpha == pytest.approx(out["alpha"])
    from flopwise.laws.plan import make_plan

    p = make_plan(1e21, law)
    assert p["n_params"] == pytest.approx(out["optimal"][0]["n_opt"], rel=1e-9)


def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")


def test_table_aliases_and_errors(tmp_path):
    r = synthetic_runs(TRUE, [1e18, 1e19], 4)
    path = tmp_path / "runs.csv"
    _write_csv(path, ["Params", "TOKENS", "val_loss"], zip(r.n_params, r.n_tokens, r.loss, strict=True))
    runs = load_runs(path)
    assert len(runs) == 8 and len(runs.budgets) == 2
    _write_csv(path, ["params", "loss"], [(1e6, 3.0)])
    with pytest.raises(FlopwiseError, match="no column for n_tokens .*tokens"):
        load_runs(path)
    for bad, msg in (("abc", "not a number"), ("-5", "positive finite"), ("nan", "positive finite"),
                     ("inf", "positive finite")):
        _write_csv(path, ["N", "D", "loss"], [(1e6, 1e8, 3.0), (2e6, 1e8, bad)])
        with pytest.raises(FlopwiseError, match=f"row 2: loss .*{msg}"):
            load_runs(path)


def test_bad_tables_give_clear_errors():
    few = [{"N": 1e6 * (i + 1), "D": 1e9, "loss": 3.0} for i in range(4)]
    with pytest.raises(FlopwiseError, match="too few to fit 5 parameters"):
        fit_runs(runs_from_records(few), n_boot=0)
    same_n = [{"N": 1e6, "D": 1e9 * (i + 1), "loss": 3.0 - 0.1 * i} for i in range(6)]
    with pytest.raises(FlopwiseError, match="same N"):
        fit_runs(runs_from_records(same_n), approach="3", n_boot=0)
    dup = runs_from_records(few + few[:1])
    assert any("duplicated" in w for w in dup.warnings)


def test_bound_hits_are_reported():
    # a loss that does not depend on D pushes beta to its lower bound
    n = np.repeat(np.geomspace(1e6, 1e8, 6), 3)
    d = np.tile([1e9, 1e10, 1e11], 6)
    loss = 1.8 + 300.0 / n**0.35
    fit = fit_parametric(n, d, loss)
    assert any("B/D^beta term is negligible" in w for w in fit.warnings)


def _sweep_dir(tmp_path, law, budgets, per_budget=6):
    r = synthetic_runs(law, budgets, per_budget, noise=0.0, spread=6)
    for i, (n, d, loss, c) in enumerate(zip(r.n_params, r.n_tokens, r.loss, r.budget, strict=True)):
        run = tmp_path / f"run{i:03d}"
        run.mkdir()
        (run / "final.json").write_text(json.dumps({"n_params": n, "n_tokens": d, "val_loss": loss, "flops": c}))
        tokens = np.geomspace(d / 100, d, 30)
        (run / "metrics.jsonl").write_text("\n".join(
            json.dumps({"step": j, "tokens": t, "flops": 6 * n * t, "loss": float(law.loss(n, t))})
            for j, t in enumerate(tokens)) + "\n{torn")
    return tmp_path


def test_sweep_directory_and_approach1(tmp_path):
    sweep = _sweep_dir(tmp_path, TRUE, np.geomspace(1e17, 1e20, 4))
    runs = load_runs(sweep)
    assert len(runs) == 24 and len(runs.curves) == 24
    out = fit_runs(runs, approach="all", n_boot=0)
    assert abs(out["alpha"] - 0.35) < 1e-3
    assert out["approach1"]["a"] == pytest.approx(TRUE.a, abs=0.1)


def test_cli_fit_json_and_plots(tmp_path):
    import subprocess
    import sys

    r = synthetic_runs(TRUE, np.geomspace(1e17, 1e20, 4), 6, noise=0.003, seed=0)
    path = tmp_path / "runs.jsonl"
    path.write_text("\n".join(json.dumps({"n_params": n, "n_tokens": d, "loss": y})
                              for n, d, y in zip(r.n_params, r.n_tokens, r.loss, strict=True)))
    res = subprocess.run([sys.executable, "-m", "flopwise", "fit", str(path), "--bootstrap", "60", "--json",
                          "--holdout-largest", "1", "--out", str(tmp_path / "fit")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["n_runs"] == 24 and "holdout" in out and len(out["plots"]) == 8
    assert (tmp_path / "fit" / "isoflop.png").stat().st_size > 1000
    plan = subprocess.run([sys.executable, "-m", "flopwise", "plan", "--flops", "1e21", "--law",
                           out["law_file"], "--json"], capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["law"] == "fitted"
    bad = subprocess.run([sys.executable, "-m", "flopwise", "fit", str(tmp_path / "none.csv")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


def test_fit_folder_allocation_by_approach2_and_plan_warnings(tmp_path):
    """Two tables never share a fit folder; Approach 2 answers at --budgets; a plan far beyond the fit warns."""
    import subprocess
    import sys

    from flopwise.laws.fit import synthetic_runs
    from flopwise.laws.law import REGISTRY

    runs = synthetic_runs(REGISTRY["epoch"], [1e17, 3e17, 1e18], n_per_budget=5, noise=0.01)
    rows = list(zip(runs.n_params, runs.n_tokens, runs.loss, strict=True))
    (tmp_path / "runs.csv").write_text("n_params,n_tokens,loss\n" + "".join(f"{n},{d},{x}\n" for n, d, x in rows))
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps({"n_params": n, "n_tokens": d, "loss": x}) + "\n"
                                                 for n, d, x in rows))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "flopwise", *map(str, args)], capture_output=True, text=True,
                              timeout=300)

    r = cli("fit", tmp_path / "runs.csv", "--bootstrap", "0", "--no-plots", "--forms", "chinchilla", "--budgets",
            "1e19", "--json")
    assert r.returncode == 0, r.stderr
    a2 = json.loads(r.stdout)["approach2"]
    assert [row["flops"] for row in a2["optimal"]] == [1e19] and a2["optimal"][0]["n_opt"] > 0
    r = cli("fit", tmp_path / "runs.jsonl", "--bootstrap", "0", "--no-plots")
    assert r.returncode == 2 and "holds the fit of" in r.stderr and "choose another --out" in r.stderr
    plan = cli("plan", "--flops", "1e24", "--law", tmp_path / "runs-fit" / "law.json", "--json")
    assert plan.returncode == 0, plan.stderr
    assert any("decades beyond" in w for w in json.loads(plan.stdout)["warnings"])
