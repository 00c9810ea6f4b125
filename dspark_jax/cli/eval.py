"""`dspark eval`: speculative decoding over benchmark prompt sets for one or more drafters.

Every drafter decodes the same prompts with the same seed and batching; plain decoding runs once per set in
the same process, so speed-ups are measured side by side (compilation excluded). Reports per set and per
domain (math / code / chat, macro averages over sets): accept length τ (Σ committed / Σ rounds, bonus
included), draft tokens verified per round, verify rate, position-wise prefix survival and conditional
acceptance, rounds, tokens/s; for drafters with a confidence head also the reliability of the predicted
prefix survival (ECE / ROC-AUC / Brier per position) and an offline static-threshold sweep.
Writes <output_dir>/eval.json, eval.md, records.npz (every round) and PNG plots.
"""
from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from dspark_jax.cli.common import TARGET_HELP, run_command

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined on first use (not at import), so other commands' flags of the same names never clash."""
    if "drafters" in FLAGS:
        return
    from dspark_jax.evaluation.datasets import DEFAULT_DATASETS
    flags.DEFINE_string("datasets", ",".join(DEFAULT_DATASETS), "Comma-separated benchmark sets: gsm8k (its first "
                        "200 prompts), math500, aime25, humaneval, mbpp, mt-bench, or paths of {\"turns\": [...]} "
                        "JSONL files.")
    flags.DEFINE_string("drafters", "default", "Comma-separated drafters, each 'default' (the shipped drafter), a "
                        "drafter directory, or 'random:<dspark|dflash|eagle3>'; 'LABEL=SPEC' names one in the "
                        "report.")
    flags.DEFINE_string("target", "gemma3-270m", TARGET_HELP)
    flags.DEFINE_integer("limit", None, "Use N prompts of each set, from --offset on (default: all).", lower_bound=1)
    flags.DEFINE_integer("offset", 0, "Skip the first N prompts of each set (file order): with --limit, a later "
                         "slice, e.g. prompts disjoint from an earlier --limit run.", lower_bound=0)
    flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.", lower_bound=0.0)
    flags.DEFINE_integer("max_new_tokens", 256, "New tokens per prompt (fewer if a stop token comes).", lower_bound=1)
    flags.DEFINE_integer("gamma", None, "Draft tokens per round for every drafter (default: each drafter's trained "
                         "block size; at most that).", lower_bound=1)
    flags.DEFINE_float("confidence_threshold", 0.0, "Static confidence threshold in [0, 1] (0 = verify full blocks; "
                       "the threshold sweep is exact only from a threshold-0 run).")
    flags.DEFINE_string("output_dir", "benchmarks/results/eval", "Directory for eval.json, eval.md, records.npz and "
                        "the plots.")
    flags.DEFINE_integer("seed", 0, "Random seed (the same for every drafter).")
    flags.DEFINE_integer("batch_size", 1, "Prompts decoded together in one batch.", lower_bound=1)
    flags.DEFINE_integer("draft_vocab_size", 32768, "For random drafters: draft vocabulary size (0 = full).",
                         lower_bound=0)
    flags.DEFINE_string("heldout_dir", None, "Also score each DSpark / DFlash drafter teacher-forced on this held-out "
                        "feature cache (`dspark prepare-data --heldout N --output_dir DIR`): slot accuracy, greedy "
                        "and probabilistic tau, in seconds; written to heldout.json.")
    flags.DEFINE_bool("heldout_only", False, "With --heldout_dir: only the held-out scores, no decoding.")
    flags.DEFINE_bool("raw_prompts", False, "Use prompts as they are instead of the training format "
                      "'Question: ...\\n\\nAnswer:' (the default target is a base model).")


def parse_drafter_specs(text: str) -> list[tuple[str, str]]:
    """'default,DFlash=runs/dflash/drafter' -> [('default', 'default'), ('DFlash', 'runs/dflash/drafter')]."""
    from dspark_jax.drafters.factory import check_drafter_spec
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        label, sep, spec = item.partition("=")
        if ":" in label:  # "ngram:n_max=4" and "default+ngram:n_max=4" are specs, not LABEL=SPEC
            label, sep, spec = item, "", item
        label, spec = (label.strip(), spec.strip()) if sep else (item, item)
        if not label or not spec:
            raise ValueError(f"--drafters: bad item {item!r}; expected SPEC or LABEL=SPEC")
        kind = spec.partition(":")[0]
        check_drafter_spec(spec)
        if kind == "random" and spec.partition(":")[2] not in ("", "dspark", "dflash", "eagle3"):
            raise ValueError(f"--drafters: unknown random drafter {spec!r}; use random:dspark, random:dflash or "
                             f"random:eagle3")
        out.append((label, spec))
    if not out:
        raise ValueError("--drafters is empty")
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--drafters: labels must be distinct, got {labels}")
    return out


def load_drafters(target, specs: list[tuple[str, str]], gamma: int | None, draft_vocab_size: int | None, seed: int):
    from dspark_jax.drafters.factory import load_drafter, with_block_size
    out = []
    for label, spec in specs:
        kind, _, algorithm = spec.partition(":") if spec.startswith("random") else (spec, "", "")
        drafter = load_drafter(kind, target, algorithm=algorithm or "dspark", gamma=gamma or 7,
                               draft_vocab_size=draft_vocab_size, seed=seed)
        if gamma:
            drafter = with_block_size(drafter, gamma)
        print(f"drafter {label}: {drafter.source} ({drafter.config.algorithm}, gamma={drafter.config.block_size})",
              file=sys.stderr)
        out.append((label, drafter))
    return out


def report_heldout(target, drafters, heldout_dir: str, output: Path) -> dict[str, dict]:
    """Teacher-forced held-out quality of each DSpark / DFlash / Eagle3 drafter
    (`training.heldout.cache_quality`): prints a table, writes `output` (JSON) and returns {label: scores}."""
    from dspark_jax.training.heldout import SCORED_ALGORITHMS, cache_quality
    from dspark_jax.utils.results import write_result
    scores = {}
    print(f"{'drafter':<16}{'greedy τ':>10}{'prob τ':>8}{'vocab mass':>12}  slot accuracy", file=sys.stderr)
    for label, drafter in drafters:
        if drafter.config.algorithm not in SCORED_ALGORITHMS:
            print(f"{label:<16}  (no teacher-forced score for {drafter.config.algorithm} drafters)", file=sys.stderr)
            continue
        q = cache_quality(drafter, target, heldout_dir)
        scores[label] = dict(greedy_tau=q.greedy_tau, probabilistic_tau=q.probabilistic_tau,
                             draft_vocab_mass=q.draft_vocab_mass, slot_accuracy=list(q.slot_accuracy),
                             num_blocks=q.num_blocks, source=drafter.source)
        prob = f"{q.probabilistic_tau:>8.3f}" if q.probabilistic_tau is not None else f"{'–':>8}"
        mass = f"{q.draft_vocab_mass:>12.3f}" if q.draft_vocab_mass is not None else f"{'–':>12}"
        print(f"{label:<16}{q.greedy_tau:>10.3f}{prob}{mass}  " + " ".join(f"{a:.2f}" for a in q.slot_accuracy),
              file=sys.stderr)
    write_result(output, dict(heldout_dir=str(heldout_dir), drafters=scores))
    return scores


def body() -> None:
    from dspark_jax.evaluation.datasets import load_benchmarks

    # bad input fails here, before the (slow) JAX imports
    specs = parse_drafter_specs(FLAGS.drafters)
    names = [s.strip() for s in FLAGS.datasets.split(",") if s.strip()]
    if not names:
        raise ValueError("--datasets is empty")
    benchmarks = load_benchmarks(names, FLAGS.limit, raw=FLAGS.raw_prompts, offset=FLAGS.offset)
    if not 0.0 <= FLAGS.confidence_threshold <= 1.0:
        raise ValueError(f"--confidence_threshold must be in [0, 1], got {FLAGS.confidence_threshold}")
    if FLAGS.heldout_only and not FLAGS.heldout_dir:
        raise ValueError("--heldout_only needs --heldout_dir")

    from dspark_jax.evaluation.report import write_report
    from dspark_jax.evaluation.suite import EvalConfig, evaluate
    from dspark_jax.generation import GenerationConfig
    config = EvalConfig(generation=GenerationConfig(max_new_tokens=FLAGS.max_new_tokens,
                                                    temperature=FLAGS.temperature, seed=FLAGS.seed,
                                                    batch_size=FLAGS.batch_size),
                        confidence_threshold=FLAGS.confidence_threshold)

    from dspark_jax.target import load_target
    from dspark_jax.utils.machine import describe_machine
    print(f"loading target {FLAGS.target} ...", file=sys.stderr)
    target = load_target(FLAGS.target)
    drafters = load_drafters(target, specs, FLAGS.gamma, FLAGS.draft_vocab_size or None, FLAGS.seed)
    if FLAGS.heldout_dir:
        report_heldout(target, drafters, FLAGS.heldout_dir, Path(FLAGS.output_dir) / "heldout.json")
        if FLAGS.heldout_only:
            return
    result = evaluate(target, benchmarks, drafters, config, log=lambda m: print(m, file=sys.stderr, flush=True))
    paths = write_report(result, FLAGS.output_dir, machine=describe_machine(), target=target.config.name,
                         command="dspark eval " + " ".join(sys.argv[2:]))
    md = Path(paths["markdown"]).read_text(encoding="utf-8")
    print(md.split("\n\n**Speed**")[0])  # the τ table; the rest is in the markdown file
    print(f"\nwrote {paths['markdown']}, {paths['json']}, {paths['records']} and "
          f"{sum(1 for k in paths if k not in ('markdown', 'json', 'records'))} plots", file=sys.stderr)


def run(argv: list[str]) -> None:
    _define_flags()
    run_command("eval", __name__, __doc__, body, argv)
