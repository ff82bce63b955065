import json

import numpy as np
import pytest

from flopwise.errors import FlopwiseError
from flopwise.laws.law import REGISTRY, ParametricLaw, PowerLaw, load_law, save_law


def test_registry_constants_as_published():
    c = REGISTRY["chinchilla"]
    assert (c.E, c.A, c.B, c.alpha, c.beta) == (1.69337368, 406.401018, 410.722827, 0.33917084, 0.2849083)
    e = REGISTRY["epoch"]
    assert (e.E, e.A, e.B, e.alpha, e.beta) == (1.8172, 482.01, 2085.43, 0.3478, 0.3658)
    assert REGISTRY["kaplan"].n_convention == "non_embedding"
    assert all(law.citation for law in REGISTRY.values())


def test_closed_form_is_the_minimum_of_the_law():
    law = REGISTRY["chinchilla"]
    c = 1e21
    n_opt, d_opt = law.optimal(c)
    assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-12)
    ns = n_opt * np.logspace(-0.5, 0.5, 201)
    losses = law.loss(ns, c / (6 * ns))
    assert ns[np.argmin(losses)] == pytest.approx(n_opt, rel=0.02)
    assert law.a + law.b == pytest.approx(1.0)


def test_n_opt_for_tokens_inverts_optimal():
    law = REGISTRY["epoch"]
    n, d = law.optimal(3e22)
    assert law.n_opt_for_tokens(d) == pytest.approx(n, rel=1e-10)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_json_round_trip(tmp_path, name):
    law = REGISTRY[name]
    path = tmp_path / f"{name}.json"
    save_law(law, path)
    back = load_law(path)
    assert back == law
    assert np.allclose(back.optimal(1e22), law.optimal(1e22))


def test_design_json_form_loads(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"form": "chinchilla", "E": 1.7, "A": 400, "B": 400, "alpha": 0.34, "beta": 0.28,
                                "n_convention": "total", "intervals": {"E": [1.6, 1.8]}}))
    law = load_law(path)
    assert isinstance(law, ParametricLaw) and law.E == 1.7 and law.extra == {"intervals": {"E": [1.6, 1.8]}}


def test_law_file_errors(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"form": "chinchilla", "E": 1.7, "A": 400}))
    with pytest.raises(FlopwiseError, match="missing B, alpha, beta"):
        load_law(path)
    path.write_text("{not json")
    with pytest.raises(FlopwiseError, match="cannot read law file"):
        load_law(path)
    with pytest.raises(FlopwiseError, match="unknown law 'chinchila'"):
        load_law("chinchila")
    path.write_text(json.dumps({"form": "power", "a": 0.5, "n_ref": 1e9, "flops_ref": 1e20, "n_convention": "x"}))
    with pytest.raises(FlopwiseError, match="n_convention"):
        load_law(path)


def test_power_law_has_no_loss():
    with pytest.raises(FlopwiseError, match="allocation only"):
        PowerLaw(a=0.5, n_ref=1e9, flops_ref=1e20).loss(1e9, 1e10)
