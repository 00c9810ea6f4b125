"""What accept length at T = 1 a drafter that always proposes the target's most likely tokens would reach.

Issue 13 asks for τ ≥ 2.2 at T = 1. A deterministic draft token d is accepted at T = 1 with probability p(d)
(rejection sampling, spec §2.7), so a drafter that knows the target's greedy continuation exactly — a perfect
T = 0 drafter — drafts g_k = argmax p(· | x_≤a, g_<k) and reaches

    τ_greedy-oracle(a) = 1 + Σ_{k=1..γ} Π_{i≤k} p(g_i | x_≤a, g_<i)

at an anchor a (the last committed token) of a T = 1 sample. This script computes it with the target itself
(one prefill per sample, then γ − 1 batched greedy steps from every anchor), on a held-out cache of the target's
own T = 1 samples (`dspark prepare-data --heldout N --temperature 1 --top_k 0 --top_p 1.0`, the cache `dspark eval
--heldout_only` and the trainer score), and prints it next to the drafters' teacher-forced probabilistic τ on the
same cache. A stochastic drafter can exceed the oracle only by matching the *shape* of the target's T = 1
distribution, not its mode: q = p reaches γ + 1. (The greedy chain is not always the best deterministic chain:
a less likely first token can lead to a surer continuation.)

    python benchmarks/t1_ceiling.py --heldout_dir runs/heldout5_t1 --drafters "shipped=default" \
        --output benchmarks/results/t1_ceiling.json

Slots past the end of a sample's response count 0 (as `training.heldout` scores them). Prints a table per
held-out set and γ; writes JSON.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from dspark_jax.cli.prepare_data import HELDOUT_SETS
from dspark_jax.decoding.autoregressive import prefill
from dspark_jax.generation import bucket_length
from dspark_jax.target import load_target
from dspark_jax.training.target_cache import TargetCache

FLAGS = flags.FLAGS
flags.DEFINE_string("heldout_dir", "runs/heldout5_t1", "A held-out cache of T = 1 samples (`prepare-data --heldout`).")
flags.DEFINE_string("drafters", "", "NAME=DRAFTER,... scored teacher-forced on the same cache (`dspark eval`).")
flags.DEFINE_integer("gamma", 15, "Draft length γ.")
flags.DEFINE_integer("anchors_per_step", 48, "Anchors run together in one batched greedy step.")
flags.DEFINE_string("output", "", "JSON output path.")


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _first_slot(graphdef, state, tokens, length):
    """Logits at every position of one sample [1, T] → (greedy token [T], its T = 1 probability [T], cache)."""
    model = nnx.merge(graphdef, state)
    _, out = prefill(model, tokens, length, tokens.shape[1] + 1)
    logits = model.logits(out.hidden[0]).astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    prob = jnp.exp(jnp.take_along_axis(logits, greedy[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1))
    return greedy.astype(jnp.int32), prob, out.cache


@functools.partial(jax.jit, static_argnames=("graphdef", "steps_left"))
def _greedy_chain(graphdef, state, cache, first, anchors, steps_left):
    """From anchors [A] (their greedy slot-1 token `first` [A]): slots 2..γ of the greedy chain → T = 1
    probabilities [A, γ − 1]. The one-sample cache is broadcast to A rows; rows past an anchor hold the sample's
    own K/V, masked by causality and overwritten by the chain's."""
    model = nnx.merge(graphdef, state)
    a = anchors.shape[0]
    rows = jax.tree.map(lambda x: jnp.broadcast_to(x, (a,) + x.shape[1:]), cache)

    def step(carry, k):
        tok, kv = carry
        pos = anchors + k  # the position of slot k's token (k = 1 is the greedy slot-1 token)
        o = model(tok[:, None], pos[:, None], kv, pos)
        logits = model.logits(o.hidden[:, 0]).astype(jnp.float32)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        p = jnp.exp(jnp.take_along_axis(logits, nxt[:, None], axis=-1)[:, 0] - jax.nn.logsumexp(logits, axis=-1))
        return (nxt, o.cache), p

    _, probs = jax.lax.scan(step, (first, rows), jnp.arange(1, steps_left + 1))
    return probs.T


def oracle_slot_probs(target, tokens: np.ndarray, loss_mask: np.ndarray, gamma: int, chunk: int):
    """[A, γ] T = 1 probabilities of the greedy chain from every anchor a with a response token at a + 1 (0 past
    the response's end), and the anchors [A]."""
    n = len(tokens)
    width = bucket_length(n + gamma + 1, 64)
    padded = np.zeros((1, width), np.int32)
    padded[0, :n] = tokens
    greedy, prob, cache = _first_slot(target.graphdef, target.state, jnp.asarray(padded), jnp.asarray([n], jnp.int32))
    greedy, prob = np.asarray(greedy), np.asarray(prob)
    anchors = np.flatnonzero(loss_mask[1:]).astype(np.int32)  # a + 1 is a response token
    out = np.zeros((len(anchors), gamma), np.float32)
    for s in range(0, len(anchors), chunk):
        a = anchors[s:s + chunk]
        pad = np.full(chunk, a[-1], np.int32)
        pad[:len(a)] = a
        later = np.asarray(_greedy_chain(target.graphdef, target.state, cache, jnp.asarray(greedy[pad]),
                                         jnp.asarray(pad), steps_left=gamma - 1))[:len(a)]
        out[s:s + len(a), 0] = prob[a]
        out[s:s + len(a), 1:] = later
    inside = np.arange(1, gamma + 1)[None] + anchors[:, None] < n
    resp = np.zeros_like(inside)
    resp[inside] = loss_mask[(anchors[:, None] + np.arange(1, gamma + 1)[None])[inside]] > 0
    return np.where(resp, out, 0.0), anchors


def summarize(probs: np.ndarray, gamma: int) -> dict:
    """τ at γ' = 1..gamma (1 + Σ_{k≤γ'} Π_{i≤k} p_i) and the mean slot-1 probability, over blocks [A, γ]."""
    surv = np.cumprod(probs, axis=1)
    return {"blocks": int(len(probs)), "slot1_prob": float(probs[:, 0].mean()),
            "tau_by_gamma": [float(1.0 + surv[:, :g].sum(1).mean()) for g in range(1, gamma + 1)]}


def main(argv):
    del argv
    target = load_target(None)
    cache = TargetCache.open(Path(FLAGS.heldout_dir) / "cache", target_config=target.config)
    prompt_index = {tuple(r["prompt_ids"] + r["response_ids"]): r["index"]
                    for r in map(json.loads, (Path(FLAGS.heldout_dir) / "responses.jsonl").open())}
    per_set = len(prompt_index) // len(HELDOUT_SETS)  # `prepare-data --heldout N`: N prompts of each set, in order
    by_set: dict[str, list[np.ndarray]] = {s: [] for s in HELDOUT_SETS}
    t0 = time.perf_counter()
    for i in range(len(cache)):
        sample = cache.sample(i)
        probs, _ = oracle_slot_probs(target, sample["tokens"], sample["loss_mask"], FLAGS.gamma, FLAGS.anchors_per_step)
        index = prompt_index.get(tuple(sample["tokens"].tolist()))
        if index is None:
            raise ValueError(f"{FLAGS.heldout_dir}: cache sample {i} is none of responses.jsonl's prompt + response")
        by_set[HELDOUT_SETS[index // per_set]].append(probs)
        print(f"sample {i + 1}/{len(cache)}: {len(probs)} anchors, {time.perf_counter() - t0:.0f} s", flush=True)
    result = {"heldout_dir": FLAGS.heldout_dir, "gamma": FLAGS.gamma, "greedy_oracle": {}}
    for name, parts in by_set.items():
        result["greedy_oracle"][name] = summarize(np.concatenate(parts), FLAGS.gamma)
    result["greedy_oracle"]["all"] = summarize(np.concatenate([p for v in by_set.values() for p in v]), FLAGS.gamma)
    result["greedy_oracle"]["macro_tau"] = float(np.mean(
        [result["greedy_oracle"][s]["tau_by_gamma"][-1] for s in HELDOUT_SETS]))
    if FLAGS.drafters:
        from dspark_jax.cli.eval import load_drafters
        from dspark_jax.training.heldout import cache_quality
        result["drafters"] = {}
        for label, drafter in load_drafters(target, [tuple(s.split("=", 1)) for s in FLAGS.drafters.split(",")],
                                            FLAGS.gamma, None, 0):
            q = cache_quality(drafter, target, FLAGS.heldout_dir)
            result["drafters"][label] = {"probabilistic_tau": q.probabilistic_tau, "greedy_tau": q.greedy_tau,
                                         "blocks": q.num_blocks}
    g = result["greedy_oracle"]
    print(f"\nT = 1 samples in {FLAGS.heldout_dir}, γ {FLAGS.gamma}: greedy oracle (a perfect T = 0 drafter)")
    print("| set | blocks | slot-1 p(argmax) | τ at γ 1 / 3 / 7 / 15 |")
    print("|---|---|---|---|")
    for name in list(HELDOUT_SETS) + ["all"]:
        t = g[name]["tau_by_gamma"]
        pick = " / ".join(f"{t[k - 1]:.3f}" for k in (1, 3, 7, 15) if k <= len(t))
        print(f"| {name} | {g[name]['blocks']} | {g[name]['slot1_prob']:.3f} | {pick} |")
    print(f"macro τ at γ {FLAGS.gamma}: {g['macro_tau']:.3f}")
    for label, q in result.get("drafters", {}).items():
        print(f"{label}: teacher-forced probabilistic τ {q['probabilistic_tau']:.3f} ({q['blocks']} blocks)")
    if FLAGS.output:
        Path(FLAGS.output).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
