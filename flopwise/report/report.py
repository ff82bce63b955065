"""The autopilot's report: ``report.md`` and a self-contained ``report.html`` (plots embedded)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from flopwise.fsutil import atomic_write_text
from flopwise.laws.forms import FORMS


def _n(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _sections(s: dict, fit: dict, plan: dict) -> list[tuple[str, list[str], list[list[str]] | None]]:
    """(heading, paragraphs, optional table rows with header first) for both renderers."""
    lo, hi = s["predicted_loss_interval"]
    verdict = ("inside the fitted law's 90% interval" if s["measured_in_interval"] else
               f"outside the fitted law's 90% interval, by {s['interval_miss']:.3f} nats/token")
    checks = s.get("checks", [])
    rows = [["check", "value", "threshold", "result", "what it saw"]] + [
        [c["name"], (", ".join(map(str, c["value"])) or "none") if isinstance(c["value"], list) else str(c["value"]),
         c["threshold"], "pass" if c["passed"] else ("FAIL" if c["severity"] == "critical" else "caveat"), c["why"]]
        for c in checks]
    law = s.get("law_used", {})
    out = [(f"Verdict: {s.get('verdict', 'unchecked')}", [
        {"sound": "Every check passed: the sweep pins the law down and the plan below can be trusted to its interval.",
         "usable with caveats": "The plan is usable, but the checks marked 'caveat' or 'FAIL' below say where it is "
                                "less certain than it looks.",
         "not informative": "The sweep cannot tell which model is best for this budget: treat the plan below as a "
                            "guess, and give a larger budget (or more sizes) to get an informative sweep."}.get(
            s.get("verdict"), ""),
        f"Law used for the plan: {law.get('law', 'fitted')} ({law.get('why', '')})."], rows if checks else None)]
    out.append(("What this is", [
        f"flopwise spent {s['sweep_flops']:.3g} of a {s['budget_flops']:.3g}-FLOP budget on an IsoFLOP sweep of small "
        "LLaMA-style models on this corpus, fitted a scaling law L(N, D) = "
        f"{FORMS[fit.get('form', 'chinchilla')].formula} to the results (every run trained with "
        f"{s.get('optimizer', 'adamw')}; the law holds for it), and used "
        f"the law to choose the model for the remaining {s['final_flops']:.3g} FLOPs. Loss is the cross-entropy of the "
        "next token on held-out text, in nats per token: lower is better."], None))
    out.append(("Headline", [
        ("Compute-optimal model" if s.get("verdict", "sound") == "sound" else
         f"Planned model (verdict: {s.get('verdict')}; see above)") +
        f" for the final budget: {_n(s['n_params_opt'])} parameters trained on "
        f"{_n(s['n_tokens_opt'])} tokens ({s['epochs']:.1f} epochs of the corpus).",
        f"Predicted validation loss {s['predicted_loss']:.3f} (90% interval {lo:.3f}-{hi:.3f}); measured "
        f"{s['measured_loss']:.3f} ({s['measured_bpb']:.3f} bits per byte), {verdict}.",
        f"Bigger is not better: at {s['bigger_model_budget']:.3g} FLOPs the sweep's largest model "
        f"({_n(s['bigger_model_n_params'])} params) reached {s['bigger_model_loss']:.3f}, "
        f"{s['bigger_model_loss_gap']:+.3f} worse than the best size for that compute "
        f"({_n(s['best_at_that_budget_n_params'])} params, {s['best_at_that_budget_loss']:.3f})."
        + (f" A {_n(s['trained_bigger_n_params'])}-parameter model trained with the final budget reached "
           f"{s['trained_bigger_loss']:.3f} ({s['trained_bigger_loss_gap']:+.3f})." if "trained_bigger_loss" in s
           else "")], None))
    rows = [["parameter", "estimate", "90% interval"]]
    for k in ("E", "A", "B", "alpha", "beta", "gamma", "r_d_star", "a", "b"):
        if k not in fit:
            continue
        iv = fit.get("intervals", {}).get(k)
        rows.append([k, f"{fit[k]:.4g}", f"{iv['lower']:.4g} - {iv['upper']:.4g}" if iv else "-"])
    notes = ["a and b are the allocation exponents: N_opt grows as C^a and D_opt as C^b."]
    if fit.get("fixed"):
        notes.append("This is the fallback law: " + ", ".join(
            f"{k} held at {v:.4g} ± {fit.get('fixed_sd', {}).get(k, 0):g}" for k, v in fit["fixed"].items())
            + " (the prior's values, drawn with that spread in the bootstrap); E, A and B fitted to the sweep.")
    if "approach2" in fit:
        a2 = fit["approach2"]
        notes.append(f"Approach 2 (IsoFLOP minima): N_opt ∝ C^{a2['a']:.3f}, D_opt ∝ C^{a2['b']:.3f}.")
    h = fit.get("holdout")
    if h:
        notes.append(f"Extrapolation check: fitted without the largest budget, the law predicted its runs with a mean "
                     f"error of {h['mean_abs_rel_error']:.2%} (max {h['max_abs_rel_error']:.2%})"
                     + (f"; the 90% interval of the law covered {h['coverage']:.0%} of them, the predictive interval "
                        f"(with the runs' own scatter) {h['predictive_coverage']:.0%}." if "coverage" in h else "."))
    notes.append(f"The final run's interval adds to the law's bootstrap interval a relative error of "
                 f"{s.get('predictive_sigma', 0):.2%} (one s.d.): the runs' scatter about the law and the hold-out "
                 "check's extrapolation error, grown with how far the final budget lies beyond the sweep.")
    out.append((f"The fitted law (Approach 3, {fit.get('form', 'chinchilla')} form, bootstrap intervals)", notes, rows))
    out += _forms_section(s)
    out += _optimizer_section(s)
    out.append(("The plan for the final run", [
        f"Data-constrained correction (Muennighoff et al. 2023) applied: the corpus has "
        f"{plan.get('data_constrained', {}).get('unique_tokens', 0):,.0f} unique training tokens."],
        [["quantity", "value"], ["parameters N", f"{s['n_params_opt']:,}"], ["tokens D", f"{s['n_tokens_opt']:,}"],
         ["tokens per parameter", f"{s['n_tokens_opt'] / s['n_params_opt']:.1f}"], ["epochs", f"{s['epochs']:.2f}"],
         ["shape", ", ".join(f"{k} {v}" for k, v in plan["shape"].items() if k in (
             "n_layers", "d_model", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "seq_len"))],
         ["training FLOPs", f"{s['final_flops']:.3g}"]]))
    out.append(("Samples from the final model", [
        f"“{x['text']}” (prompt “{x['prompt']}”, temperature {x['temperature']}, top-k {x['top_k']}, "
        f"seed {x['seed']})" for x in s["samples"]], None))
    w = s["wall_seconds"]
    cost = (f"FLOPs: sweep {s['sweep_flops']:.3g}, final {s['final_flops']:.3g}. Wall time: sweep "
            f"{w['sweep'] / 60:.1f} min, final model {w['final'] / 60:.1f} min, total {w['total'] / 60:.1f} min. "
            f"Energy: about {s['energy_kwh_estimate']:.3f} kWh (estimate: ~10 W per busy CPU core).")
    out.append(("Cost", [cost], None))
    if s["warnings"]:
        out.append(("Warnings", s["warnings"], None))
    p = s["provenance"]
    out.append(("Provenance", [
        f"flopwise {p['flopwise']}, Python {p['python']}, torch {p['torch']}, numpy {p['numpy']} on {p['machine']}; "
        f"seed {p['seed']}; corpus {p['corpus']} (hash {p['corpus_hash'][:16]}).",
        "Command: " + ("; ".join(p["commands"]) or "(library call)"),
        "Files: sweep/ (one run directory per sweep run, sweep.json), fit/ (law.json, fit.json, plots), "
        "final/ (the trained model), summary.json. Reproduce the fit with 'flopwise fit sweep/'."], None))
    return out


def _optimizer_section(s: dict) -> list[tuple[str, list[str], list[list[str]] | None]]:
    """The comparison sweep's verdict on the optimizer (``--compare-optimizer``)."""
    c = s.get("optimizer_comparison")
    if not c:
        return []
    a, b = c["names"]
    final = c["budgets"][-1]
    m = final["compute_multiplier"]
    paras = [f"The sweep was run again with {b} ({c['sweep_flops']:.3g} FLOPs beyond the budget, in "
             f"{c['sweep']}) and both sweeps fitted. At the final run's {final['flops']:.3g} FLOPs {final['stronger']} "
             "is stronger: the other needs " + ("more compute than either law reaches" if m is None else
                                                f"{m:.2f}x the FLOPs") + " to reach its loss.",
             f"Allocation exponents: {a} a = {c['exponents'][a]['a']:.3f}, {b} a = {c['exponents'][b]['a']:.3f}. "
             f"Verdicts of the two fits: {a} {c['verdicts'][a]}, {b} {c['verdicts'][b]}"
             + ("; a fit that is not informative makes these multipliers say little." if "not informative" in
                c["verdicts"].values() else ".")]

    def iv(x: dict | None) -> str:
        if not x:
            return "-"
        return (f"{'-' if x['lower'] is None else format(x['lower'], '.2f')} - "
                f"{'∞' if x['upper'] is None else format(x['upper'], '.2f')}")

    rows = [["budget (FLOPs)", f"loss, {a}", f"loss, {b}", "stronger", "compute multiplier", "90% interval"]] + [
        [f"{r['flops']:.3g}", f"{r['loss_' + a]:.4f}", f"{r['loss_' + b]:.4f}", r["stronger"],
         "-" if r["compute_multiplier"] is None else f"{r['compute_multiplier']:.2f}",
         iv(r["compute_multiplier_interval"])] for r in c["budgets"]]
    return [(f"Optimizers: {a} against {b}", paras, rows)]


def _forms_section(s: dict) -> list[tuple[str, list[str], list[list[str]] | None]]:
    """Which law form and parameter count the plan used, against the others the sweep was fitted with."""
    forms, conventions = s.get("forms"), s.get("conventions")
    if not forms and not conventions:
        return []
    paras = [f"The plan uses the {s.get('law_form', 'chinchilla')} form with N counted as total parameters "
             "(every weight, embeddings included: Pearce & Song 2024 and Porian et al. 2024 trace Kaplan's larger "
             "exponent to counting non-embedding parameters at small sizes, where embeddings are most of a model)."]
    if forms:
        paras.append("Each form was fitted without the largest budget and scored by its mean error on that budget's "
                      "runs, with 10% of the error charged per parameter beyond five; the lowest score is the law.")
    if conventions and len(conventions) > 1:
        parts = [f"{c.replace('_', '-')}: a = {b['a']:.3f}, D_opt {_n(b['optimal'][0]['d_opt'])} at "
                 f"{b['optimal'][0]['flops']:.3g} FLOPs" for c, b in conventions.items()]
        paras.append("The same form fitted with each parameter count gives " + "; ".join(parts)
                     + f" (the plans for D differ by {s.get('convention_factor') or 1:.2f}x).")
    rows = None
    if forms:
        rows = [["form", "N counts", "parameters", "a", "held-out error", "coverage", "score", ""]] + [
            [r["form"], r["convention"].replace("_", "-"), str(r["n_params"])]
            + (["-", "-", "-", "-", "skipped: " + r["skipped"]] if "skipped" in r else
               [f"{r['a']:.3f}", f"{r['holdout_error']:.2%}",
                "-" if r.get("coverage") is None else f"{r['coverage']:.0%}", f"{r['score']:.4f}",
                "selected" if r.get("selected") else ("" if r["usable"] else
                                                      "not identified: " + ", ".join(r["problems"]))])
            for r in forms]
    return [("Law forms and parameter counts", paras, rows)]


def write_report(out: str | Path, summary: dict, fit: dict, plan: dict, plots: list[str]) -> tuple[Path, Path]:
    out = Path(out)
    sections = _sections(summary, fit, plan)
    pngs = [Path(p) for p in plots if p.endswith(".png")]
    captions = {"isoflop": "IsoFLOP profiles: loss against model size at each budget; stars mark the minima.",
                "optimal": "Compute-optimal N and D against compute: this fit (with its 90% band), the IsoFLOP minima "
                           "and published laws for comparison.",
                "contours": "Predicted loss over (N, D), with the efficient frontier and the sweep's runs.",
                "residuals": "How far each run lies from the fitted law.",
                "loss_curves": "Training loss of every run against compute; dots are validation losses.",
                "compare": "The two optimizers' losses at their compute-optimal allocations, and the compute "
                           "multiplier: the FLOPs the weaker needs to match the stronger."}
    md = ["# flopwise report", ""]
    for head, paras, rows in sections:
        md += [f"## {head}", ""] + [p + "\n" for p in paras]
        if rows:
            md += ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            md += ["| " + " | ".join(r) + " |" for r in rows[1:]] + [""]
        if head.startswith("The fitted law"):
            md += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out)})\n\n{captions.get(p.stem, '')}\n"
                                      for p in pngs]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(md) + "\n")

    e = html.escape
    body = []
    for head, paras, rows in sections:
        body.append(f"<h2>{e(head)}</h2>" + "".join(f"<p>{e(p)}</p>" for p in paras))
        if rows:
            body.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>" + "".join(
                "<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows[1:]) + "</table>")
        if head.startswith("The fitted law"):
            body.append("<h2>Plots</h2>")
            for p in pngs:
                data = base64.b64encode(p.read_bytes()).decode()
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(p.stem)}">'
                            f"<figcaption>{e(captions.get(p.stem, ''))}</figcaption></figure>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>flopwise report</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;line-height:1.5;"
            "color:#222}h1{border-bottom:2px solid #444}h2{margin-top:1.6em;color:#234}table{border-collapse:collapse;"
            "margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f0f3f6}"
            "img{max-width:100%}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}</style></head><body>"
            "<h1>flopwise report</h1>" + "".join(body) + "</body></html>")
    html_path = out / "report.html"
    atomic_write_text(html_path, page)
    return md_path, html_path
