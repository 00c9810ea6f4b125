"""Learning curve and recipe sweep of the shipped drafter: held-out quality against training response tokens,
read from finished `dspark train` run directories (each trained with --heldout_dir, so every run is scored on
the same held-out feature cache: the target's own outputs for held-out prompts).

    python benchmarks/learning_curve.py --runs runs/lc_050,runs/lc_100,runs/lc_200,runs/dspark_lookup
                                        [--previous benchmarks/results/learning_curve.json]
                                        [--output benchmarks/results/learning_curve.json]

`--previous` keeps the rows of an earlier output whose runs are not listed (run directories do not outlive the
machine they were trained on; their rows do), so the curve grows across sessions.

Per run: algorithm, draft layers, tapped layers, draft vocabulary, block size (γ), epochs, steps, training sequences and
response (loss) tokens (`TargetCache.first`), and the last held-out evaluation: greedy τ (exact T = 0 accept
length of a full round, bonus included), probabilistic τ and per-slot teacher-forced accuracy
(`training.heldout`). Prints a table, writes JSON and a plot (held-out τ against response tokens, log x)
beside the JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def last_heldout(run: Path) -> dict:
    """The run's last held-out evaluation (metrics.jsonl lines with heldout/ keys). Raises ValueError if none."""
    last = None
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if any(k.startswith("heldout/") for k in record):
            last = record
    if last is None:
        raise ValueError(f"{run}: no held-out evaluation in metrics.jsonl (train with --heldout_dir)")
    return {k.removeprefix("heldout/"): v for k, v in last.items() if k.startswith("heldout/") or k == "micro_step"}


def describe_run(run: Path) -> dict:
    """One row of the curve: the run's recipe, its training data and its final held-out quality."""
    from dspark_jax.training.target_cache import TargetCache
    meta = json.loads((run / "run.json").read_text())
    tc, dc = meta["train_config"], meta["drafter_config"]
    if "data" in meta:  # what the run trained on, recorded by the trainer
        n, tokens = meta["data"]["sequences"], meta["data"]["response_tokens"]
    else:  # an older run: its cache's first sequences, if the cache has not grown since
        cache = TargetCache.open(meta["cache"])
        n = min(tc.get("max_sequences") or len(cache), len(cache))
        if n // tc["batch_size"] != meta["steps_per_epoch"]:
            raise ValueError(f"{run}: its cache {meta['cache']} changed since the run ({n} sequences do not give "
                             f"{meta['steps_per_epoch']} steps per epoch); add \"data\": {{\"sequences\": N, "
                             f"\"response_tokens\": T}} to its run.json")
        tokens = cache.first(n).num_loss_tokens
    quality = last_heldout(run)
    return dict(run=str(run), algorithm=tc["algorithm"], num_layers=tc["num_layers"], block_size=tc["gamma"],
                tapped_layers=list(dc["target_layer_ids"]), draft_vocab_size=tc["draft_vocab_size"],
                lookup_inputs=tc.get("lookup_inputs", 0), epochs=tc["epochs"], steps=meta["total_steps"],
                sequences=n, response_tokens=int(tokens), heldout=quality)


def merge_rows(previous: list[dict], rows: list[dict]) -> list[dict]:
    """previous rows whose run is not among `rows`, then `rows` (a listed run replaces its earlier row)."""
    listed = {r["run"] for r in rows}
    return [r for r in previous if r["run"] not in listed] + rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="comma list of `dspark train` work directories")
    ap.add_argument("--previous", default=None,
                    help="an earlier output JSON whose rows are kept for runs not listed in --runs")
    ap.add_argument("--output", default="benchmarks/results/learning_curve.json")
    args = ap.parse_args()
    from dspark_jax.utils.files import pyplot, save_figure
    from dspark_jax.utils.results import write_result

    rows = [describe_run(Path(r)) for r in args.runs.split(",")]
    if args.previous:
        rows = merge_rows(json.loads(Path(args.previous).read_text())["rows"], rows)
    header = (f"{'run':<22}{'layers':>7}{'taps':>6}{'vocab':>7}{'block':>6}{'epochs':>7}{'steps':>6}{'seqs':>6}{'resp tok':>10}"
              f"{'greedy τ':>10}{'prob τ':>8}{'acc@0':>7}{'acc@6':>7}")
    print(header)
    for r in rows:
        h = r["heldout"]
        print(f"{Path(r['run']).name:<22}{r['num_layers']:>7}{len(r['tapped_layers']):>6}{r['draft_vocab_size']:>7}"
              f"{r.get('block_size', 7):>6}"
              f"{r['epochs']:>7}{r['steps']:>6}{r['sequences']:>6}{r['response_tokens']:>10,}"
              f"{h['greedy_tau']:>10.3f}{h['probabilistic_tau']:>8.3f}{h['slot_accuracy@0']:>7.3f}"
              f"{h.get('slot_accuracy@6', float('nan')):>7.3f}")
    write_result(args.output, dict(rows=rows))

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["algorithm"], r["num_layers"], len(r["tapped_layers"]), r["draft_vocab_size"],
                           r.get("block_size", 7)), []).append(r)  # rows before session 29 were all γ 7
    for i, ((algo, layers, taps, vocab, block), rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: r["response_tokens"])
        x = [r["response_tokens"] for r in rs]
        for key, style in (("greedy_tau", "o-"), ("probabilistic_tau", "s--")):  # one colour per recipe
            ax.plot(x, [r["heldout"][key] for r in rs], style, color=plt.cm.tab10(i % 10),
                    label=f"{algo} {layers}L {taps} taps {vocab // 1024}k γ {block}: {key.replace('_tau', ' τ')}")
    ax.set_xscale("log")
    ticks = [t for t in (1e4, 3e4, 1e5, 3e5, 1e6, 3e6, 1e7)
             if min(r["response_tokens"] for r in rows) / 2 <= t <= 2 * max(r["response_tokens"] for r in rows)]
    ax.set_xticks(ticks, [f"{t / 1e6:g}M" if t >= 1e6 else f"{t / 1e3:g}k" for t in ticks])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("training response tokens")
    ax.set_ylabel("held-out τ (teacher-forced, full-γ round)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    print(f"wrote {save_figure(fig, Path(args.output).with_suffix('.png'), tight=True)}")


if __name__ == "__main__":
    main()
