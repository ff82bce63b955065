"""The parametric law forms ``flopwise fit`` can fit, as numerics: pure numpy, arrays in, arrays out.

Every form writes the loss as a sum of three positive terms, L = exp(T_N) + exp(T_D) + exp(e), so
``log L = LSE(T_N, T_D, e)``, and flopwise.laws.fit minimises a Huber loss of log L with an exact gradient:

* ``chinchilla`` (5 parameters; Hoffmann et al. 2022, eq. 2): L = E + A/N^alpha + B/D^beta.
* ``farseer`` (6): L = E + A/N^alpha + B N^gamma / D^beta. Farseer (Li et al. 2025, arXiv:2506.10972)
  lets the data term's coefficient and exponent vary with N (exp(a N^g + b) and D^-exp(c N^h + d),
  9 parameters); a small sweep cannot identify that, so this is its simplest member: a coefficient that is
  a power of N (the small-exponent limit of exp(a N^g + b)). gamma < 0: larger models use tokens better.
* ``data-constrained`` (6; Muennighoff et al. 2023, arXiv:2305.16264, eq. 5): Chinchilla's form on the
  effective tokens D' = U + U R_D* (1 - exp(-(D/U - 1) / R_D*)), U = unique tokens, with R_D* fitted
  (theirs is 15.4). Needs runs that repeated their data; the law's D is then D'.

Parameters are fitted in log space where they are scales: theta = (a, b, e, alpha, beta[, gamma | rho])
with A = exp(a), B = exp(b), E = exp(e), R_D* = exp(rho).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from flopwise.errors import FlopwiseError
from flopwise.laws.allocate import effective_tokens

# Chinchilla's initialisation grid (Appendix D.2) for the five parameters every form shares.
BASE_GRID = {
    "a": np.arange(0.0, 25.01, 5.0),
    "b": np.arange(0.0, 25.01, 5.0),
    "e": np.arange(-1.0, 1.01, 0.5),
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
}
BASE_BOUNDS = ((-20.0, 60.0), (-20.0, 60.0), (-10.0, 5.0), (1e-4, 4.0), (1e-4, 4.0))
BASE_PARAMS = ("a", "b", "e", "alpha", "beta")


class Data(NamedTuple):
    """Runs as logs: N (params), D (tokens, raw), U (unique tokens; equal to D where nothing repeated)."""

    log_n: np.ndarray
    log_d: np.ndarray
    log_u: np.ndarray

    def rows(self, idx) -> Data:
        return Data(self.log_n[idx], self.log_d[idx], self.log_u[idx])


@dataclass(frozen=True)
class Form:
    """One law form: its parameters (theta's order), start grid, bounds, and formula."""

    name: str
    params: tuple[str, ...]
    grid: dict
    bounds: tuple[tuple[float, float], ...]
    formula: str
    citation: str
    needs_repeats: bool = False  # identifiable only from runs that repeated their data

    @property
    def n_params(self) -> int:
        return len(self.params)

    def index(self, name: str) -> int:
        return self.params.index(name)

    def log_terms(self, thetas: np.ndarray, x: Data) -> np.ndarray:
        """log of each term of the loss, shape (3, P, n), for P parameter vectors ``thetas`` (P, p)."""
        t = np.atleast_2d(thetas)
        col = {p: t[:, i : i + 1] for i, p in enumerate(self.params)}
        log_n, log_d = x.log_n[None, :], x.log_d[None, :]
        t_n = col["a"] - col["alpha"] * log_n
        if self.name == "data-constrained":
            log_d = log_effective_tokens(x.log_d, x.log_u, np.exp(col["rho"]))
        t_d = col["b"] - col["beta"] * log_d
        if self.name == "farseer":
            t_d = t_d + col["gamma"] * log_n
        return np.stack([t_n, t_d, np.broadcast_to(col["e"], t_n.shape)])


def log_effective_tokens(log_d: np.ndarray, log_u: np.ndarray, r_d) -> np.ndarray:
    """log D' (flopwise.laws.allocate.effective_tokens) from log D and log U, for R_D* broadcasting against them."""
    return np.log(effective_tokens(np.exp(log_d), np.exp(log_u), np.asarray(r_d, float)))


def dlog_effective_tokens_drho(log_d: np.ndarray, log_u: np.ndarray, r_d: float) -> np.ndarray:
    """d log D' / d log R_D*: zero for runs that saw each token once."""
    d, u = np.exp(log_d), np.exp(log_u)
    x = np.maximum(d / u - 1.0, 0.0)
    decay = np.exp(-x / r_d)
    return r_d * u * ((1.0 - decay) - (x / r_d) * decay) / effective_tokens(d, u, r_d)


FORMS: dict[str, Form] = {
    "chinchilla": Form(
        "chinchilla", BASE_PARAMS, BASE_GRID, BASE_BOUNDS, "E + A/N^α + B/D^β",
        "Hoffmann et al. 2022 (arXiv:2203.15556), eq. 2"),
    "farseer": Form(
        "farseer", BASE_PARAMS + ("gamma",), {**BASE_GRID, "gamma": np.array([-0.2, 0.0, 0.2])},
        BASE_BOUNDS + ((-1.0, 1.0),), "E + A/N^α + B·N^γ/D^β",
        "the simplest member of Farseer's family (Li et al. 2025, arXiv:2506.10972): the data term depends on N"),
    "data-constrained": Form(
        "data-constrained", BASE_PARAMS + ("rho",), {**BASE_GRID, "rho": np.log([2.0, 8.0, 32.0])},
        BASE_BOUNDS + ((np.log(0.5), np.log(1e4)),), "E + A/N^α + B/D'^β, D' with R_D* fitted",
        "Muennighoff et al. 2023 (arXiv:2305.16264), eq. 5, R_D* fitted", needs_repeats=True),
}


def get_form(name: str) -> Form:
    if name not in FORMS:
        raise FlopwiseError(f"unknown law form {name!r}: use {', '.join(FORMS)} or all")
    return FORMS[name]


def parse_forms(text: str) -> list[str]:
    """``--forms``: a comma-separated list of form names, or ``all``."""
    names = list(FORMS) if text.strip() == "all" else [t.strip() for t in text.split(",") if t.strip()]
    for n in names:
        get_form(n)
    if not names:
        get_form(text)
    return list(dict.fromkeys(names))
