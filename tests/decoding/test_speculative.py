"""The speculative loop: greedy identity with plain decoding, exact bookkeeping with an oracle drafter,
and losslessness at temperature 1 (chi-square against the exact target distribution)."""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from dspark_jax.testing.tiny_configs import tiny_gemma3, tiny_qwen3
from dspark_jax.decoding import verification
from dspark_jax.decoding.autoregressive import generate
from dspark_jax.decoding.rejection import Verdict
from dspark_jax.sampling import FilterMode, SamplingParams, token_probs
from dspark_jax.decoding.speculative import draft_head, speculative_generate
from dspark_jax.drafters.config import make_drafter_config
from dspark_jax.drafters.dspark import DSparkDrafter
from dspark_jax.drafters.eagle3 import Eagle3Drafter
from dspark_jax.drafters.ngram import NgramConfig, NgramDrafter
from dspark_jax.models.kv_cache import init_cache
from dspark_jax.models.output_head import HeadRows
from dspark_jax.models.transformer import Transformer
from dspark_jax.testing.oracle_drafter import OracleDrafter

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [20, 21]]


def _batch(prompts, width=16):
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    return jnp.asarray(tokens), jnp.asarray([len(p) for p in prompts], jnp.int32)


def make_target(family, **kw):
    cfg = tiny_gemma3(**kw) if family == "gemma3" else tiny_qwen3(**kw)
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(0))) + (cfg,)


def make_drafter(alg, cfg, gamma, reduced, seed=1):
    vocab_ids = np.arange(0, cfg.vocab_size, 2)[:40] if reduced else None
    dc = make_drafter_config(alg, cfg, block_size=gamma, num_layers=2, markov_rank=8,
                             draft_vocab_size=len(vocab_ids) if reduced else None)
    cls = Eagle3Drafter if alg == "eagle3" else DSparkDrafter
    return nnx.split(cls(dc, cfg, rngs=nnx.Rngs(seed), draft_vocab_ids=vocab_ids))


GREEDY_CASES = [(f, a, g, r, t) for (f, a), g, (r, t) in itertools.product(
    [("gemma3", "dspark"), ("qwen3", "dspark"), ("gemma3", "dflash"), ("qwen3", "eagle3")],
    [1, 4, 7], [(False, 0.0), (True, 0.5)])]


@pytest.mark.parametrize("family,alg,gamma,reduced,threshold", GREEDY_CASES)
def test_greedy_speculative_equals_greedy_plain(family, alg, gamma, reduced, threshold):
    tg, ts, cfg = make_target(family)
    dg, ds = make_drafter(alg, cfg, gamma, reduced)
    tokens, lens = _batch(PROMPTS)
    kw = dict(max_new_tokens=17, stop_ids=())
    ar = generate(tg, ts, tokens, lens, jax.random.key(0), SamplingParams.create(3), **kw)
    stop = int(ar.tokens[1, 9])  # make some request stop mid-way
    kw["stop_ids"] = (stop,)
    ar = generate(tg, ts, tokens, lens, jax.random.key(0), SamplingParams.create(3), **kw)
    sp = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(5), SamplingParams.create(3),
                              jnp.float32(threshold), **kw)
    np.testing.assert_array_equal(np.asarray(sp.num_tokens), np.asarray(ar.num_tokens))
    for i in range(3):
        n = int(ar.num_tokens[i])
        np.testing.assert_array_equal(np.asarray(sp.tokens[i, :n]), np.asarray(ar.tokens[i, :n]))
    # bookkeeping: committed tokens over rounds + the prefill token = all tokens
    rounds = np.asarray(sp.rounds)
    for i in range(3):
        assert np.asarray(sp.committed[i, :rounds[i]]).sum() + 1 == int(sp.num_tokens[i])
        assert (np.asarray(sp.accepted[i, :rounds[i]]) <= np.asarray(sp.proposed[i, :rounds[i]])).all()
        conf = np.asarray(sp.confidence[i, :rounds[i]])
        low = (conf < threshold) & (threshold > 0)
        expect = np.where(low.any(1), low.argmax(1), gamma)
        np.testing.assert_array_equal(np.asarray(sp.proposed[i, :rounds[i]]), expect)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_head_gathered_by_the_caller_decodes_the_same(temperature):
    """The drafter's head rows gathered once by the caller (`draft_head`, what `generation.decode_batches`
    passes) give the very same output as gathering them in the call — a reduced draft vocabulary, so the
    gather is a real one; a head of another structure, shape or dtype is refused, naming the expected one."""
    tg, ts, cfg = make_target("gemma3")
    dg, ds = make_drafter("dspark", cfg, 4, reduced=True)
    tokens, lens = _batch(PROMPTS)
    args = (tg, ts, dg, ds, tokens, lens, jax.random.key(3), SamplingParams.create(3, temperature), jnp.float32(0.0))
    kw = dict(max_new_tokens=13, stop_ids=())
    head = draft_head(tg, ts, dg, ds)
    assert isinstance(head, HeadRows) and head.table.shape == (40, cfg.hidden_size) and head.q8_values is None
    inside, passed = speculative_generate(*args, **kw), speculative_generate(*args, head=head, **kw)
    for field in ("tokens", "num_tokens", "rounds", "proposed", "accepted", "confidence"):
        np.testing.assert_array_equal(np.asarray(getattr(passed, field)), np.asarray(getattr(inside, field)))
    if temperature > 0:  # the passed rows are the ones drafted with: other rows, other draft probabilities
        other = speculative_generate(*args, head=HeadRows(jnp.roll(head.table, 1, axis=0)), **kw)
        assert not np.array_equal(np.asarray(other.tokens), np.asarray(inside.tokens))
    expected = rf"head must be this drafter's draft_head output .*\[40, {cfg.hidden_size}\].*got .*\[39, "
    with pytest.raises(ValueError, match=expected):
        speculative_generate(*args, head=HeadRows(head.table[:39]), **kw)
    with pytest.raises(ValueError, match="bfloat16"):
        speculative_generate(*args, head=HeadRows(head.table.astype(jnp.bfloat16)), **kw)
    with pytest.raises(ValueError, match="HeadRows"):  # the bare table: another structure
        speculative_generate(*args, head=head.table, **kw)
    lookup_g, lookup_s = nnx.split(NgramDrafter(NgramConfig(block_size=4), cfg.vocab_size))
    assert draft_head(tg, ts, lookup_g, lookup_s) is None
    with pytest.raises(ValueError, match="output None"):
        speculative_generate(tg, ts, lookup_g, lookup_s, *args[4:], head=head, **kw)


def test_zero_length_proposals_still_decode_exactly():
    """A threshold above every confidence proposes nothing: each round commits just the target's token."""
    tg, ts, cfg = make_target("gemma3")
    dg, ds = make_drafter("dspark", cfg, 4, False)
    tokens, lens = _batch(PROMPTS)
    kw = dict(max_new_tokens=9, stop_ids=())
    ar = generate(tg, ts, tokens, lens, jax.random.key(0), SamplingParams.create(3), **kw)
    sp = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(3),
                              jnp.float32(1.01), **kw)
    np.testing.assert_array_equal(np.asarray(sp.tokens), np.asarray(ar.tokens))
    assert (np.asarray(sp.rounds) == 8).all() and not np.asarray(sp.proposed).any()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_oracle_drafter_is_always_accepted(temperature):
    tg, ts, cfg = make_target("qwen3")
    g = 4
    dg, ds = nnx.split(OracleDrafter(g, cfg.vocab_size))
    tokens, lens = _batch(PROMPTS)
    max_new = 23
    sp = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(1),
                              SamplingParams.create(3, temperature), jnp.float32(0.0), max_new_tokens=max_new,
                              stop_ids=())
    assert (np.asarray(sp.num_tokens) == max_new).all()
    expected_rounds = -(-(max_new - 1) // (g + 1))
    assert (np.asarray(sp.rounds) == expected_rounds).all()
    acc = np.asarray(sp.accepted[:, :expected_rounds - 1])
    assert acc.mean() >= 0.98 * g
    if temperature == 0:
        ar = generate(tg, ts, tokens, lens, jax.random.key(0), SamplingParams.create(3), max_new_tokens=max_new,
                      stop_ids=())
        np.testing.assert_array_equal(np.asarray(sp.tokens), np.asarray(ar.tokens))


def test_max_new_tokens_one_and_stop_as_first_token():
    tg, ts, cfg = make_target("gemma3")
    dg, ds = make_drafter("dspark", cfg, 4, False)
    tokens, lens = _batch(PROMPTS)
    sp = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(3),
                              jnp.float32(0.0), max_new_tokens=1, stop_ids=())
    assert (np.asarray(sp.num_tokens) == 1).all() and (np.asarray(sp.rounds) == 0).all()
    first = int(sp.tokens[0, 0])
    sp2 = speculative_generate(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(3),
                               jnp.float32(0.0), max_new_tokens=8, stop_ids=(first,))
    assert int(sp2.num_tokens[0]) == 1 and int(sp2.rounds[0]) == 0


# ---- losslessness at temperature 1 --------------------------------------------------------------------

V_SMALL, N_NEW, N_SAMPLES = 6, 3, 24000


def exact_joint(tg, ts, prompt, params1, mode):
    """P(first N_NEW tokens) under the (filtered) target, by enumerating every continuation."""
    model = nnx.merge(tg, ts)
    seqs = np.array(list(itertools.product(range(V_SMALL), repeat=N_NEW)), np.int32)
    full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], 1)
    t = full.shape[1]
    out = model(jnp.asarray(full), jnp.broadcast_to(jnp.arange(t), full.shape), init_cache(model.config, len(seqs), t),
                jnp.zeros((len(seqs),), jnp.int32))
    logits = model.logits(out.hidden)  # [S, T, V]
    p = len(prompt)
    rows = jax.tree.map(lambda a: jnp.repeat(a[:1], len(seqs)), params1)
    prob = np.ones(len(seqs))
    for j in range(N_NEW):
        pj = np.asarray(token_probs(logits[:, p - 1 + j], rows, mode), np.float64)
        prob *= pj[np.arange(len(seqs)), seqs[:, j]]
    return seqs, prob


def sampled_joint(tg, ts, dg, ds, prompt, params, mode, batch: int | None = None, **loop_options):
    """N_SAMPLES speculative samples of `prompt`: one batch of N_SAMPLES requests, or (batch given) N_SAMPLES /
    batch independent batches of `batch` requests, vmapped — a loop's rounds serve its own batch, and a static
    batch of thousands of requests would never draft under the completion-time objective. Returns (codes of
    the first N_NEW tokens [N_SAMPLES], the output with every leading axis merged into one)."""
    b = batch or N_SAMPLES
    tokens = jnp.tile(jnp.asarray(prompt, jnp.int32)[None], (b, 1))
    lens = jnp.full((b,), len(prompt), jnp.int32)
    params_b = jax.tree.map(lambda a: jnp.repeat(a[:1], b), params)

    def run(key):
        return speculative_generate(tg, ts, dg, ds, tokens, lens, key, params_b, jnp.float32(0.0),
                                    max_new_tokens=N_NEW, stop_ids=(), mode=mode, **loop_options)
    if batch is None:
        sp = run(jax.random.key(11))
    else:
        sp = jax.vmap(run)(jax.random.split(jax.random.key(11), N_SAMPLES // batch))
        sp = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), sp)
    toks = np.asarray(sp.tokens)
    return (toks * (V_SMALL ** np.arange(N_NEW)[::-1])).sum(1), sp


def chi_square_pvalue(codes, prob):
    counts = np.bincount(codes, minlength=len(prob))
    expected = prob * len(codes)
    if counts[expected == 0].sum():
        return 0.0
    big = expected >= 5  # pool the small cells
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


LOSSLESS_CASES = [("dspark", 0, 1.0, False), ("dspark", 3, 0.8, True), ("eagle3", 0, 1.0, False)]


@pytest.fixture(scope="module")
def small_target():
    return make_target("gemma3", vocab_size=V_SMALL)


@pytest.mark.parametrize("alg,top_k,top_p,reduced", LOSSLESS_CASES)
def test_temperature_one_is_lossless(small_target, alg, top_k, top_p, reduced):
    tg, ts, cfg = small_target
    vocab_ids = np.array([0, 2, 3, 5]) if reduced else None
    dc = make_drafter_config(alg, cfg, block_size=2, num_layers=1, markov_rank=4,
                             draft_vocab_size=4 if reduced else None)
    cls = Eagle3Drafter if alg == "eagle3" else DSparkDrafter
    dg, ds = nnx.split(cls(dc, cfg, rngs=nnx.Rngs(3), draft_vocab_ids=vocab_ids))
    params = SamplingParams.create(1, 1.0, top_k, top_p)
    mode = FilterMode.for_params(top_k, top_p)
    prompt = [1, 3, 2]
    seqs, prob = exact_joint(tg, ts, prompt, params, mode)
    codes, sp = sampled_joint(tg, ts, dg, ds, prompt, params, mode)
    assert 0 < float(np.asarray(sp.accepted[:, 0]).mean()) < 2  # some acceptance, some rejection
    assert chi_square_pvalue(codes, prob) > 1e-3


def test_chi_square_rejects_a_sampler_that_accepts_every_draft(small_target, monkeypatch):
    from dspark_jax.sampling import categorical
    tg, ts, cfg = small_target
    dc = make_drafter_config("dspark", cfg, block_size=2, num_layers=1, markov_rank=4)
    dg, ds = nnx.split(DSparkDrafter(dc, cfg, rngs=nnx.Rngs(3)))

    def accept_everything(key, draft_tokens, p_draft_x, p_draft_full_at, p_target, proposal_len, row_index):
        g = draft_tokens.shape[1]
        acc = jnp.arange(g)[None] < proposal_len[:, None]
        bonus = p_target[jnp.take_along_axis(row_index, proposal_len[:, None], 1)[:, 0]]
        nxt = categorical(key, jnp.log(bonus))  # one key per request
        return Verdict(num_accepted=proposal_len, accepted=acc, next_token=nxt)

    params, mode = SamplingParams.create(1, 1.0), FilterMode()
    prompt = [1, 3, 2]
    seqs, prob = exact_joint(tg, ts, prompt, params, mode)
    jax.clear_caches()
    monkeypatch.setattr(verification, "verify", accept_everything)
    try:
        codes, _ = sampled_joint(tg, ts, dg, ds, prompt, params, mode)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert chi_square_pvalue(codes, prob) < 1e-6


@pytest.mark.parametrize("alg", ["dspark", "eagle3"])
def test_trained_drafter_with_fewer_slots_is_still_exact(alg):
    """with_block_size: a drafter proposing fewer tokens than its trained block decodes identically."""
    from dspark_jax.drafters.config import make_drafter_config
    from dspark_jax.drafters.factory import Drafter, with_block_size
    tg, ts, cfg = make_target("gemma3")
    dg, ds = make_drafter(alg, cfg, 6, False)
    full = Drafter(make_drafter_config(alg, cfg, block_size=6, num_layers=2, markov_rank=8), dg, ds, "test")
    small = with_block_size(full, 2)
    assert small.config.block_size == 2
    with pytest.raises(ValueError, match="gamma must be in"):
        with_block_size(full, 7)
    tokens, lens = _batch(PROMPTS)
    kw = dict(max_new_tokens=12, stop_ids=())
    ar = generate(tg, ts, tokens, lens, jax.random.key(0), SamplingParams.create(3), **kw)
    sp = speculative_generate(tg, ts, small.graphdef, small.state, tokens, lens, jax.random.key(0),
                              SamplingParams.create(3), jnp.float32(0.0), **kw)
    np.testing.assert_array_equal(np.asarray(sp.tokens), np.asarray(ar.tokens))
    assert int(np.asarray(sp.proposed).max()) == 2


def _copies_by_computation(hlo: str, shape: str) -> dict[str, int]:
    """Per HLO computation, how many `copy` instructions produce an array of `shape` (e.g. "f32[8,88,2,8]")."""
    counts, comp = {}, None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            comp = "ENTRY" if line.startswith("ENTRY") else line.split(" ")[0]
        if f"= {shape}{{" in line and " copy(" in line:
            counts[comp] = counts.get(comp, 0) + 1
    return counts


@pytest.mark.parametrize("gate", [False, True])
def test_a_round_never_copies_the_target_kv_cache(gate):
    """XLA copies a buffer that more than one branch of a conditional updates; the rounds (a switch over buckets,
    drafted vs plain rounds) only read the target's cache and it is written after them, so the compiled loop
    copies a cache-shaped buffer only when it is created — not once per round. (A lookup drafter: a DSpark
    drafter's context cache has the same shape here, and it is still written inside the round.)"""
    tg, ts, cfg = make_target("gemma3")
    dg, ds = nnx.split(NgramDrafter(NgramConfig(block_size=3), cfg.vocab_size))
    tokens, lens = _batch([[5, 6, 7, 5, 6], [9, 10], [3, 4, 3], [1]] * 2)
    opts = dict(verify_buckets=(8, 16, 24, 32), verify_costs=(1.0, 1.4, 1.8, 2.2), plain_cost=0.9) if gate else {}
    hlo = speculative_generate.lower(tg, ts, dg, ds, tokens, lens, jax.random.key(0), SamplingParams.create(8),
                                     jnp.float32(0), max_new_tokens=12, stop_ids=(), **opts).compile().as_text()
    cache_shape = f"f32[8,{16 + 12 + 3 + 1},{cfg.num_kv_heads},{cfg.head_dim}]"
    copies = _copies_by_computation(hlo, cache_shape)
    assert set(copies) <= {"ENTRY"}, copies
