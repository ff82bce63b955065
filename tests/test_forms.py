"""Law forms (chinchilla, farseer, data-constrained), their selection by held-out error, and the
parameter-counting conventions."""

import json
import math

import numpy as np
import pytest

from flopwise.errors import FlopwiseError
from flopwise.laws import allocate
from flopwise.laws.approach3 import loss_from_thetas, objective
from flopwise.laws.fit import CONVENTION_FACTOR, fit_form, fit_runs, synthetic_runs
from flopwise.laws.flops import Shape, n_params_non_embedding, n_params_total
from flopwise.laws.forms import FORMS, Data
from flopwise.laws.isoflop import OFF_CENTRE, fit_isoflop, sampling_check
from flopwise.laws.law import REGISTRY, ParametricLaw, load_law, save_law
from flopwise.laws.plan import make_plan
from flopwise.laws.runs import Runs, load_runs
from flopwise.laws.shape import family_shape

BUDGETS = np.geomspace(1e17, 1e21, 5)
CORPUS = 3e9  # unique tokens: runs at the small budgets see it once, at the large ones up to ~60 times

LAWS = {
    "chinchilla": ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30),
    "farseer": ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30, gamma=-0.1, form="farseer"),
    "data-constrained": ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30, form="data-constrained",
                                      r_d_star=4.0),
}


def _runs(form: str, noise: float, seed: int = 0) -> Runs:
    return synthetic_runs(LAWS[form], BUDGETS, 9, noise=noise, seed=seed, unique_tokens=CORPUS)


@pytest.mark.parametrize("form", list(LAWS))
def test_each_form_recovers_its_own_parameters_from_noisy_runs(form):
    law = LAWS[form]
    runs = _runs(form, noise=0.002)
    p = fit_form(runs, form).params
    assert p["alpha"] == pytest.approx(law.alpha, abs=0.03)
    assert p["beta"] == pytest.approx(law.beta, abs=0.03)
    assert p["E"] == pytest.approx(law.E, rel=0.03)
    if form == "farseer":
        assert p["gamma"] == pytest.approx(law.gamma, abs=0.03)
    if form == "data-constrained":
        assert np.max(runs.epochs) > 30
        assert p["r_d_star"] == pytest.approx(law.r_d_star, rel=0.25)
    # and the allocation it plans with: N_opt at 100x the sweep's largest budget
    fitted = fit_form(runs, form).law()
    assert float(fitted.optimal(1e23)[0]) == pytest.approx(float(law.optimal(1e23)[0]), rel=0.3)


@pytest.mark.parametrize("form", list(LAWS))
def test_selection_by_held_out_error_picks_the_generating_form(form):
    r = fit_runs(_runs(form, noise=0.002, seed=1), approach="3", n_boot=0, forms=list(LAWS))
    rows = {row["form"]: row for row in r["forms"]}
    assert r["form"] == form and r["selected"]["form"] == form and rows[form]["selected"]
    assert sum(row["selected"] for row in r["forms"]) == 1
    assert r["holdout"]["k"] == 1  # forms are scored on the largest budget, held out
    for row in r["forms"]:
        assert row["holdout_error"] >= 0 and set(row["params"]) >= {"E", "A", "B", "alpha", "beta", "a", "b"}
    if form != "chinchilla":  # the misspecified Chinchilla form extrapolates worse
        assert rows["chinchilla"]["holdout_error"] > 1.5 * rows[form]["holdout_error"]


def test_data_constrained_form_needs_runs_that_repeated_their_data():
    runs = synthetic_runs(LAWS["chinchilla"], BUDGETS, 7, noise=0.002)
    with pytest.raises(FlopwiseError, match="repeated their data"):
        fit_form(runs, "data-constrained")
    r = fit_runs(runs, approach="3", n_boot=0, forms=["chinchilla", "farseer"])
    assert r["selected"]["form"] == "chinchilla"  # farseer's gamma is ~0 on Chinchilla data: not worth a parameter
    r = fit_runs(runs, approach="3", n_boot=0, forms=list(LAWS))  # --forms all: the form that cannot be fitted is
    rows = {row["form"]: row for row in r["forms"]}                 # skipped, saying why
    assert "repeated their data" in rows["data-constrained"]["skipped"] and r["form"] == "chinchilla"
    with pytest.raises(FlopwiseError, match="3\\+ budgets"):
        fit_runs(runs.subset(np.isin(runs.budget, runs.budgets[:2])), approach="3", n_boot=0,
                 forms=["chinchilla", "farseer"])


@pytest.mark.parametrize("form", ["farseer", "data-constrained"])
def test_every_form_round_trips_through_a_law_file_and_plans(tmp_path, form):
    law = LAWS[form]
    save_law(law, tmp_path / "law.json")
    back = load_law(tmp_path / "law.json")
    assert back == law
    n, d = (float(x) for x in law.optimal(1e21))
    # the closed-form optimum is the minimum of the loss along C = 6ND
    for f in (0.9, 1.1):
        assert law.loss(n * f, 1e21 / (6 * n * f)) > law.loss(n, d)
    p = make_plan(1e21, back, unique_tokens=1e10)
    assert p["form"] == form and p["data_constrained"]["r_d_star"] == (4.0 if form == "data-constrained" else 15.4)
    ia = allocate.inference_aware(law, 1e21, 0.0)  # with no serving, back to the compute-optimal model
    assert ia.n_params == pytest.approx(n, rel=1e-6)


@pytest.mark.parametrize("form", list(FORMS))
def test_objective_evaluates_the_forms_own_terms(form):
    f = FORMS[form]
    runs = _runs("data-constrained", noise=0.01)
    x = Data(np.log(runs.n_params), np.log(runs.n_tokens), np.log(runs.unique_tokens))
    theta = np.r_[np.log([300.0, 900.0, 1.8]), 0.35, 0.30, [-0.1] if form == "farseer" else
                  [math.log(4.0)] if f.needs_repeats else []]
    residual = np.log(np.exp(f.log_terms(theta, x)[:, 0, :]).sum(axis=0)) - np.log(runs.loss)
    huber = np.where(np.abs(residual) <= 1e-3, 0.5 * residual**2, 1e-3 * (np.abs(residual) - 0.5e-3))
    assert objective(theta, x, np.log(runs.loss), 1e-3, f)[0] == pytest.approx(huber.sum(), rel=1e-12)
    # and they are the law's own formula (ParametricLaw.loss, with D' where the form has it)
    law = ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30, form=form,
                        gamma=-0.1 if form == "farseer" else 0.0, r_d_star=4.0 if f.needs_repeats else None)
    d = allocate.effective_tokens(runs.n_tokens, runs.unique_tokens, 4.0) if f.needs_repeats else runs.n_tokens
    assert loss_from_thetas(theta, runs.n_params, runs.n_tokens, form, runs.unique_tokens)[0] == pytest.approx(
        law.loss(runs.n_params, d), rel=1e-12)


def test_plan_from_a_fit_json_without_an_approach_3_law_names_the_fix(tmp_path):
    (tmp_path / "fit.json").write_text(json.dumps({"approach": "2", "checks": [], "verdict": "sound", "n_runs": 9}))
    with pytest.raises(FlopwiseError, match="holds no Approach 3 fit: plan with the law.json beside it"):
        load_law(tmp_path / "fit.json")


def test_law_forms_refuse_parameters_of_another_form():
    with pytest.raises(FlopwiseError, match="gamma"):
        ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30, gamma=0.1)
    with pytest.raises(FlopwiseError, match="r_d_star"):
        ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30, form="data-constrained")
    with pytest.raises(FlopwiseError, match="beta \\+ gamma"):
        ParametricLaw(E=1.8, A=300.0, B=900.0, alpha=0.35, beta=0.30, gamma=-0.4, form="farseer")


def test_default_law_plans_15_to_25_tokens_per_parameter_at_1e21():
    p = make_plan(1e21)
    assert p["law"] == "epoch" and 15 <= p["tokens_per_param"] <= 25
    assert 30 < make_plan(1e21, "chinchilla")["tokens_per_param"] < 36  # the published constants: 33.9
    assert "known to be off" in REGISTRY["chinchilla"].citation


def test_non_embedding_count_by_hand():
    s = Shape(vocab_size=1024, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=192, seq_len=128)
    per_layer = 4 * 64 * 64 + 3 * 64 * 192 + 2 * 64  # q, k, v, o; gate, up, down; two norm gains
    assert n_params_non_embedding(s) == 2 * per_layer + 64 == 106_816
    assert n_params_total(s) == 106_816 + 2 * 1024 * 64  # embedding and untied head


def _family_sweep(tmp_path, law: ParametricLaw, budgets, vocab: int = 1024, depth: int = 2):
    """A sweep folder of final.json files whose loss follows ``law`` in total parameters, over the sweep's shape
    family (tied embeddings), where the embedding is most of the small models."""
    for c in budgets:
        n_opt = float(law.optimal(c)[0])
        for target in n_opt * np.geomspace(1 / 6, 6, 7):
            s = family_shape(target, depth, vocab, 128)
            n = n_params_total(s)
            d = c / (6 * n)
            run = tmp_path / f"c{c:.2e}-n{n:09d}"
            run.mkdir(parents=True, exist_ok=True)
            (run / "final.json").write_text(json.dumps({
                "n_params": n, "n_params_non_embedding": n_params_non_embedding(s), "n_tokens": d,
                "val_loss": float(law.loss(n, d)), "flops": c, "budget": c}))
    return tmp_path


def test_counting_non_embedding_parameters_raises_the_exponent_on_embedding_heavy_runs(tmp_path):
    law = REGISTRY["epoch"]
    sweep = _family_sweep(tmp_path / "s", law, np.geomspace(3e11, 3e13, 4))
    runs = load_runs(sweep)
    assert runs.conventions == ["total", "non_embedding"]
    ne = runs.in_convention("non_embedding")
    assert np.all(ne.n_params < runs.n_params) and np.min(ne.n_params / runs.n_params) < 0.5  # embedding-heavy
    r = fit_runs(runs, approach="3", n_boot=0, conventions=["non_embedding"], budgets=[1e15])
    a_total, a_ne = r["conventions"]["total"]["a"], r["conventions"]["non_embedding"]["a"]
    assert a_total == pytest.approx(law.a, abs=0.03)  # the generating law's own convention
    assert a_ne > a_total + 0.05  # Kaplan's direction: non-embedding N grows faster with compute
    # far beyond the sweep the two exponents' plans for D part by more than CONVENTION_FACTOR, and it says so
    far = fit_runs(runs, approach="3", n_boot=0, conventions=["non_embedding"], budgets=[1e15, 1e21])
    d_opt = {c: b["optimal"][-1]["d_opt"] for c, b in far["conventions"].items()}
    assert far["convention_factor"] == pytest.approx(max(d_opt.values()) / min(d_opt.values()))
    assert far["convention_factor"] > CONVENTION_FACTOR
    assert any("apart at the same nominal budget" in w for w in far["warnings"])
    assert not any("apart at the same nominal budget" in w for w in
                   fit_runs(runs, approach="3", n_boot=0, budgets=[1e15])["warnings"])  # one convention: no warning


def test_sampling_check_measures_how_far_the_minimum_is_from_the_centre():
    c = sampling_check(np.log([1e4, 1e5, 1e6, 1e7, 1e8]), math.log(1e5))  # four decades; N_opt one above the bottom
    assert c["offset"] == pytest.approx(-0.5) and c["offset_decades"] == pytest.approx(-1.0)
    assert c["span"] == pytest.approx(1e4)
    law = LAWS["chinchilla"]
    runs = synthetic_runs(law, BUDGETS, 7, spread=8.0)
    assert not [w for w in fit_isoflop(runs, n_boot=0)["warnings"] if "off-centre" in w]
    # the same budgets with every size shifted 3x up: the minimum sits toward the smallest size
    shifted = Runs(runs.n_params * 3, runs.n_tokens / 3, law.loss(runs.n_params * 3, runs.n_tokens / 3),
                   runs.flops, runs.budget, runs.name)
    a2 = fit_isoflop(shifted, n_boot=0)
    assert all(g["offset"] < -OFF_CENTRE for g in a2["groups"])
    assert any("off-centre among the sizes, toward the smallest" in w for w in a2["warnings"])


def test_cli_fit_forms_all_convention_both_writes_the_selected_law(tmp_path):
    import subprocess
    import sys

    runs = _runs("data-constrained", noise=0.002, seed=2)
    ne = runs.n_params * 0.6  # a table may carry both counts
    path = tmp_path / "runs.csv"
    path.write_text("n_params,n_params_non_embedding,n_tokens,loss,epochs,budget\n" + "".join(
        f"{n},{m},{d},{y},{e},{c}\n" for n, m, d, y, e, c in
        zip(runs.n_params, ne, runs.n_tokens, runs.loss, runs.epochs, runs.budget, strict=True)))
    res = subprocess.run([sys.executable, "-m", "flopwise", "fit", str(path), "--forms", "all", "--convention", "both",
                          "--bootstrap", "30", "--no-plots", "--json", "--budgets", "1e22"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {(r["form"], r["convention"]) for r in out["forms"]} == {
        (f, c) for f in LAWS for c in ("total", "non_embedding")}
    assert out["selected"] == {**out["selected"], "form": "data-constrained", "convention": "total"}
    assert set(out["conventions"]) == {"total", "non_embedding"}
    # N scaled by a constant moves only the coefficient: the exponents agree across conventions
    assert out["conventions"]["non_embedding"]["a"] == pytest.approx(out["conventions"]["total"]["a"], abs=0.02)
    law = json.loads((tmp_path / "runs-fit" / "law.json").read_text())
    assert law["form"] == "data-constrained" and law["r_d_star"] == pytest.approx(4.0, rel=0.25)
    plan = subprocess.run([sys.executable, "-m", "flopwise", "plan", "--flops", "1e21", "--law",
                           str(tmp_path / "runs-fit" / "fit.json"), "--unique-tokens", "1e10", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    p = json.loads(plan.stdout)
    assert p["form"] == "data-constrained" and p["data_constrained"]["r_d_star"] == pytest.approx(law["r_d_star"])
    bad = subprocess.run([sys.executable, "-m", "flopwise", "fit", str(path), "--forms", "kaplan"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown law form 'kaplan'" in bad.stderr and "Traceback" not in bad.stderr
