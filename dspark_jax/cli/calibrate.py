"""`dspark calibrate`: Sequential Temperature Scaling of a drafter's confidence head (paper §3.2.1).

Runs speculative decoding with the drafter on held-out prompts (confidence threshold 0, temperatures reset to
1), records every round's confidence logits z_k and accept flags, then for k = 1..γ left to right picks T_k
(log grid 0.05..20 + golden-section refinement) minimising the ECE (20 equal-width bins) of the predicted
prefix survival Π_{i<=k} σ(z_i/T_i) against "first k draft tokens accepted", earlier T fixed. The
temperatures are written into a drafter directory (--output, or the drafter itself with --in_place), so
`dspark generate` / `dspark eval` and the scheduler use them from then on.

Held-out prompts (default): training-distribution prompts that are neither trained on nor evaluation
prompts: gsm8k lines 201+, livecodebench and arena-hard-v2 minus the prompts the default training mix
selects (`dspark_jax.evaluation.datasets.heldout_prompts`), round-robin over the three sources, prompts
longer than --max_prompt_tokens skipped. --eval_tails N takes N of them from the end of each of humaneval,
mbpp and mt-bench instead (the code and chat domains the held-out mix under-represents; disjoint from `dspark
eval --limit M` for M <= 80 - N). --prompts_file replaces them.
--hybrid fits, instead of the head's temperatures, the row calibration of the drafter's hybrid with prompt lookup
(`<drafter>+ngram`, the main job's drafter; `dspark_jax.drafters.hybrid_calibration`): the same prompts decoded by
the hybrid at T = 0 with its row calibration off, a logistic map of each verified row's confidences fitted on its
rounds (the row's source, its confidence, the lookup's match and expected length), stored in drafter.json — a
deviation from the paper, which calibrates a drafter alone (BENCHMARKS.md "Session 44"); every round goes to the report's
hybrid_records.npz, and `--hybrid --rounds <that file>` refits on them without decoding (seconds; session 45's shape
terms were fitted so).
Calibrate at the sampling temperature you decode with: acceptance at T=0 (greedy matching) differs from T=1.
A drafter holds one calibration set per sampling temperature: a run at T replaces the set fitted at T and keeps
those fitted at other temperatures (--nokeep_other_sets drops them); decoding uses, per request, the set fitted
nearest to its temperature.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from absl import flags

from dspark_jax.cli.common import TARGET_HELP, read_prompts_file, run_command

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined on first use (not at import), so other commands' flags of the same names never clash."""
    if "in_place" in FLAGS:
        return
    flags.DEFINE_string("drafter", "default", "Drafter to calibrate: 'default' (the shipped drafter) or a drafter "
                        "directory exported by `dspark train`.")
    flags.DEFINE_string("output", None, "New drafter directory to write (a copy of --drafter with the fitted "
                        "temperatures).")
    flags.DEFINE_bool("in_place", False, "Write the temperatures into the --drafter directory itself (a directory "
                      "path: 'default' is refused, it would overwrite the shipped drafter in the package).")
    flags.DEFINE_string("target", "gemma3-270m", TARGET_HELP)
    flags.DEFINE_string("prompts_file", None, 'Held-out prompts as a JSONL file of {"turns": [...]} objects (used in '
                        "the training format); default: the built-in held-out split (see --help).")
    flags.DEFINE_integer("num_prompts", 48, "Held-out prompts to decode.", lower_bound=1)
    flags.DEFINE_integer("eval_tails", 0, "Of --num_prompts, this many from the end of each of humaneval, mbpp and "
                         "mt-bench (domains the training mix covers less well; disjoint from `dspark eval --limit N` "
                         "for N <= 80 - this), the rest from the built-in held-out mix.", lower_bound=0)
    flags.DEFINE_integer("max_prompt_tokens", 256, "Skip built-in held-out prompts longer than this (tokens).",
                         lower_bound=8)
    flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt.", lower_bound=2)
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature of the calibration rollouts.", lower_bound=0.0)
    flags.DEFINE_integer("seed", 0, "Random seed (prompt selection and sampling).")
    flags.DEFINE_integer("batch_size", 1, "Prompts decoded together in one batch.", lower_bound=1)
    flags.DEFINE_bool("bias", False, "Also fit a per-position bias: c_k = σ(z_k / T_k + β_k), (T_k, β_k) by the "
                      "likelihood of the held-out survival, left to right — a deviation from the paper's STS for "
                      "survival curves a temperature alone cannot match (BENCHMARKS.md 'Session 17').")
    flags.DEFINE_bool("hybrid", False, "Fit the row calibration of the drafter's hybrid with prompt lookup "
                      "(<drafter>+ngram) instead of the head's temperatures (see --help; needs --temperature 0).")
    flags.DEFINE_string("rounds", None, "With --hybrid: fit on the rounds a previous --hybrid run saved "
                        "(its report's hybrid_records.npz, decoded with the row calibration off) instead of decoding "
                        "again — seconds; the prompts it records come from the hybrid_calibration.json beside it.")
    flags.DEFINE_bool("keep_other_sets", True, "Keep the drafter's calibration sets fitted at other sampling "
                      "temperatures (each request uses the set fitted nearest to its temperature); "
                      "--nokeep_other_sets: this run's set replaces them all.")
    flags.DEFINE_integer("bins", 20, "Equal-width ECE bins.", lower_bound=1)
    flags.DEFINE_integer("min_class_count", 5, "A position needs this many held-out survivals and failures to get "
                         "its own temperature (otherwise T_k = 1).", lower_bound=0)
    flags.DEFINE_string("report_dir", "benchmarks/results/eval/calibration", "Where calibration.json, "
                        "calibration.md, reliability_before_after.png and heldout_records.npz go.")


def _check_output(source: Path) -> Path:
    from dspark_jax.drafters.checkpoint import is_drafter_dir
    if FLAGS.in_place:
        return source
    out = Path(FLAGS.output).expanduser()
    if out.resolve() == source.resolve():
        raise ValueError("--output is the drafter itself; use --in_place to overwrite it")
    if out.exists() and not is_drafter_dir(out):
        raise ValueError(f"--output {out} exists and is not a drafter directory; choose a new path")
    return out


def _source_dir(spec: str, target) -> Path:
    from dspark_jax.drafters.checkpoint import is_drafter_dir
    from dspark_jax.drafters.factory import default_drafter_path
    path = default_drafter_path(target) if spec == "default" else Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"drafter not found: {spec!r} (expected 'default' or a drafter directory)")
    if not is_drafter_dir(path):
        raise ValueError(f"{path} is not a drafter directory exported by `dspark train` (no drafter.json)")
    return path


def _reliability_table(result, min_class_count: int) -> str:
    from dspark_jax.evaluation.report import fmt, md_table
    rows = []
    with_bias = any(result.biases)
    for t, beta, fit, b, a in zip(result.temperatures, result.biases, result.fitted, result.before, result.after):
        rows.append([str(b.position), str(b.count), f"{t:.3f}" if fit else "1 (kept¹)"]
                    + ([f"{beta:+.3f}" if fit else "0"] if with_bias else [])
                    + [fmt(b.ece, pct=True), fmt(a.ece, pct=True), fmt(a.ece_floor, pct=True), fmt(b.auc, 3),
                       fmt(a.auc, 3), fmt(b.brier, 4), fmt(a.brier, 4), fmt(b.mean_label, 3)])
    header = (["position", "rounds", "T_k"] + (["β_k"] if with_bias else [])
              + ["ECE before", "ECE after", "ECE floor²", "AUC before", "AUC after", "Brier before", "Brier after",
                 "observed survival"])
    table = "\n".join(md_table(header, rows))
    table += ("\n\n² the ECE a perfectly calibrated head with the calibrated predictions shows at this many rounds "
              "(`reliability.ece_noise_floor`): ECE after near it is sampling noise, not miscalibration.")
    if not all(result.fitted):
        table += (f"\n\n¹ fewer than {min_class_count} held-out survivals or failures at this position: temperature "
                  f"left at 1.")
    return table


def _summary_line(result) -> str:
    from dspark_jax.evaluation.report import reliability_summary
    b, a = reliability_summary(result.before), reliability_summary(result.after)
    return (f"count-weighted mean ECE {100 * b['ece_mean']:.2f}% -> {100 * a['ece_mean']:.2f}%, worst position "
            f"{100 * b['ece_max']:.2f}% -> {100 * a['ece_max']:.2f}% (noise floor at this sample "
            f"{100 * a['ece_floor_mean']:.2f}%); mean AUC {b['auc_mean']:.3f} -> "
            f"{a['auc_mean']:.3f}")


def _heldout_prompts(target, file_prompts: list[str] | None) -> tuple[list[str], str]:
    from dspark_jax.evaluation.datasets import TAIL_SETS, eval_tail_prompts, heldout_prompts
    from dspark_jax.training.responses import format_prompt
    if file_prompts is not None:
        return [format_prompt(p) for p in file_prompts][:FLAGS.num_prompts], f"file:{FLAGS.prompts_file}"
    fits = lambda p: len(target.tokenizer.encode(p)) <= FLAGS.max_prompt_tokens  # noqa: E731
    source = "heldout:gsm8k[200:]+livecodebench+arena-hard-v2 minus the default training mix"
    if not FLAGS.eval_tails:
        return heldout_prompts(FLAGS.num_prompts, FLAGS.seed, keep=fits), source
    tails = eval_tail_prompts(FLAGS.eval_tails, TAIL_SETS, keep=fits)
    if len(tails) >= FLAGS.num_prompts:
        raise ValueError(f"--eval_tails {FLAGS.eval_tails} x {len(TAIL_SETS)} sets = {len(tails)} prompts leaves none "
                         f"of --num_prompts {FLAGS.num_prompts} for the held-out mix")
    prompts = heldout_prompts(FLAGS.num_prompts - len(tails), FLAGS.seed, keep=fits) + tails
    return prompts, f"{source} + the last {FLAGS.eval_tails} of {', '.join(TAIL_SETS)}"


def _write_report(report: Path, rec, result, calibration: dict, extra: dict) -> Path:
    """calibration.json, calibration.md, reliability_before_after.png and heldout_records.npz."""
    import numpy as np

    from dspark_jax.evaluation.calibration import survival_confidences
    from dspark_jax.evaluation.plots import plot_reliability
    from dspark_jax.evaluation.reliability import survival_pairs
    from dspark_jax.evaluation.report import json_safe
    from dspark_jax.utils.results import write_result

    temps, biases = np.asarray(result.temperatures), np.asarray(result.biases)
    pairs = lambda t, b=None: survival_pairs(survival_confidences(rec.confidence_logits, t, b),  # noqa: E731
                                             rec.accept_flags, rec.proposed)
    name = "STS + bias" if biases.any() else "STS"
    plot = plot_reliability({"before (T=1)": pairs(np.ones_like(temps)), f"after {name}": pairs(temps, biases)},
                            report / "reliability_before_after.png", bins=calibration["ece_bins"],
                            title=f"Held-out prefix-survival reliability before / after {name} ({len(rec)} rounds)")
    positions = [dict(temperature=t, bias=beta, fitted=f, before=dataclasses.asdict(b), after=dataclasses.asdict(a))
                 for t, beta, f, b, a in zip(result.temperatures, result.biases, result.fitted, result.before,
                                             result.after)]
    write_result(report / "calibration.json", json_safe(dict(calibration, **extra, positions=positions,
                                                             plot=str(plot))))
    np.savez_compressed(report / "heldout_records.npz", **rec.to_arrays())  # every held-out round, to refit offline
    md = report / "calibration.md"
    md.write_text(f"{name} of `{calibration['source']}` on {calibration['num_prompts']} held-out prompts ({len(rec)} "
                  f"rounds, T={calibration['sampling_temperature']:g}, {calibration['max_new_tokens']} new tokens) -> "
                  f"`{extra['drafter_written']}`\n\n{_reliability_table(result, calibration['min_class_count'])}\n\n"
                  f"{_summary_line(result)}\n\nPlot: `{plot}`\n", encoding="utf-8")
    return md


def body() -> None:
    # bad input fails here, before the (slow) JAX imports
    if FLAGS.in_place == bool(FLAGS.output):
        raise ValueError("give exactly one of --output=DIR (a new drafter directory) or --in_place")
    if FLAGS.in_place and FLAGS.drafter == "default":
        raise ValueError("--in_place with --drafter default would overwrite the shipped drafter inside the installed "
                         "package: write a calibrated copy with --output DIR (and load it with --drafter DIR), or name "
                         "the shipped directory's path as --drafter to overwrite it on purpose")
    if FLAGS.drafter != "default" and not Path(FLAGS.drafter).expanduser().exists():
        raise FileNotFoundError(f"drafter not found: {FLAGS.drafter!r} (expected 'default' or a drafter directory)")
    if FLAGS.prompts_file and FLAGS.eval_tails:
        raise ValueError("--eval_tails picks built-in prompts; it cannot be combined with --prompts_file")
    if FLAGS.hybrid and FLAGS.temperature != 0:
        raise ValueError(f"--hybrid fits the greedy (T = 0) row calibration; got --temperature {FLAGS.temperature:g}")
    if FLAGS.rounds and not FLAGS.hybrid:
        raise ValueError("--rounds refits the hybrid's row calibration: it needs --hybrid")
    if FLAGS.rounds and not Path(FLAGS.rounds).is_file():
        raise FileNotFoundError(f"--rounds {FLAGS.rounds}: no such file (a --hybrid run's hybrid_records.npz)")
    file_prompts = read_prompts_file(FLAGS.prompts_file) if FLAGS.prompts_file else None
    if FLAGS.hybrid:
        return _hybrid_body(file_prompts)

    import numpy as np

    from dspark_jax.drafters.checkpoint import write_temperatures
    from dspark_jax.drafters.factory import load_drafter, with_confidence_temperatures
    from dspark_jax.evaluation.calibration import STSConfig, sequential_scale_and_bias, sequential_temperature_scaling
    from dspark_jax.evaluation.report import json_safe, reliability_summary
    from dspark_jax.evaluation.runner import decode_speculative
    from dspark_jax.generation import GenerationConfig
    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine

    gen = GenerationConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature, seed=FLAGS.seed,
                           batch_size=FLAGS.batch_size)
    sts = STSConfig(bins=FLAGS.bins, min_class_count=FLAGS.min_class_count)
    print(f"loading target {FLAGS.target} ...", file=sys.stderr)
    target = load_target(FLAGS.target)
    source = _source_dir(FLAGS.drafter, target)
    output = _check_output(source)
    drafter = load_drafter(str(source), target)
    if not getattr(drafter.config, "confidence_head", False):
        raise ValueError(f"{source}: a {drafter.config.algorithm} drafter has no confidence head to calibrate")
    raw = with_confidence_temperatures(drafter, np.ones(drafter.config.block_size))
    prompts, prompt_source = _heldout_prompts(target, file_prompts)

    print(f"decoding {len(prompts)} held-out prompts with {source} at sampling temperature {FLAGS.temperature:g} "
          f"(confidence threshold 0, the head's raw confidences) ...", file=sys.stderr)
    rec = decode_speculative(target, raw, prompts, gen, 0.0, progress=lambda d, n: print(
        f"  [{d}/{n}] prompts", file=sys.stderr, flush=True)).records
    if not len(rec):
        raise ValueError("the held-out rollouts produced no verification rounds (every prompt stopped at once)")
    fit = sequential_scale_and_bias if FLAGS.bias else sequential_temperature_scaling
    result = fit(rec.confidence_logits, rec.accept_flags, rec.proposed, sts)

    calibration = json_safe(dict(
        method=("sequential temperature and per-position bias (likelihood of the cumulative product's survival, left "
                "to right; a deviation from the paper's STS)" if FLAGS.bias else
                "sequential temperature scaling (ECE of the cumulative product, left to right)"),
        temperatures=list(result.temperatures), biases=list(result.biases), fitted=list(result.fitted),
        min_class_count=sts.min_class_count,
        prompts=prompt_source, num_prompts=len(prompts), rounds=len(rec), sampling_temperature=gen.temperature,
        max_new_tokens=gen.max_new_tokens, seed=gen.seed, ece_bins=sts.bins,
        grid=dict(t_min=sts.t_min, t_max=sts.t_max, points=sts.grid_points, golden_iterations=sts.refine_iterations),
        source=str(source), before=reliability_summary(result.before), after=reliability_summary(result.after)))
    written = write_temperatures(source, output, result.temperatures, calibration, result.biases,
                                 keep_other_sets=FLAGS.keep_other_sets)
    head = load_drafter(str(written), target).state["confidence"]
    at = np.asarray(head["calibrated_at"][...])
    for name, fitted in (("temperatures", result.temperatures), ("biases", result.biases)):
        loaded = np.asarray(head[name][...])
        loaded = loaded[int(np.argmin(np.abs(at - gen.temperature)))] if loaded.ndim == 2 else loaded
        if not np.array_equal(loaded, np.float32(fitted)):
            raise RuntimeError(f"{written}: {name} read back {loaded} differ from the fitted {fitted}")

    print(_reliability_table(result, sts.min_class_count))
    print(_summary_line(result))
    md = _write_report(Path(FLAGS.report_dir), rec, result, calibration, dict(
        drafter_written=str(written), machine=describe_machine(), target=target.config.name,
        command="dspark calibrate " + " ".join(sys.argv[2:])))
    sets = ", ".join(f"T={t:g}" for t in at.tolist())
    print(f"wrote calibrated drafter {written} (calibration sets: {sets}); report {md}", file=sys.stderr)


def _saved_rounds(path: Path):
    """(RoundRecords, how they were decoded: prompts, num_prompts, max_new_tokens, seed — from the
    hybrid_calibration.json beside them, where there is one — and rounds_file) of a --hybrid run's
    hybrid_records.npz. Raises ValueError for a file that does not hold every round field."""
    import json

    import numpy as np

    from dspark_jax.evaluation.records import RoundRecords
    with np.load(path) as saved:
        try:
            rec = RoundRecords.from_arrays(saved)
        except ValueError as e:
            raise ValueError(f"--rounds {path}: not a --hybrid run's hybrid_records.npz ({e})") from None
    report = path.parent / "hybrid_calibration.json"
    made = json.loads(report.read_text()) if report.is_file() else {}
    decoded = {k: made[k] for k in ("prompts", "num_prompts", "max_new_tokens", "seed") if k in made}
    print(f"fitting on {len(rec)} saved rounds of {path} ({made.get('command', 'origin not recorded')})",
          file=sys.stderr)
    return rec, dict(decoded, rounds_file=str(path))


def _hybrid_body(file_prompts: list[str] | None) -> None:
    """--hybrid: decode with `<drafter>+ngram` (row calibration off), fit, write (module docstring)."""
    import numpy as np

    from dspark_jax.drafters.checkpoint import hybrid_row_calibration, write_hybrid_row_calibration
    from dspark_jax.drafters.factory import load_drafter
    from dspark_jax.drafters.hybrid_calibration import FEATURES
    from dspark_jax.evaluation.calibration import fit_hybrid_row_calibration, hybrid_rows_mapped
    from dspark_jax.evaluation.reliability import survival_ece
    from dspark_jax.evaluation.runner import decode_speculative
    from dspark_jax.generation import GenerationConfig
    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine
    from dspark_jax.utils.results import write_result

    print(f"loading target {FLAGS.target} ...", file=sys.stderr)
    target = load_target(FLAGS.target)
    source = _source_dir(FLAGS.drafter, target)
    output = _check_output(source)
    if FLAGS.rounds:
        rec, decoded = _saved_rounds(Path(FLAGS.rounds))
    else:
        hybrid = load_drafter(f"{source}+ngram:row_calibration=0", target)
        prompts, prompt_source = _heldout_prompts(target, file_prompts)
        gen = GenerationConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=0.0, seed=FLAGS.seed,
                               batch_size=FLAGS.batch_size)
        print(f"decoding {len(prompts)} held-out prompts with {source}+ngram at T = 0 (row calibration off) ...",
              file=sys.stderr)
        rec = decode_speculative(target, hybrid, prompts, gen, 0.0, progress=lambda d, n: print(
            f"  [{d}/{n}] prompts", file=sys.stderr, flush=True)).records
        decoded = dict(prompts=prompt_source, num_prompts=len(prompts), max_new_tokens=gen.max_new_tokens,
                       seed=gen.seed)
    weights = fit_hybrid_row_calibration(rec.confidence, rec.lookup_draft, rec.lookup_expected, rec.accepted,
                                         rec.proposed)
    mapped = hybrid_rows_mapped(rec.confidence, rec.lookup_draft, rec.lookup_expected, weights)
    ece = {name: [float(e) for e in survival_ece(c, rec.accept_flags, rec.proposed, FLAGS.bins, 0)[0]]
           for name, c in (("before", rec.confidence), ("after", mapped))}
    record = dict(weights=[float(w) for w in weights], sampling_temperature=0.0, rounds=len(rec),
                  lookup_rows=int(rec.lookup_draft.sum()), **decoded, ece_bins=FLAGS.bins, ece_in_sample=ece,
                  command="dspark calibrate " + " ".join(sys.argv[2:]))
    write_hybrid_row_calibration(source, record, dst=output)
    if hybrid_row_calibration(output) != tuple(record["weights"]):
        raise RuntimeError(f"{output}: the row calibration read back differs from the fitted one")
    report = Path(FLAGS.report_dir)
    report.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(report / "hybrid_records.npz", **rec.to_arrays())  # every round, to refit offline
    write_result(report / "hybrid_calibration.json", dict(record, features=list(FEATURES), source=str(source),
                                                          drafter_written=str(output), machine=describe_machine()))
    print("weights: " + ", ".join(f"{n} {w:+.3f}" for n, w in zip(FEATURES, weights)))
    print(f"survival ECE %, positions 1-4, before -> after (in sample, {len(rec)} rounds): "
          + ", ".join(f"{100 * b:.1f} -> {100 * a:.1f}" for b, a in zip(ece["before"][:4], ece["after"][:4]))
          + f"; worst {100 * max(ece['before']):.1f} -> {100 * max(ece['after']):.1f}")
    print(f"wrote the hybrid row calibration into {output}/drafter.json; report {report}/hybrid_calibration.json",
          file=sys.stderr)


def run(argv: list[str]) -> None:
    _define_flags()
    run_command("calibrate", __name__, __doc__, body, argv)
