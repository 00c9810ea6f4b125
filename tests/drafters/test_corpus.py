"""Corpus lookup (`drafters.corpus`): the table and its lookup against a brute-force search, a hash collision
never drafting another n-gram's text, the lookup drafter's corpus drafts (text matches first, cut at a response's
end, their own acceptance record and prior), greedy identity with plain decoding, and the factory's options."""
from __future__ import annotations

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dspark_jax.drafters.corpus import (SIGNATURE, build_table, corpus_match, corpus_proposal, has_shipped_corpus,
                                        ngram_hash)
from dspark_jax.drafters.ngram import CORPUS_N_MIN, NgramConfig, NgramDrafter


def _responses(seed=0, count=40, vocab=6):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, vocab, int(rng.integers(3, 20)))] for _ in range(count)]


def brute_force(responses, context, n_min, n_max):
    """The longest n-gram suffix of `context` that occurs in a response with a token after it, and the most frequent
    SIGNATURE-token continuations (the end of a response counting as −1) among its occurrences: (n, set of them)."""
    for n in range(n_max, n_min - 1, -1):
        if len(context) < n:
            continue
        suffix = context[-n:]
        follows = Counter()
        for r in responses:
            padded = list(r) + [-1] * SIGNATURE
            for i in range(n - 1, len(r) - 1):
                if list(r[i - n + 1:i + 1]) == suffix:
                    follows[tuple(padded[i + 1:i + 1 + SIGNATURE])] += 1
        if follows:
            best = max(follows.values())
            return n, {c for c, k in follows.items() if k == best}
    return 0, set()


def test_corpus_match_equals_a_brute_force_search():
    responses = _responses()
    table = build_table(responses, 2, 4, max_draft=8)
    corpus = np.asarray(table.tokens)
    rng = np.random.default_rng(1)
    contexts = [[int(t) for t in rng.integers(1, 7, int(rng.integers(1, 9)))] for _ in range(200)]
    width = 10
    tokens = jnp.asarray([c + [0] * (width - len(c)) for c in contexts], jnp.int32)
    last = jnp.asarray([len(c) - 1 for c in contexts], jnp.int32)
    end, n = corpus_match(table, tokens, last, 2)
    drafted, length = corpus_proposal(table, end, 6)
    seen = Counter()
    for i, c in enumerate(contexts):
        want_n, continuations = brute_force(responses, c, 2, 4)
        assert int(n[i]) == want_n, c
        if not want_n:
            assert int(end[i]) == -1 and int(length[i]) == 0
            continue
        e = int(end[i])
        assert list(corpus[e - want_n + 1:e + 1]) == c[-want_n:]  # an occurrence of the suffix
        follow = list(corpus[e + 1:e + 1 + 6])
        cut = follow.index(-1) if -1 in follow else 6  # the draft stops where its response ends
        assert int(length[i]) == cut and list(np.asarray(drafted[i, :cut])) == follow[:cut]
        signature = [int(t) for t in corpus[e + 1:e + 1 + SIGNATURE]]
        signature = [t if -1 not in signature[:k + 1] else -1 for k, t in enumerate(signature)]
        assert tuple(signature) in continuations  # a most frequent continuation
        seen[(want_n, cut < 6)] += 1
    assert {k for k, _ in seen} == {2, 3, 4} and {cut for _, cut in seen} == {False, True}  # every case exercised


def test_a_hash_collision_never_drafts_another_ngrams_text():
    """Lookups check the n-gram's tokens, not only its hash: a table entry whose tokens differ from the request's
    (what a 32-bit collision looks like) is no match, and the shorter n-gram is used instead."""
    table = build_table([[1, 2, 3, 4, 5], [9, 3, 4, 7]], 2, 3, max_draft=4)
    tokens, last = jnp.asarray([[2, 3, 4]], jnp.int32), jnp.asarray([2], jnp.int32)
    end, n = corpus_match(table, tokens, last, 2)
    assert int(n[0]) == 3 and int(table.tokens[int(end[0]) + 1]) == 5
    h3 = ngram_hash(np.asarray([[2, 3, 4]]), 3)[0]
    entry = int(np.flatnonzero(np.asarray(table.hashes) == h3)[0])
    forged = table.keys.at[entry].set(jnp.asarray([8, 8, 8], jnp.int32))  # same hash, other tokens
    end, n = corpus_match(type(table)(**{**vars(table), "keys": forged}), tokens, last, 2)
    assert int(n[0]) == 2  # "3 4": followed by 5 once and by 7 once -> the first occurrence
    assert int(table.tokens[int(end[0]) + 1]) in (5, 7)
    assert ngram_hash(jnp.asarray([[2, 3, 4]], jnp.int32), 3)[0] == h3  # one hash in numpy and JAX


def test_build_table_rejects_bad_input():
    with pytest.raises(ValueError, match="n_min"):
        build_table([[1, 2, 3]], 3, 2)
    with pytest.raises(ValueError, match="non-empty response"):
        build_table([[], []])


def _drafter(gamma=4, responses=((1, 2, 3, 4, 5, 6), (7, 8, 9))):
    table = build_table([list(r) for r in responses], 2, 3, max_draft=16)
    return NgramDrafter(NgramConfig(block_size=gamma, n_max=2, n_min=1, corpus=True, calibrated=False), 50, table)


def test_lookup_drafts_from_the_corpus_where_the_text_has_no_match():
    from dspark_jax.drafters.ngram import corpus_request_prior
    from dspark_jax.sampling import SamplingParams
    drafter = _drafter()
    # row 0: "1 2 3" is in the corpus, the text has no match -> 4 5 6 (its response ends: 3 drafts);
    # row 1: the text repeats "8" -> the text's draft (periodic), not the corpus's "8 9";
    # row 2: "7 8" -> 9, then the response ends: 1 draft; row 3: nothing anywhere
    prompts = jnp.asarray([[1, 2, 3, 0], [8, 8, 0, 0], [11, 7, 8, 0], [20, 21, 22, 0]], jnp.int32)
    lens = jnp.asarray([3, 2, 3, 3], jnp.int32)
    state = drafter.prefill(None, drafter.init_state(4, 16), None, prompts, lens)
    assert state.tested.shape == (4, 2 + 3, 4)  # text rows n = 1, 2; corpus rows n = 1..3
    anchor, start = jnp.asarray([3, 8, 8, 22]), lens - 1
    prop = drafter.propose(None, state, anchor, start, None, SamplingParams.create(4), None, None)
    assert np.asarray(prop.length).tolist() == [3, 4, 1, 0]
    assert np.asarray(prop.tokens[0, :3]).tolist() == [4, 5, 6] and np.asarray(prop.tokens[1]).tolist() == [8] * 4
    assert int(prop.tokens[2, 0]) == 9
    conf = np.asarray(prop.confidence)
    prior = np.asarray(corpus_request_prior(3, 4, jnp.zeros((1,))))[0]
    np.testing.assert_allclose(conf[0, :3], prior[2, :3], rtol=1e-6)  # a 3-token corpus match: its prior row
    np.testing.assert_allclose(conf[2, :1], prior[1, :1], rtol=1e-6)  # a 2-token one
    assert conf[0, 3] == 0 and (conf[2, 1:] == 0).all() and (conf[3] == 0).all()  # nothing past a draft
    assert conf[1, 0] > 0


def test_a_long_corpus_match_wins_over_a_short_text_match():
    """`takes_corpus`: the corpus drafts over a 1- or 2-token text match when its own match has >= 4 tokens, never
    over a 3-token text match; the drafter and the offline replay follow the same rule."""
    from dspark_jax.drafters.corpus import CORPUS_WINS_AT, TEXT_YIELDS_AT, takes_corpus
    from dspark_jax.sampling import SamplingParams
    assert (TEXT_YIELDS_AT, CORPUS_WINS_AT) == (2, 4)
    text_n = np.asarray([0, 0, 1, 2, 2, 3, 3, 1])
    corpus_n = np.asarray([0, 2, 4, 4, 3, 4, 5, 0])
    assert takes_corpus(text_n, corpus_n).tolist() == [False, True, True, True, False, False, False, False]
    assert np.asarray(takes_corpus(jnp.asarray(text_n), jnp.asarray(corpus_n))).tolist() == \
        takes_corpus(text_n, corpus_n).tolist()
    table = build_table([[1, 2, 3, 4, 5, 6, 7], [9, 9]], 2, 4, max_draft=16)
    drafter = NgramDrafter(NgramConfig(block_size=3, n_max=3, n_min=1, corpus=True, calibrated=False), 50, table)
    # row 0: the text "4 1 2 3 4": a 1-token text match ("4") and a 4-token corpus match -> the corpus's 5 6 7;
    # row 1: the text "2 3 4 2 3 4": a 3-token text match -> the text's periodic 2 3 4
    prompts = jnp.asarray([[4, 1, 2, 3, 4, 0], [2, 3, 4, 2, 3, 4]], jnp.int32)
    lens = jnp.asarray([5, 6], jnp.int32)
    state = drafter.prefill(None, drafter.init_state(2, 16), None, prompts, lens)
    drafted = drafter.draft(state.tokens, lens - 1)
    assert np.asarray(drafted.tokens).tolist() == [[5, 6, 7], [2, 3, 4]]
    assert np.asarray(drafted.n).tolist() == [0, 3] and np.asarray(drafted.row).tolist() == [3 + 4 - 1, 2]
    prop = drafter.propose(None, state, prompts[jnp.arange(2), lens - 1], lens - 1, None, SamplingParams.create(2),
                           None, None)
    assert np.asarray(prop.tokens).tolist() == [[5, 6, 7], [2, 3, 4]]
    from dspark_jax.evaluation.lookup_simulation import corpus_lookup_rounds
    # the replay: after the prefill's 4 the text matches "4" (drafting 1 2 3), the corpus "1 2 3 4" (5 6 7)
    rounds = list(corpus_lookup_rounds([4, 1, 2, 3], [4, 5, 6, 7], table, corpus_n_min=2, gamma=3))
    assert rounds == [("corpus", 4, 3, 3, 3)]


def test_commit_counts_corpus_drafts_in_their_own_rows():
    from dspark_jax.drafters.base import RoundOutcome
    drafter = _drafter()
    state = drafter.prefill(None, drafter.init_state(1, 16), None, jnp.asarray([[1, 2, 3, 0]], jnp.int32),
                            jnp.asarray([3], jnp.int32))
    start = jnp.asarray([2])
    # the corpus proposed 4 5 6 (3 drafts) after "1 2 3" (row 2 + 3); 4 and 5 accepted, then 9: positions 0..2
    # tested, 0..1 accepted
    new = drafter.commit(None, state, None, jnp.asarray([[3, 4, 5, 6, 0]]), start, jnp.asarray([3]),
                         RoundOutcome(jnp.asarray([3]), jnp.asarray([[4, 5, 9, 0, 0]], jnp.int32)))
    assert np.asarray(new.tested[0]).tolist() == [[0] * 4, [0] * 4, [0] * 4, [0] * 4, [1, 1, 1, 0]]
    assert np.asarray(new.accepted[0]).tolist() == [[0] * 4, [0] * 4, [0] * 4, [0] * 4, [1, 1, 0, 0]]
    # all three accepted and the bonus: the fourth position was no draft, so it is not counted
    full = drafter.commit(None, state, None, jnp.asarray([[3, 4, 5, 6, 0]]), start, jnp.asarray([4]),
                          RoundOutcome(jnp.asarray([3]), jnp.asarray([[4, 5, 6, 2, 0]], jnp.int32)))
    assert np.asarray(full.tested[0, 4]).tolist() == [1, 1, 1, 0]
    assert np.asarray(full.accepted[0, 4]).tolist() == [1, 1, 1, 0]
    assert int(full.previous[0]) == -1  # the text calibration's history counts text matches only


def test_greedy_corpus_lookup_equals_greedy_plain():
    """The loop with corpus drafts decodes exactly plain decoding's tokens; with the target's own outputs as the
    corpus its drafts are accepted."""
    from dspark_jax.decoding.autoregressive import generate
    from dspark_jax.sampling import SamplingParams
    from tests.decoding.test_speculative import _batch, make_target
    from tests.drafters.test_ngram import greedy_plain_and_speculative
    tg, ts, cfg = make_target("gemma3")
    prompts = [[30, 31, 32, 33], [40, 41], [50, 51, 52]]
    tokens, lens = _batch(prompts)
    plain = generate(tg, ts, tokens, lens, jax.random.key(0), SamplingParams.create(3), max_new_tokens=16,
                     stop_ids=())
    outputs = [[int(t) for t in row] for row in np.asarray(plain.tokens)]
    table = build_table([p + o for p, o in zip(prompts, outputs)], CORPUS_N_MIN, 3, max_draft=16)
    drafter = NgramDrafter(NgramConfig(block_size=4, n_max=3, n_min=3, corpus=True), cfg.vocab_size, table)
    dg, ds = nnx.split(drafter)
    _, spec = greedy_plain_and_speculative(tg, ts, dg, ds, prompts, 16)
    assert int(np.asarray(spec.accepted).sum()) > 10


def test_corpus_config_and_table_go_together():
    table = build_table([[1, 2, 3]], 2, 2)
    with pytest.raises(ValueError, match="corpus"):
        NgramDrafter(NgramConfig(corpus=True), 50)
    with pytest.raises(ValueError, match="corpus"):
        NgramDrafter(NgramConfig(corpus=False), 50, table)


def test_corpus_specs():
    """`ngram` drafts from the corpus by default where the target has one (the embedded Gemma 3 270M), never
    elsewhere; corpus=1 for a target without one is refused."""
    from dspark_jax.drafters.corpus import shipped_corpus_spec
    from dspark_jax.drafters.factory import load_drafter
    from dspark_jax.testing.tiny_target import make_tiny_target
    tiny = make_tiny_target()
    assert not has_shipped_corpus(tiny.config.fingerprint())
    assert not load_drafter("ngram", tiny).config.corpus and not load_drafter("ngram:corpus=0", tiny).config.corpus
    with pytest.raises(ValueError, match="no response corpus is shipped"):
        load_drafter("ngram:corpus=1", tiny)
    with pytest.raises(ValueError, match="corpus must be 0 or 1"):
        load_drafter("ngram:corpus=yes", tiny)
    assert has_shipped_corpus(shipped_corpus_spec()["target_fingerprint"])


def test_the_shipped_corpus_prior_has_every_corpus_match_length():
    from dspark_jax.drafters.corpus import shipped_corpus_spec
    from dspark_jax.drafters.ngram import corpus_prior_means
    spec = shipped_corpus_spec()
    temperatures, means = corpus_prior_means(spec["n_max"], 15)
    assert 0.0 in temperatures
    for table in means:
        assert len(table) == spec["n_max"] and all(0 < c < 1 for row in table for c in row)


def test_corpus_replay_by_hand():
    """prompt [1, 2, 3], greedy output [4, 7, 8, 9, 5], a corpus of one response [7, 8, 9, 10] (n-grams of 2-3): the
    anchors 4 and 7 match nothing; after 7 8 the corpus drafts 9 10 (its response ends there), 9 is accepted and 5
    corrects 10. Without the corpus every round commits one token."""
    from dspark_jax.evaluation.lookup_simulation import CorpusRound, corpus_lookup_rounds
    table = build_table([[7, 8, 9, 10]], 2, 3, max_draft=8)
    prompt, output = [1, 2, 3], [4, 7, 8, 9, 5]
    assert list(corpus_lookup_rounds(prompt, output, table, corpus_n_min=2, gamma=4)) == [
        CorpusRound("", 0, 0, 0, 1), CorpusRound("", 0, 0, 0, 1), CorpusRound("corpus", 2, 1, 2, 2)]
    assert [r.count for r in corpus_lookup_rounds(prompt, output, table, gamma=4, corpus=False)] == [1, 1, 1, 1]


def test_the_shipped_table_is_cached_on_disk(tmp_path, monkeypatch):
    """The first build is cached under $DSPARK_CACHE_DIR and loaded, equal, by the next process; an unreadable cache
    file is rebuilt and rewritten."""
    import dataclasses
    from dspark_jax.drafters import corpus as corpus_module
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    builds = []
    build = corpus_module.build_table
    monkeypatch.setattr(corpus_module, "build_table", lambda *a, **k: builds.append(1) or build(*a, **k))
    spec = corpus_module.shipped_corpus_spec()
    built = corpus_module.shipped_corpus.__wrapped__(spec["target_fingerprint"], 16)
    path = corpus_module.table_cache_path(spec, 16)
    assert path.is_file() and path.parent == tmp_path / "corpus" and len(builds) == 1
    loaded = corpus_module.shipped_corpus.__wrapped__(spec["target_fingerprint"], 16)
    assert len(builds) == 1
    for field in dataclasses.fields(corpus_module.CorpusTable):
        a, b = np.asarray(getattr(built, field.name)), np.asarray(getattr(loaded, field.name))
        assert a.dtype == b.dtype and np.array_equal(a, b), field.name
    path.write_bytes(b"not an npz file")
    again = corpus_module.shipped_corpus.__wrapped__(spec["target_fingerprint"], 16)
    assert len(builds) == 2 and np.array_equal(np.asarray(again.hashes), np.asarray(built.hashes))
    assert corpus_module._load_cached(path) is not None  # rewritten


def test_commit_reuses_the_proposals_draft():
    """The commit's record from the draft `propose` handed on (`RoundOutcome.lookup_draft`) equals the one from the
    draft computed again (text and corpus drafts, a round with a partial acceptance)."""
    from dspark_jax.drafters.base import RoundOutcome
    from dspark_jax.sampling import SamplingParams
    drafter = _drafter()
    prompts = jnp.asarray([[1, 2, 3, 0], [8, 8, 0, 0], [11, 7, 8, 0]], jnp.int32)
    lens = jnp.asarray([3, 2, 3], jnp.int32)
    state = drafter.prefill(None, drafter.init_state(3, 16), None, prompts, lens)
    anchor, start = jnp.asarray([3, 8, 8]), lens - 1
    prop = drafter.propose(None, state, anchor, start, None, SamplingParams.create(3), None, None)
    assert prop.lookup_draft is not None
    committed = jnp.asarray([[4, 5, 9, 0, 0], [8, 1, 0, 0, 0], [9, 2, 0, 0, 0]], jnp.int32)
    verified = jnp.concatenate([anchor[:, None], prop.tokens], 1)
    count = jnp.asarray([3, 2, 2])
    passed, again = (drafter.commit(None, state, None, verified, start, count,
                                    RoundOutcome(jnp.asarray([4, 4, 1]), committed, lookup_draft=d))
                     for d in (prop.lookup_draft, None))
    for a, b in zip(jax.tree.leaves(passed), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(passed.tested.sum()) > 0 and float(passed.accepted.sum()) > 0
