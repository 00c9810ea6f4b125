"""JSON, markdown and raw per-round arrays of an evaluation (`SuiteResult`)."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np

from dspark_jax.evaluation import plots
from dspark_jax.evaluation.reliability import PositionReliability, weighted_mean
from dspark_jax.evaluation.reliability import survival_pairs
from dspark_jax.evaluation.suite import SuiteResult
from dspark_jax.evaluation.sweep import METHOD_NOTE as SWEEP_NOTE
from dspark_jax.utils.results import write_result


def json_safe(x):
    """JSON-safe: NaN/inf → None, numpy scalars → Python numbers, tuples → lists."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, np.ndarray):
        return json_safe(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def reliability_summary(rows: list[PositionReliability]) -> dict:
    """Count-weighted means over positions (the spec's dataset summary) and the worst position's ECE."""
    eces = [r.ece for r in rows if r.count]
    return dict(ece_mean=weighted_mean(rows, "ece"), ece_floor_mean=weighted_mean(rows, "ece_floor"),
                auc_mean=weighted_mean(rows, "auc"),
                brier_mean=weighted_mean(rows, "brier"), ece_max=max(eces) if eces else None)


def result_dict(result: SuiteResult, **extra) -> dict:
    gen = result.config.generation
    out = dict(extra)
    out["settings"] = dict(temperature=gen.temperature, max_new_tokens=gen.max_new_tokens, seed=gen.seed,
                           batch_size=gen.batch_size, top_k=gen.top_k, top_p=gen.top_p,
                           confidence_threshold=result.config.confidence_threshold, ece_bins=result.config.bins)
    out["datasets"] = [dict(name=b.name, domain=b.domain, prompts=len(b.prompts), source=b.source)
                       for b in result.benchmarks]
    out["drafters"] = [dataclasses.asdict(d) for d in result.drafters]
    out["plain"] = {p.dataset: dataclasses.asdict(p) for p in result.plain}
    out["results"] = [dict({k: v for k, v in dataclasses.asdict(r).items() if k not in ("acceptance", "records")},
                           **dataclasses.asdict(r.acceptance)) for r in result.runs]
    macro = {}
    for d in result.drafters:
        macro[d.label] = {scope or "all": dict(
            accept_length=result.macro(d.label, lambda r: r.acceptance.accept_length, scope),
            mean_proposed=result.macro(d.label, lambda r: r.acceptance.mean_proposed, scope),
            verify_rate=result.macro(d.label, lambda r: r.acceptance.verify_rate, scope),
            speedup=result.macro(d.label, lambda r: r.speedup, scope))
            for scope in [None, *result.domains]}
    out["macro_average"] = macro
    out["position_acceptance"] = {d.label: {scope or "all": dict(
        conditional_acceptance=result.position_curve(d.label, scope, "conditional_acceptance"),
        prefix_survival=result.position_curve(d.label, scope, "prefix_survival"))
        for scope in [None, *result.domains]} for d in result.drafters}
    out["confidence_reliability"], out["threshold_sweep"] = {}, {}
    for d in result.drafters:
        if d.has_confidence:
            rows = result.reliability(d.label)
            out["confidence_reliability"][d.label] = dict(positions=[dataclasses.asdict(r) for r in rows],
                                                          **reliability_summary(rows))
            out["threshold_sweep"][d.label] = {scope or "all": [dataclasses.asdict(p) for p in
                                                                result.sweep(d.label, scope)]
                                               for scope in [None, *result.domains]}
    out["threshold_sweep_note"] = SWEEP_NOTE
    out["definitions"] = dict(
        model_rounds="rounds that ran the drafter model's forward (not prompt lookup's draft alone, not a hybrid's "
                     "round that skipped its model)",
        accept_length="τ pooled over rounds: Σ committed tokens / Σ rounds, bonus token included",
        verify_rate="Σ committed / Σ (proposed + 1)",
        prefix_survival="position k: #rounds with the first k draft tokens accepted / #rounds verifying position k",
        conditional_acceptance="position k: #rounds accepting k / #rounds verifying k with 1..k-1 accepted",
        macro_average="mean over benchmark sets (each set weighs the same), per domain and over all sets",
        speedup="speculative tokens/s / plain tokens/s, same prompts, same run, compilation excluded",
        confidence_reliability="predicted Π_{i<=k} c_i vs all first k accepted, verified positions only; ECE with "
                               "equal-width bins, exact ROC-AUC (ties ½), Brier")
    return json_safe(out)


def fmt(x, digits: int = 2, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{100 * x:.1f}%" if pct else f"{x:.{digits}f}"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(result: SuiteResult, plots: dict[str, str] | None = None, title: str = "Evaluation") -> str:
    gen = result.config.generation
    sets = [b.name for d in result.domains for b in result.benchmarks if b.domain == d]
    domain_of = {b.name: b.domain for b in result.benchmarks}
    n_prompts = ", ".join(f"{b.name} {len(b.prompts)}" for b in result.benchmarks)
    lines = [f"## {title}", "",
             f"Temperature {gen.temperature:g}, {gen.max_new_tokens} new tokens, batch {gen.batch_size}, seed "
             f"{gen.seed}, confidence threshold {result.config.confidence_threshold:g}; prompts per set: {n_prompts}.",
             "", "**Accept length τ** (committed tokens per round, bonus included, pooled over rounds; domain "
             "columns and *macro* = mean over sets):", ""]
    header = ["drafter"] + [f"{domain_of[s]}: {s}" for s in sets] + [*result.domains, "macro"]
    rows = []
    for d in result.drafters:
        rows.append([d.label] + [fmt(result.run(d.label, s).acceptance.accept_length) for s in sets]
                    + [fmt(result.macro(d.label, lambda r: r.acceptance.accept_length, dom)) for dom in result.domains]
                    + [fmt(result.macro(d.label, lambda r: r.acceptance.accept_length))])
    lines += md_table(header, rows)

    lines += ["", "**Speed** (tokens/s, speculative and plain decoding side by side in one run; speed-up in "
              "brackets; at each drafter's fixed draft length with every proposal verified — not the hardware-aware "
              "draft length of `dspark generate --draft_length auto`, which can skip drafting where it does not pay):",
              ""]
    plain = {p.dataset: p for p in result.plain}
    rows = [["plain"] + [fmt(plain[s].tokens_per_s, 1) for s in sets] + ["1.00"]]
    for d in result.drafters:
        runs = [result.run(d.label, s) for s in sets]
        rows.append([d.label] + [f"{fmt(r.tokens_per_s, 1)} ({fmt(r.speedup)}x)" for r in runs]
                    + [fmt(result.macro(d.label, lambda r: r.speedup)) + "x"])
    lines += md_table(["decoding"] + sets + ["macro speed-up"], rows)

    lines += ["", "**Per set**:", ""]
    rows = []
    for r in result.runs:
        a = r.acceptance
        same = {True: "yes", False: "NO", None: "(sampled)"}[r.identical_to_plain]
        rows.append([r.drafter, r.dataset, str(a.rounds), str(a.model_rounds), fmt(a.accept_length, 3),
                     fmt(a.mean_proposed), fmt(a.verify_rate, 3), fmt(r.tokens_per_s, 1), fmt(r.speedup), same])
    lines += md_table(["drafter", "set", "rounds", "rounds running the drafter model", "τ", "proposed / round",
                       "verify rate", "tokens/s", "speed-up", "output = plain"], rows)

    g = max(d.gamma for d in result.drafters)
    lines += ["", "**Position-wise conditional acceptance** P(k accepted | 1..k−1 accepted), mean over the "
              "sets of each domain (paper Fig. 2); in brackets the rounds that reached position k:", ""]
    rows = []
    for d in result.drafters:
        for dom in result.domains:
            curve, reached = result.position_curve(d.label, dom), result.reached(d.label, dom)
            cells = [f"{fmt(v)} ({n})" for v, n in zip(curve, reached)]
            rows.append([d.label, dom] + cells + ["–"] * (g - len(curve)))
    lines += md_table(["drafter", "domain"] + [f"k={k}" for k in range(1, g + 1)], rows)
    lines += ["", "**Prefix survival** P(first k accepted), all sets:", ""]
    rows = [[d.label] + [fmt(v) for v in result.position_curve(d.label, None, "prefix_survival")]
            + ["–"] * (g - d.gamma) for d in result.drafters]
    lines += md_table(["drafter"] + [f"k={k}" for k in range(1, g + 1)], rows)

    with_head = [d for d in result.drafters if d.has_confidence]
    if with_head:
        lines += ["", "**Confidence quality**: predicted prefix survival Π c_i vs realised, verified positions "
                  f"only, all sets ({result.config.bins}-bin ECE; ECE floor: what a perfectly calibrated head with the "
                  "same predictions shows at this many rounds — ECE near it is noise; exact ROC-AUC, Brier):", ""]
        rows = []
        for d in with_head:
            rel = result.reliability(d.label)
            for p in rel:
                rows.append([d.label, str(p.position), str(p.count), fmt(p.ece, pct=True),
                             fmt(p.ece_floor, pct=True), fmt(p.auc, 3),
                             fmt(p.brier, 3), fmt(p.mean_pred, 3), fmt(p.mean_label, 3)])
            s = reliability_summary(rel)
            rows.append([d.label, "mean", str(sum(p.count for p in rel)), fmt(s["ece_mean"], pct=True),
                         fmt(s["ece_floor_mean"], pct=True), fmt(s["auc_mean"], 3), fmt(s["brier_mean"], 3), "", ""])
        lines += md_table(["drafter", "position", "rounds", "ECE", "ECE floor", "AUC", "Brier", "mean predicted",
                           "mean observed"], rows)
        lines += ["", "**Static confidence-threshold sweep** (offline from this run; draft tokens verified per "
                  "round = accepted + rejected, acceptance rate = accepted / verified):", ""]
        rows = []
        for d in with_head:
            for dom in result.domains:
                for p in result.sweep(d.label, dom):
                    rows.append([d.label, dom, f"{p.threshold:.1f}", fmt(p.accepted_per_round),
                                 fmt(p.rejected_per_round), fmt(p.acceptance_rate, pct=True), fmt(p.accept_length)])
        lines += md_table(["drafter", "domain", "threshold", "accepted / round", "rejected / round", "acceptance rate",
                         "τ"], rows)
        lines += ["", f"Sweep method: {SWEEP_NOTE}"]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"{name} `{path}`" for name, path in plots.items())]
    return "\n".join(lines) + "\n"


def write_records(path: str | Path, result: SuiteResult) -> Path:
    """Every round's arrays (compressed npz, keys `<drafter index>/<set>/<field>`) for offline analysis."""
    arrays = {}
    for i, d in enumerate(result.drafters):
        for r in result.runs:
            if r.drafter == d.label:
                arrays.update(r.records.to_arrays(f"{i}/{r.dataset}/"))
    arrays["drafters"] = np.array(json.dumps([d.label for d in result.drafters]))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def slug(label: str) -> str:
    """A file-name-safe form of a drafter label."""
    return re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_") or "drafter"


def write_report(result: SuiteResult, output_dir: str | Path, **extra) -> dict[str, Path]:
    """eval.json, eval.md, records.npz and the PNG plots under `output_dir`; returns their paths."""

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    temp = f"T={result.config.generation.temperature:g}"
    min_rounds = 10
    curves = {dom: {d.label: np.where(result.reached(d.label, dom) >= min_rounds, result.position_curve(d.label, dom),
                                      np.nan) for d in result.drafters} for dom in result.domains}
    paths = {"position acceptance": plots.plot_position_acceptance(
        curves, out / "position_acceptance.png",
        title=f"Position-wise conditional acceptance, {temp} (positions reached by >= {min_rounds} rounds)")}
    for d in result.drafters:
        if not d.has_confidence:
            continue
        r = result.records(d.label)
        paths[f"reliability {d.label}"] = plots.plot_reliability(
            {"as decoded": survival_pairs(r.confidence, r.accept_flags, r.proposed)},
            out / f"reliability_{slug(d.label)}.png", bins=result.config.bins,
            title=f"Prefix-survival reliability, {d.label}, {temp}")
        paths[f"threshold sweep {d.label}"] = plots.plot_threshold_sweep(
            {dom: result.sweep(d.label, dom) for dom in result.domains}, out / f"threshold_sweep_{slug(d.label)}.png",
            title=f"Confidence threshold sweep (offline), {d.label}, {temp}")
    shown = {k: str(v) for k, v in paths.items()}
    paths["records"] = write_records(out / "records.npz", result)
    data = result_dict(result, **extra)
    data["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"] = write_result(out / "eval.json", data)
    md = out / "eval.md"
    md.write_text(markdown(result, shown, title=f"Evaluation, {temp}"), encoding="utf-8")
    paths["markdown"] = md
    return paths
