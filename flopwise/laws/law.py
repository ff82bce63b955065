"""Scaling laws as data: the parametric loss law, allocation-only power laws, a registry
of published laws, and the JSON form that ``flopwise fit`` writes and ``flopwise plan`` reads.

Every law states its parameter convention (``n_convention``): ``total`` (Chinchilla) or
``non_embedding`` (Kaplan). FLOPs are C = 6 N D in the law's own convention.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text

CONVENTIONS = ("total", "non_embedding")


def _check_convention(value: str) -> str:
    value = value.replace("-", "_")
    if value not in CONVENTIONS:
        raise FlopwiseError(f"unknown n_convention {value!r}: use 'total' or 'non_embedding'")
    return value


# The parametric forms a law can take (flopwise.laws.forms fits each): the loss is always
# E + A / N^alpha + B N^gamma / D'^beta, where gamma = 0 outside "farseer" and D' = D outside
# "data-constrained" (there D' discounts repeated tokens with the law's own R_D*).
PARAMETRIC_FORMS = ("chinchilla", "farseer", "data-constrained")


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B N^gamma / D^beta (loss in nats/token, N params, D tokens).

    ``form`` names the family it was fitted in: ``chinchilla`` (gamma = 0; Hoffmann et al. 2022),
    ``farseer`` (gamma free: the data term depends on N, the simplest member of Farseer's family)
    or ``data-constrained`` (gamma = 0; D is Muennighoff's effective tokens with the fitted
    ``r_d_star`` in place of the published 15.4, so planning with repeated data uses it).
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    n_convention: str = "total"
    name: str = "custom"
    citation: str = ""
    extra: dict = field(default_factory=dict, compare=False)  # intervals, fit metadata
    form: str = "chinchilla"
    gamma: float = 0.0
    r_d_star: float | None = None

    def __post_init__(self) -> None:
        if self.form == "parametric":  # the name law files used before forms had names
            object.__setattr__(self, "form", "chinchilla")
        if self.form not in PARAMETRIC_FORMS:
            raise FlopwiseError(f"law {self.name}: unknown form {self.form!r}: use one of "
                                f"{', '.join(PARAMETRIC_FORMS)} or power")
        for key in ("E", "A", "B", "alpha", "beta", "gamma"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise FlopwiseError(f"law {self.name}: {key} must be a finite number, got {v!r}")
        for key in ("A", "B", "alpha", "beta"):
            if getattr(self, key) <= 0:
                raise FlopwiseError(f"law {self.name}: {key} must be positive, got {getattr(self, key)}")
        if self.form != "farseer" and self.gamma:
            raise FlopwiseError(f"law {self.name}: gamma is a parameter of the farseer form only, not {self.form}")
        if self.beta + self.gamma <= 0:
            raise FlopwiseError(f"law {self.name}: beta + gamma must be positive (else more parameters always "
                                f"help the data term), got {self.beta + self.gamma:.4g}")
        if (self.form == "data-constrained") != (self.r_d_star is not None):
            raise FlopwiseError(f"law {self.name}: r_d_star belongs to the data-constrained form, and it needs one")
        if self.r_d_star is not None and not (math.isfinite(self.r_d_star) and self.r_d_star > 0):
            raise FlopwiseError(f"law {self.name}: r_d_star must be a positive number, got {self.r_d_star!r}")
        object.__setattr__(self, "n_convention", _check_convention(self.n_convention))

    def loss(self, n_params, n_tokens):
        """Expected loss (nats/token) at ``n_params`` parameters and ``n_tokens`` (effective) tokens."""
        n = np.asarray(n_params, dtype=float)
        d = np.asarray(n_tokens, dtype=float)
        return self.E + self.A / n**self.alpha + self.B * n**self.gamma / d**self.beta

    @property
    def a(self) -> float:
        """Allocation exponent of N: N_opt is proportional to C^a."""
        return self.beta / (self.alpha + self.beta + self.gamma)

    @property
    def b(self) -> float:
        """Allocation exponent of D: D_opt is proportional to C^b."""
        return 1.0 - self.a

    @property
    def G(self) -> float:
        """N_opt = G (C/6)^a and D_opt = (C/6)^b / G under C = 6 N D (Chinchilla eq. 4; with gamma, setting
        d/dN of A N^-alpha + B N^gamma (6N/C)^beta to zero gives the same form)."""
        return (self.alpha * self.A / ((self.beta + self.gamma) * self.B)) ** (
            1.0 / (self.alpha + self.beta + self.gamma))

    def optimal(self, flops):
        """Compute-optimal (N, D) for ``flops`` under C = 6 N D."""
        c6 = np.asarray(flops, dtype=float) / 6.0
        return self.G * c6**self.a, c6**self.b / self.G

    def n_opt_for_tokens(self, n_tokens):
        """The N for which ``n_tokens`` is the compute-optimal D (inverse of ``optimal``)."""
        c6 = (self.G * np.asarray(n_tokens, dtype=float)) ** (1.0 / self.b)
        return self.G * c6**self.a

    def to_dict(self) -> dict:
        keys = _PARAMETRIC_KEYS + (("gamma",) if self.form == "farseer" else ()) + \
            (("r_d_star",) if self.form == "data-constrained" else ())
        return _law_dict(self, keys)


@dataclass(frozen=True)
class PowerLaw:
    """Allocation only: N_opt = n_ref (C / flops_ref)^a and D_opt = C / (6 N_opt). No loss."""

    a: float
    n_ref: float
    flops_ref: float
    n_convention: str = "total"
    name: str = "custom-power"
    citation: str = ""
    extra: dict = field(default_factory=dict, compare=False)

    form = "power"

    def __post_init__(self) -> None:
        for key in ("a", "n_ref", "flops_ref"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise FlopwiseError(f"law {self.name}: {key} must be a positive finite number, got {v!r}")
        object.__setattr__(self, "n_convention", _check_convention(self.n_convention))

    @property
    def b(self) -> float:
        return 1.0 - self.a

    def optimal(self, flops):
        c = np.asarray(flops, dtype=float)
        n = self.n_ref * (c / self.flops_ref) ** self.a
        return n, c / (6.0 * n)

    def loss(self, n_params, n_tokens):
        raise FlopwiseError(
            f"law {self.name} predicts allocation only, not loss: use a parametric law "
            "(chinchilla, epoch or one written by 'flopwise fit')"
        )

    def to_dict(self) -> dict:
        return _law_dict(self, _POWER_KEYS)


Law = ParametricLaw | PowerLaw

PF_DAY = 8.64e19  # FLOPs in one petaflop/s-day

# The law ``plan`` and the autopilot's prior use unless told otherwise. Chinchilla's published Approach 3
# constants come from a fit that stopped early (Besiroglu et al. 2024): they disagree with Chinchilla's own
# Approaches 1 and 2 and Table 3 (33.9 tokens per parameter at 1e21 FLOPs where those give ~20). Epoch's
# refit of the same data agrees with them (21.6 at 1e21), so it is the default.
DEFAULT_LAW = "epoch"

REGISTRY: dict[str, Law] = {
    "epoch": ParametricLaw(
        E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
        name="epoch", extra={"optimizer": "adamw"},
        citation="Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt (arXiv:2404.10102), "
                 "refit of Approach 3 on Chinchilla's data; the default: it agrees with Chinchilla's "
                 "Approaches 1 and 2",
    ),
    "chinchilla": ParametricLaw(
        E=1.69337368, A=406.401018, B=410.722827, alpha=0.33917084, beta=0.2849083,
        name="chinchilla", extra={"optimizer": "adamw"},
        citation="Hoffmann et al. 2022, Training Compute-Optimal Large Language Models, Approach 3 "
                 "(arXiv:2203.15556); constants as published, known to be off (the fit stopped early: "
                 "Besiroglu et al. 2024); 'epoch' is their refit",
    ),
    "chinchilla-approach1": PowerLaw(
        a=0.50, n_ref=1.0e9, flops_ref=1.21e20,
        name="chinchilla-approach1", extra={"optimizer": "adamw"},
        citation="Hoffmann et al. 2022, Approach 1 (training-curve envelope): N_opt ~ C^0.50, "
                 "1.21e20 FLOPs -> 1.0e9 params, 20.2e9 tokens (Table 3)",
    ),
    "chinchilla-approach2": PowerLaw(
        a=0.49, n_ref=1.0e9, flops_ref=1.20e20,
        name="chinchilla-approach2", extra={"optimizer": "adamw"},
        citation="Hoffmann et al. 2022, Approach 2 (IsoFLOP profiles): N_opt ~ C^0.49, "
                 "1.20e20 FLOPs -> 1.0e9 params, 20.0e9 tokens (Table 3)",
    ),
    "kaplan": PowerLaw(
        a=0.73, n_ref=1.3e9, flops_ref=PF_DAY, n_convention="non_embedding",
        name="kaplan", extra={"optimizer": "adam"},
        citation="Kaplan et al. 2020, Scaling Laws for Neural Language Models (arXiv:2001.08361): "
                 "N_opt = 1.3e9 (C / PF-day)^0.73, non-embedding parameters",
    ),
}

_PARAMETRIC_KEYS = ("E", "A", "B", "alpha", "beta")
_POWER_KEYS = ("a", "n_ref", "flops_ref")


def _law_dict(law: Law, keys: tuple[str, ...]) -> dict:
    """DESIGN's JSON form of a law: its form, constants, convention and name, then citation and extras."""
    d = {"form": law.form, **{k: getattr(law, k) for k in keys}, "n_convention": law.n_convention, "name": law.name}
    return {**d, **({"citation": law.citation} if law.citation else {}), **law.extra}


def law_from_dict(d: dict, source: str = "law") -> Law:
    """Build a law from its JSON form; a missing key is a one-line error naming it."""
    if not isinstance(d, dict):
        raise FlopwiseError(f"{source}: expected a JSON object with a 'form' key")
    if "checks" in d and "verdict" in d and "E" not in d:  # a fit.json without an Approach 3 law
        raise FlopwiseError(f"{source} holds no Approach 3 fit: plan with the law.json beside it")
    form = d.get("form", "chinchilla")
    keys = {**{f: _PARAMETRIC_KEYS for f in (*PARAMETRIC_FORMS, "parametric")}, "power": _POWER_KEYS}.get(form)
    keys = keys and keys + {"farseer": ("gamma",), "data-constrained": ("r_d_star",)}.get(form, ())
    if keys is None:
        raise FlopwiseError(f"{source}: unknown form {form!r}: use one of {', '.join(PARAMETRIC_FORMS)} or power")
    missing = [k for k in keys if k not in d]
    if missing:
        raise FlopwiseError(
            f"{source} is missing {', '.join(missing)}: a {form}-form law needs {', '.join(keys)} and n_convention"
        )
    known = set(keys) | {"form", "n_convention", "name", "citation"}
    if "checks" in d and "verdict" in d:  # a whole fit.json: its law, and its verdict and fitted budgets as extras
        d = {k: d[k] for k in known if k in d} | {"name": d.get("name", "fitted"), "verdict": d["verdict"]} | (
            {"optimizer": d["optimizer"]} if d.get("optimizer") else {}) | (
            {"fitted_flops": d["fitted_flops"]} if "fitted_flops" in d else {})
    extra = {k: v for k, v in d.items() if k not in known}
    common = dict(n_convention=d.get("n_convention", "total"), name=d.get("name", Path(source).stem),
                  citation=d.get("citation", ""), extra=extra)
    try:
        values = {k: float(d[k]) for k in keys}
    except (TypeError, ValueError):
        raise FlopwiseError(f"{source}: {', '.join(keys)} must be numbers") from None
    if form == "power":
        return PowerLaw(**values, **common)
    return ParametricLaw(**values, **common, form=form)


def load_law(name_or_path: str | os.PathLike) -> Law:
    """A registry name (``flopwise laws`` lists them) or a path to a law JSON file."""
    key = str(name_or_path)
    if key in REGISTRY:
        return REGISTRY[key]
    path = Path(key)
    if not path.exists():
        raise FlopwiseError(
            f"unknown law {key!r}: use one of {', '.join(REGISTRY)} or a path to a law JSON file"
        )
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FlopwiseError(f"cannot read law file {path}: {e}; write it with 'flopwise fit' or fix the JSON") from None
    return law_from_dict(d, source=str(path))


def save_law(law: Law, path: str | os.PathLike) -> None:
    """Save a law in the JSON form of DESIGN.md (atomically)."""
    atomic_write_text(path, json.dumps(law.to_dict(), indent=2) + "\n")
