import math

import numpy as np
import pytest

from flopwise.errors import FlopwiseError
from flopwise.laws import allocate
from flopwise.laws.law import REGISTRY
from flopwise.laws.plan import _shape_flops

CHIN, EPOCH = REGISTRY["chinchilla"], REGISTRY["epoch"]


def test_chinchilla_approach1_anchors():
    law = REGISTRY["chinchilla-approach1"]
    a = allocate.compute_optimal(law, 1.21e20)
    assert a.n_params == pytest.approx(1.0e9, rel=0.03)
    assert a.n_tokens == pytest.approx(20.2e9, rel=0.03)
    assert allocate.compute_optimal(law, 5.76e23).n_params == pytest.approx(67e9, rel=0.10)
    assert a.loss is None


def test_chinchilla_approach2_anchor():
    a = allocate.compute_optimal(REGISTRY["chinchilla-approach2"], 1.20e20)
    assert a.n_params == pytest.approx(1.0e9, rel=0.01) and a.n_tokens == pytest.approx(20.0e9, rel=0.01)


def test_epoch_tokens_per_param_at_chinchilla_budget():
    a = allocate.compute_optimal(EPOCH, 5.76e23)
    assert 15 < a.tokens_per_param < 25
    assert a.tokens_per_param == pytest.approx(18.2, abs=0.3)  # closed form, worked by hand


def test_kaplan_puts_most_compute_into_parameters():
    small, big = (allocate.compute_optimal(REGISTRY["kaplan"], c) for c in (1e20, 1e22))
    assert big.n_params / small.n_params == pytest.approx(100**0.73, rel=1e-9)


@pytest.mark.parametrize("bad", [0, -1e20, float("nan"), float("inf"), 1e36, "x"])
def test_bad_budgets(bad):
    with pytest.raises(FlopwiseError):
        allocate.compute_optimal(CHIN, bad)


def test_tradeoff_bigger_is_not_better():
    rows = allocate.size_tradeoff(CHIN, 1e22)
    opt = next(r for r in rows if r["factor"] == 1)
    assert opt["loss_excess"] == 0
    for r in rows:
        assert r["loss_excess"] >= 0
        assert 6 * r["n_params"] * r["n_tokens"] == pytest.approx(1e22)
    excess = {r["factor"]: r["loss_excess"] for r in rows}
    assert excess[10] > excess[4] > excess[2] > 0


@pytest.mark.parametrize("law", [CHIN, EPOCH])
@pytest.mark.parametrize("flops", [1e18, 1e21, 5.76e23])
def test_inference_aware_reduces_to_compute_optimal(law, flops):
    ia = allocate.inference_aware(law, flops, 0)
    opt = allocate.compute_optimal(law, flops)
    assert ia.n_params == pytest.approx(opt.n_params, rel=1e-6)
    assert ia.n_tokens == pytest.approx(opt.n_tokens, rel=1e-6)


def test_inference_aware_monotone_and_cheaper():
    flops = 1e22
    prev = allocate.inference_aware(CHIN, flops, 0)
    for d_inf in [1e10, 1e11, 1e12, 1e13, 1e14]:
        ia = allocate.inference_aware(CHIN, flops, d_inf)
        assert ia.n_params < prev.n_params and ia.n_tokens > prev.n_tokens
        assert float(CHIN.loss(ia.n_params, ia.n_tokens)) == pytest.approx(ia.loss, rel=1e-9)
        assert ia.total_flops <= ia.compute_optimal_total_flops * (1 + 1e-12)
        prev = ia
    # and a brute-force check that nothing on the iso-loss curve is cheaper
    ns = prev.n_params * np.logspace(-0.3, 0.3, 61)
    ns = ns[CHIN.A / ns**CHIN.alpha < prev.loss - CHIN.E]  # below this N no amount of data reaches the loss
    costs = [6 * n * allocate._tokens_for_loss(CHIN, n, prev.loss) + 2 * n * 1e14 for n in ns]
    assert min(costs) >= prev.total_flops * (1 - 1e-9)


def test_inference_aware_total_budget_is_the_dual():
    ia = allocate.inference_aware(CHIN, 1e21, 1e12)
    dual = allocate.inference_aware_total(CHIN, ia.total_flops, 1e12)
    assert dual.n_params == pytest.approx(ia.n_params, rel=1e-3)
    assert dual.loss == pytest.approx(ia.loss, abs=1e-9)
    assert allocate.inference_aware_total(CHIN, 1e21, 0).n_params == allocate.compute_optimal(CHIN, 1e21).n_params


def test_effective_tokens_formula():
    u = 1e9
    assert allocate.effective_tokens(0.5e9, u) == pytest.approx(0.5e9)
    assert allocate.effective_tokens(u, u) == pytest.approx(u)
    # one repeat: D' = U + U R* (1 - exp(-1/R*))
    assert allocate.effective_tokens(2 * u, u) == pytest.approx(u + u * 15.4 * (1 - math.exp(-1 / 15.4)))
    # infinite repetition saturates at U (1 + R_D*)
    assert allocate.effective_tokens(1e15, u) == pytest.approx(u * (1 + 15.4), rel=1e-6)


def test_data_constrained_plenty_of_data_is_unconstrained():
    dc = allocate.data_constrained(CHIN, 1e21, 1e15)
    opt = allocate.compute_optimal(CHIN, 1e21)
    assert dc.n_params == pytest.approx(opt.n_params, rel=1e-4)
    assert dc.loss == pytest.approx(opt.loss, abs=1e-9)
    assert dc.warnings == ()


def test_data_constrained_scarce_data():
    opt = allocate.compute_optimal(CHIN, 1e22)
    dc = allocate.data_constrained(CHIN, 1e22, opt.n_tokens / 20)
    assert dc.epochs > 4 and any("epochs" in w for w in dc.warnings)
    assert dc.loss > opt.loss
    # Muennighoff et al.: excess parameters decay faster (R_N* = 5.3) than repeated data (R_D* = 15.4),
    # so a data-constrained budget goes to more epochs of a smaller model ...
    assert dc.n_params < opt.n_params
    # ... which beats naively training the unconstrained optimum on the repeated data.
    naive = CHIN.loss(allocate.effective_params(CHIN, opt.n_params, opt.n_tokens / 20),
                      allocate.effective_tokens(opt.n_tokens, opt.n_tokens / 20))
    assert dc.loss < float(naive)
    with pytest.raises(FlopwiseError, match="allocation only"):
        allocate.data_constrained(REGISTRY["kaplan"], 1e22, 1e9)


def test_exact_optimal_beats_6nd_choice_under_exact_count():
    f = _shape_flops(CHIN, 4096, 256)
    flops = 1e16
    ex = allocate.exact_optimal(CHIN, flops, f, n_grid=61)
    n0, fpt0 = f(float(CHIN.optimal(flops)[0]))
    assert ex.loss <= float(CHIN.loss(n0, flops / fpt0)) + 1e-12
