"""flopwise autopilot: sweep -> fit -> plan -> train -> compare -> report, in one call.

Everything here calls the library's own pieces (design_sweep, run_sweep, fit_runs, make_plan,
new_run/train, the report); this module only decides the order and the budgets.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from flopwise import __version__
from flopwise.config import AutopilotConfig, TrainConfig, sweep_train_options
from flopwise.data.prepare import resolve_corpus
from flopwise.data.tokenizer import EOS_ID, load_tokenizer
from flopwise.errors import FlopwiseError
from flopwise.fsutil import atomic_write_text, check_output_dir
from flopwise.infer.generate import Engine, Sampling
from flopwise.laws import allocate
from flopwise.laws.allocate import EPOCHS_WARNING, check_flops
from flopwise.laws.approach3 import loss_from_thetas
from flopwise.laws.compare import compare_laws
from flopwise.laws.fit import (
    fit_runs,
    law_tokens,
    predictive_sigma,
    public,
    save_fit,
    widen,
)
from flopwise.laws.flops import n_params_total, training_flops_per_token
from flopwise.laws.forms import FORMS
from flopwise.laws.law import load_law
from flopwise.laws.plan import make_plan
from flopwise.laws.runs import load_runs
from flopwise.laws.shape import family_shape
from flopwise.laws.trust import CAVEATS, NOT_INFORMATIVE, SOUND, failed, prediction_check
from flopwise.model.llama import ModelConfig
from flopwise.progress import Bar
from flopwise.report.plots import plot_compare, plot_fit, plot_loss_curves
from flopwise.report.report import write_report
from flopwise.run import load_model, new_run
from flopwise.sweep.design import (
    budgets_for,
    check_corpus,
    check_feasible,
    design_sweep,
    read_design,
    smallest_budget,
    total_flops,
    write_design,
)
from flopwise.sweep.runner import default_workers, eta_line, run_sweep, unfinished, worker_pool, worker_threads
from flopwise.training.trainer import train


def autopilot(out: str | Path, data: str | None = None, cfg: AutopilotConfig | None = None, log=print,
              progress: bool = False) -> dict:
    """Run the whole job into ``out``; returns summary.json's content.

    ``progress``: show progress bars (without them the final training runs quietly too).
    """
    cfg = cfg or AutopilotConfig()
    out = Path(out)
    if cfg.budget_flops is not None:
        check_flops(cfg.budget_flops, "--budget")
    cfg.check()
    check_output_dir(out, "--out", is_autopilot_dir)
    t_start = time.time()
    commands = [" ".join(["flopwise", *sys.argv[1:]])] if sys.argv else []

    # 1. corpus
    corpus = resolve_corpus(data, cfg.vocab_size, log=log)
    m = corpus.meta
    log(f"corpus: {m['n_tokens_train']:,} training tokens ({m['n_docs_train']:,} documents), "
        f"{m['n_tokens_val']:,} validation tokens, vocab {m['vocab_size']} ({corpus.path})")

    # 2. sweep design, refused before anything is written when the budget cannot buy an informative sweep
    check_corpus(m, cfg.seq_len)
    least = smallest_autopilot_budget(cfg, corpus.vocab_size)
    if cfg.budget_flops is None:
        cfg = replace(cfg, budget_flops=least)
        log(f"budget: {least:.2g} FLOPs, the smallest whose sweep is informative on this corpus (--budget auto)")
    sweep_dir = out / "sweep"
    resuming = cfg.resume and (sweep_dir / "sweep.json").exists()  # finish that sweep, whatever its design
    if resuming:
        specs, meta = read_design(sweep_dir)
        # the law will hold for the optimizer that trains the sweep: the final run uses the same one
        cfg = replace(cfg, optimizer=meta["train_options"]["optimizer"])
    if cfg.compare_optimizer == cfg.optimizer:  # AutopilotConfig.check leaves this to here under --resume
        what = "the sweep's" if resuming else "--optimizer"
        raise FlopwiseError(f"--compare-optimizer must be the other optimizer than {what} {cfg.optimizer}, got "
                            f"{cfg.compare_optimizer}")
    if not resuming:
        specs, meta = _new_design(cfg, corpus, data, least, sweep_dir, out)
    budgets = sorted({s.budget for s in specs})
    if total_flops(specs) >= cfg.budget_flops:
        raise FlopwiseError(f"the sweep in {sweep_dir} spends {total_flops(specs):.3g} FLOPs, all of --budget "
                            f"{cfg.budget_flops:.3g}: give a larger --budget")
    sweep_flops = total_flops(specs)
    workers = cfg.workers or default_workers(len(specs))
    threads, _ = worker_threads(workers)
    remaining = cfg.budget_flops - sweep_flops
    todo = unfinished(sweep_dir, specs)
    with worker_pool(min(workers, len(todo))) as pool:  # the workers start while this process builds and measures
        eta = eta_line(todo, workers, threads, pool)
        log(f"sweep: {len(specs)} runs over {len(budgets)} budgets ({', '.join(f'{b:.2g}' for b in budgets)} FLOPs), "
            f"sizes {min(s.n_params for s in specs):,}-{max(s.n_params for s in specs):,} params "
            f"({specs[0].shape['n_layers']} layers, width the one dial), "
            + (f"at least {min(s.n_tokens // s.options['batch_tokens'] for s in specs)} steps per run, "
               if all("batch_tokens" in s.options for s in specs) else "")
            + f"{sweep_flops:.3g} FLOPs; {eta}")
        with Bar("sweep", sweep_flops, sweep_flops - total_flops(todo), quiet=not progress) as bar:
            run_sweep(sweep_dir, workers, pool=pool,
                      progress=lambda done, total, k, n: bar.update(done, f"{k}/{n} runs"))
    t_sweep = time.time() - t_start

    # 3. fit (Approach 2 and 3, bootstrap, extrapolation check), the trust checks, and a fallback when they fail
    runs = load_runs(sweep_dir)
    holdout = 1 if len(budgets) >= 3 else 0
    with Bar("fit", 1.0, quiet=not progress) as bar:
        def tick(stage: str, done: int, total: int) -> None:  # each stage (forms, bootstrap, hold-out) fills the bar
            bar.update(done / max(total, 1), f"{stage} {done}/{total}")

        # with 3+ budgets every form is scored on the largest, held out; both parameter counts are fitted and
        # shown, and the law counts total parameters (Pearce & Song 2024: non-embedding counts at small sizes
        # produced Kaplan's exponents)
        forms = [f for f in FORMS if holdout and (f != "data-constrained" or runs.repeated)] or ["chinchilla"]
        free = fit_runs(runs, approach="all", n_boot=cfg.bootstrap, holdout_largest=holdout, budgets=[remaining],
                        seed=cfg.seed, progress=tick, min_steps=cfg.min_steps, effective_data=True, forms=forms,
                        conventions=[c for c in runs.conventions if c != "total"])
        fit, law_used = free, {"law": f"fitted ({free['form']} form, total parameters)",
                               "why": "the free fit passed the critical checks"
                                      + (f"; {free['selected']['why']}" if "selected" in free else "")}
        if free["verdict"] == NOT_INFORMATIVE:
            fit, law_used = _fallback_fit(runs, free, cfg, holdout, remaining, tick)
    fit_dir = out / "fit"
    save_fit(free, str(sweep_dir.absolute()), fit_dir)
    if fit is not free:
        save_fit(fit, str(sweep_dir.absolute()), fit_dir / "fallback")
    plots = plot_fit(law_tokens(runs, free), free, fit_dir)  # the law's D is D'; so are the plots' axes
    checks, verdict = _plan_checks(free, fit, law_used)
    log(f"fit: {verdict}" + (f" ({'; '.join(c['why'] for c in failed(checks))})" if failed(checks) else "")
        + f"; planning with the {law_used['law']} law")
    optimizers = None
    if cfg.compare_optimizer:
        optimizers, more = _compare_optimizers(out, specs, meta, free, cfg, workers, threads, remaining, log,
                                               progress)
        plots += more

    # 4. plan the final run with the law, data-constrained, in the sweep's shape family
    final_spec, plan = _plan_final(fit, remaining, corpus, cfg, depth=specs[0].shape["n_layers"])
    log(f"plan: N = {final_spec['n_params']:,} params, D = {final_spec['n_tokens']:,} tokens "
        f"({final_spec['epochs']:.1f} epochs of the corpus), predicted loss {final_spec['predicted_loss']:.3f} "
        f"[{final_spec['predicted_interval'][0]:.3f}, {final_spec['predicted_interval'][1]:.3f}]")
    checks.append(prediction_check(final_spec["predicted_loss"], final_spec["predicted_interval"]))
    if verdict == SOUND and not checks[-1]["passed"]:
        verdict = CAVEATS

    # 5. train the final model
    final_dir = out / "final"
    quiet = not progress
    final = _train_final(final_dir, final_spec, corpus, cfg, log, quiet=quiet)
    bigger = None
    if cfg.compare:
        bigger_spec = dict(final_spec, n_params_target=final_spec["n_params"] * 4)
        bigger = _train_final(out / "bigger", bigger_spec, corpus, cfg, log, quiet=quiet, reshape=True)
    plots += plot_loss_curves(sweep_dir, [final_dir] + ([out / "bigger"] if bigger else []), fit_dir)

    # 6. compare
    comparison = _compare(runs, fit, final, final_spec, bigger)
    samples = _samples(final_dir, cfg.seed)
    summary = {
        "verdict": verdict, "budget_flops": cfg.budget_flops, "sweep_flops": sweep_flops, "final_flops": final["flops"],
        "n_params_opt": final_spec["n_params"], "n_tokens_opt": final_spec["n_tokens"],
        "predicted_loss": final_spec["predicted_loss"], "predicted_loss_interval": final_spec["predicted_interval"],
        "predictive_sigma": final_spec["predictive_sigma"],
        "measured_loss": final["val_loss"], "measured_bpb": final["val_bpb"], **comparison,
        "epochs": final["epochs"], "swept_n_params_min": int(min(runs.n_params)),
        "swept_n_params_max": int(max(runs.n_params)),
        "fit": {k: fit[k] for k in ("E", "A", "B", "alpha", "beta", "gamma", "r_d_star", "a", "b") if k in fit},
        "holdout": public(fit).get("holdout"), "warnings": fit["warnings"] + _plan_warnings(plan, final["epochs"]),
        "checks": checks, "law_used": law_used, "law_form": fit.get("form", "chinchilla"), "optimizer": cfg.optimizer,
        "forms": public(free).get("forms"), "conventions": public(free).get("conventions"),
        "convention_factor": free.get("convention_factor"), "optimizer_comparison": optimizers,
        "wall_seconds": {"sweep": t_sweep, "total": time.time() - t_start, "final": final["wall_seconds"]},
        "energy_kwh_estimate": _energy_kwh(time.time() - t_start),
        "samples": samples, "config": asdict(cfg),
        "provenance": {"flopwise": __version__, "python": platform.python_version(), "torch": _torch_version(),
                       "numpy": np.__version__, "machine": platform.machine(), "commands": commands,
                       "corpus": str(corpus.path), "corpus_hash": m["hash"], "seed": cfg.seed},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_report(out, summary, public(fit), plan, plots)
    return summary


def _compare_optimizers(out: Path, specs, meta: dict, free: dict, cfg: AutopilotConfig, workers: int, threads: int,
                        final_flops: float, log, progress: bool) -> tuple[dict, list[str]]:
    """The sweep again with ``cfg.compare_optimizer`` (same runs, in ``sweep-<optimizer>/``), its fit, and
    compare_laws against the main sweep's law at the sweep's budgets and the final run's."""
    other = cfg.compare_optimizer
    sweep_dir = out / f"sweep-{other}"
    options = {**meta.get("train_options", {}), "optimizer": other}
    if not (sweep_dir / "sweep.json").exists():
        write_design(sweep_dir, specs, {**meta, "train_options": options})
    todo = unfinished(sweep_dir, specs)
    with worker_pool(min(workers, len(todo))) as pool:
        log(f"comparison sweep: the same {len(specs)} runs with {other} ({total_flops(specs):.3g} FLOPs beyond the "
            f"budget); {eta_line(todo, workers, threads, pool)}")
        with Bar(f"sweep ({other})", total_flops(specs), total_flops(specs) - total_flops(todo),
                 quiet=not progress) as bar:
            run_sweep(sweep_dir, workers, pool=pool,
                      progress=lambda done, total, k, n: bar.update(done, f"{k}/{n} runs"))
    runs = load_runs(sweep_dir)
    fit = fit_runs(runs, approach="3", n_boot=cfg.bootstrap, seed=cfg.seed + 1, effective_data=True,
                   min_steps=cfg.min_steps)
    budgets = sorted({s.budget for s in specs}) + [final_flops]
    result = compare_laws(free, fit, budgets, (cfg.optimizer, other))
    result["sweep"] = str(sweep_dir)
    result["sweep_flops"] = total_flops(specs)
    result["verdicts"] = {cfg.optimizer: free["verdict"], other: fit["verdict"]}
    at_final = result["budgets"][-1]
    log(f"optimizers: at {final_flops:.3g} FLOPs {at_final['stronger']} is stronger; the other needs "
        + ("more compute than any" if at_final["compute_multiplier"] is None else
           f"{at_final['compute_multiplier']:.2f}x the FLOPs") + " to match it")
    return result, plot_compare(result, (free, fit), out / "fit")


def _plan_warnings(plan: dict, epochs: float) -> list[str]:
    """The plan's warnings, with its 6ND-based repetition count replaced by the final run's real one."""
    out = [w for w in plan["warnings"] if "repeats the data" not in w]
    if epochs > EPOCHS_WARNING:
        out.append(f"the final run repeats the corpus {epochs:.1f} times (more than {EPOCHS_WARNING:g} epochs): "
                   "repeated tokens are worth less, and the plan discounts them (Muennighoff et al. 2023); "
                   "more unique text would lower the loss")
    return out


def _torch_version() -> str:
    return torch.__version__


def _energy_kwh(seconds: float, watts_per_core: float = 10.0) -> float:
    """A rough CPU energy estimate: ~10 W per busy core (server cores draw 5-15 W each)."""
    return seconds / 3600 * watts_per_core * (os.cpu_count() or 1) / 1000


def is_autopilot_dir(path: Path) -> bool:
    """A folder the autopilot wrote (its sweep, or its report): the autopilot may continue or redo it."""
    return (path / "sweep" / "sweep.json").exists() or (path / "summary.json").exists()


def _new_design(cfg: AutopilotConfig, corpus, data, least: float, sweep_dir: Path, out: Path) -> tuple[list, dict]:
    """The sweep for cfg's budget, written to ``sweep_dir`` (or the identical one already there); refused, with
    nothing written, when the budget is below ``least`` or ``sweep_dir`` holds another design."""
    m = corpus.meta
    specs = _design(cfg, cfg.budget_flops, corpus.vocab_size)
    if specs is None:
        half = corpus.vocab_size // 2  # the smallest model's embeddings set the floor: a smaller vocabulary lowers it
        hint = (f"; with --vocab-size {half} it is {smallest_autopilot_budget(cfg, half):.2g}"
                if half >= 259 and not (Path(str(data)) / "meta.json").exists() else "")
        raise FlopwiseError(f"--budget {cfg.budget_flops:.3g} is too small for an informative sweep (vocab "
                            f"{corpus.vocab_size}, context {cfg.seq_len}, {cfg.min_steps}+ steps per run): the "
                            f"smallest that works is {least:.2g} FLOPs (--budget auto picks it{hint})")
    check_feasible(specs, m["n_tokens_train"], fix="lower --budget")
    meta = {"corpus": str(corpus.path), "corpus_hash": m["hash"], "budgets": sorted({s.budget for s in specs}),
            "prior": cfg.prior, "train_options": sweep_train_options(cfg), "schedule": "cosine",
            "min_steps": cfg.min_steps}
    if (sweep_dir / "sweep.json").exists():
        old_specs, old_meta = read_design(sweep_dir)
        if (was := old_meta["train_options"]["optimizer"]) != cfg.optimizer:  # read_design: adamw if unrecorded
            raise FlopwiseError(f"{out} holds a sweep trained with {was}: use --resume to finish it, or "
                                f"--optimizer {was}, or choose another --out")
        if [s.__dict__ for s in old_specs] != [s.__dict__ for s in specs] or old_meta["corpus_hash"] != m["hash"]:
            raise FlopwiseError(f"{out} holds another sweep (different budget, data or options): use --resume to "
                                "finish that one, or choose another --out")
        return old_specs, old_meta
    write_design(sweep_dir, specs, meta)
    return specs, meta


def _design(cfg: AutopilotConfig, budget_flops: float, vocab_size: int) -> list | None:
    """The autopilot's sweep for a total budget, or None when that budget cannot buy an informative one."""
    budgets = budgets_for(cfg.sweep_fraction * budget_flops, cfg.n_budgets, cfg.budget_ratio, cfg.n_sizes)
    try:
        return design_sweep(budgets, vocab_size, cfg.seq_len, cfg.n_sizes, cfg.spread, cfg.prior,
                            min_steps=cfg.min_steps)
    except FlopwiseError:
        return None


def smallest_autopilot_budget(cfg: AutopilotConfig, vocab_size: int) -> float:
    """The smallest total budget (2 significant digits) whose sweep meets the step floor and brackets the prior."""
    return smallest_budget(lambda b: _design(cfg, b, vocab_size) is not None)


PRIOR_EXPONENT_SD = 0.05  # stated uncertainty of the prior's alpha and beta in the fallback fit


def _fallback_fit(runs, free: dict, cfg: AutopilotConfig, holdout: int, flops: float, tick) -> tuple[dict, dict]:
    """Approach 3 with the prior's exponents held (drawn around them in the bootstrap): only E, A and B come from
    the sweep. Used when the free fit cannot be identified."""
    prior = allocate.require_parametric(load_law(cfg.prior), "the fallback fit")
    fixed, sd = {"alpha": prior.alpha, "beta": prior.beta}, {"alpha": PRIOR_EXPONENT_SD, "beta": PRIOR_EXPONENT_SD}
    fit = fit_runs(runs, approach="3", n_boot=cfg.bootstrap, holdout_largest=holdout, budgets=[flops], seed=cfg.seed,
                   progress=tick, fixed=fixed, fixed_sd=sd, min_steps=cfg.min_steps, effective_data=True)
    why = "; ".join(c["why"] for c in failed(free["checks"], "critical"))
    return fit, {"law": f"fallback ({prior.name} exponents ± {PRIOR_EXPONENT_SD}, E, A, B fitted)",
                 "why": f"the free fit is not identifiable: {why}", "fixed": fixed, "fixed_sd": sd}


def _plan_checks(free: dict, used: dict, law_used: dict) -> tuple[list[dict], str]:
    """The checks the verdict rests on: the free fit's, and when the fallback law plans, the fallback's own too."""
    if used is free:
        return free["checks"], free["verdict"]
    checks = [dict(c, name=f"free_fit.{c['name']}") for c in free["checks"]] + used["checks"]
    checks.append({"name": "law", "value": "fallback", "threshold": "fitted", "passed": False, "severity": "caveat",
                   "why": f"planned with the {law_used['law']} law, because {law_used['why'].split(': ', 1)[-1]}"})
    # the free fit's critical failures are why the fallback exists; the fallback's own checks decide the verdict
    return checks, NOT_INFORMATIVE if used["verdict"] == NOT_INFORMATIVE else CAVEATS


def _plan_final(fit: dict, flops: float, corpus, cfg: AutopilotConfig, depth: int) -> tuple[dict, dict]:
    """The final model under the law, with Muennighoff's data-constrained correction, in the sweep's family
    (the law was measured on that family); the interval adds the runs' scatter and the measured extrapolation
    error to the parameters' bootstrap spread (fit.predictive_sigma)."""
    law = fit["_fit"].law("total")
    form = fit["_fit"].form
    unique = corpus.meta["n_tokens_train"]
    plan = make_plan(flops, law, unique_tokens=unique, vocab_size=corpus.vocab_size, seq_len=cfg.seq_len)
    s = family_shape(plan["n_params"], depth, corpus.vocab_size, cfg.seq_len, step=32)
    plan["shape"] = {**s.to_dict(), "n_params_total": n_params_total(s)}
    n = n_params_total(s)
    d = int(flops / training_flops_per_token(s))
    n_eff = float(allocate.effective_params(law, n, unique))
    d_eff = float(allocate.effective_tokens(d, unique, allocate.r_d_star_of(law)))
    predicted = float(law.loss(n_eff, d_eff))
    lo, hi = predicted, predicted
    if "_thetas" in fit:
        # parameter uncertainty of the law at this run's effective N' and D' (U_N is held at the fit's value; the
        # data-constrained form turns D into D' with each resample's own R_D*)
        d_law, u = (d, unique) if FORMS[form].needs_repeats else (d_eff, None)
        losses = loss_from_thetas(fit["_thetas"], n_eff, d_law, form, u)[:, 0]
        lo, hi = np.percentile(losses, [50 * (1 - fit["level"]), 50 * (1 + fit["level"])])
    sigma = predictive_sigma(fit, flops)
    lo, hi = widen(predicted, lo, hi, sigma, fit["level"])
    return {"shape": s.to_dict(), "n_params": n, "n_tokens": d, "flops": float(training_flops_per_token(s) * d),
            "epochs": d / unique, "predicted_loss": predicted, "predicted_interval": [float(lo), float(hi)],
            "predictive_sigma": sigma, "effective_tokens": d_eff, "effective_params": n_eff}, plan


def _train_final(run_dir: Path, spec: dict, corpus, cfg: AutopilotConfig, log, quiet: bool = False,
                 reshape: bool = False) -> dict:
    shape = spec["shape"]
    n_tokens = spec["n_tokens"]
    if reshape:
        s = family_shape(spec["n_params_target"], spec["shape"]["n_layers"], corpus.vocab_size, cfg.seq_len, step=32)
        shape, n_tokens = s.to_dict(), int(spec["flops"] / training_flops_per_token(s))
    if not (run_dir / "config.json").exists():
        new_run(run_dir, ModelConfig(**shape), TrainConfig(n_tokens=n_tokens, seed=cfg.seed, optimizer=cfg.optimizer,
                                                             log_to=cfg.log_to),
                corpus)
    return train(run_dir, quiet=quiet, log=log)


def _compare(runs, fit: dict, final: dict, spec: dict, bigger: dict | None) -> dict:
    """Measured vs predicted loss, and the same-compute bigger model from the sweep's largest budget."""
    lo, hi = spec["predicted_interval"]
    measured = final["val_loss"]
    inside = lo <= measured <= hi
    top = runs.budgets[-1]
    m = runs.budget == top
    idx = np.flatnonzero(m)
    best = idx[np.argmin(runs.loss[m])]
    biggest = idx[np.argmax(runs.n_params[m])]
    out = {"measured_in_interval": bool(inside),
           "measured_minus_predicted": measured - spec["predicted_loss"],
           "interval_miss": 0.0 if inside else float(min(abs(measured - lo), abs(measured - hi))),
           "bigger_model_n_params": int(runs.n_params[biggest]), "bigger_model_loss": float(runs.loss[biggest]),
           "bigger_model_budget": float(top), "best_at_that_budget_n_params": int(runs.n_params[best]),
           "best_at_that_budget_loss": float(runs.loss[best]),
           "bigger_model_loss_gap": float(runs.loss[biggest] - runs.loss[best])}
    if bigger is not None:
        out.update({"trained_bigger_n_params": bigger["n_params"], "trained_bigger_loss": bigger["val_loss"],
                    "trained_bigger_loss_gap": bigger["val_loss"] - measured})
    return out


def _samples(run_dir: Path, seed: int, n_tokens: int = 100) -> list[dict]:
    sp = load_tokenizer(run_dir / "tokenizer.model")
    engine = Engine(load_model(run_dir), sp)
    out = []
    for i, prompt in enumerate(("Once upon a time", "Lily wanted to", "The little dog")):
        ids = engine.encode_prompt(prompt)
        s = Sampling(max_new_tokens=n_tokens, temperature=0.8, top_k=40, seed=seed + i)
        new = [int(t[0]) for t in engine.stream_ids([ids], s)]
        text = sp.decode(ids[1:] + new[:new.index(EOS_ID)] if EOS_ID in new else ids[1:] + new)
        out.append({"prompt": prompt, "text": text, "temperature": 0.8, "top_k": 40, "seed": seed + i})
    return out
