"""Prompt-lookup (n-gram) drafting on device: propose what followed the most recent earlier occurrence of the
request's last n tokens (prompt + generated text), n from n_max down to n_min. No model, no training.

The lookup is one vectorised comparison per n over each request's token buffer ([B, L] → [B, L]), the most
recent match a max over positions, and the proposal a static-shape gather. When the match ends p tokens
before the anchor (p < γ), the proposal continues with period p — the continuation the repetition that
matched implies (a loop "abcabc…" proposes γ tokens, not p). Proposals are deterministic: p_d is one-hot,
so verification accepts x with probability p_t(x) and resamples from p_t without x — exact at every
temperature, top-k and top-p (the `Proposal.p_draft is None` case of `verify_round`). No match → a
zero-length proposal. Same idea as vLLM's `ngram` method, llama.cpp's lookup decoding and HF transformers'
`prompt_lookup_num_tokens`.

With `NgramConfig.corpus` a request whose text has no match, or only a 1- or 2-token one, drafts from the target's
own shipped responses instead where they hold a long enough match (`drafters.corpus`: the longest of its last
n_max..2 tokens found there, up to γ tokens that followed; `takes_corpus`), with its own acceptance record and prior
(`corpus_prior.json`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.drafters.base import Proposal, RoundOutcome, nearest_set
from dspark_jax.drafters.corpus import CorpusTable, corpus_match, corpus_proposal, takes_corpus
from dspark_jax.models.kv_cache import write_contiguous


CORPUS_N_MIN = 2  # the shortest corpus match drafted: one token of context drafts poorly from other responses
MAX_BLOCK_SIZE = 64  # the longest lookup draft (γ): verification width and `--draft_length auto`'s profile grow with γ


@dataclasses.dataclass(frozen=True)
class NgramConfig:
    """block_size (γ, 1..`MAX_BLOCK_SIZE`): tokens proposed per round; n_max ≥ n_min ≥ 1: the n-gram lengths
    tried, longest first. `target_layer_ids` is empty: lookup needs no target features."""
    block_size: int = 7
    n_max: int = 3
    n_min: int = 1
    algorithm: str = "ngram"
    target_layer_ids: tuple[int, ...] = ()
    confidence_head: bool = True  # confidences from online acceptance counts (calibration is reported for them)
    prior_strength: float = 4.0  # pseudo-observations of the prior (`ngram_prior.json`) per match length and slot
    corpus: bool = False  # where the text has no match, draft from the target's response corpus
    # (`drafters.corpus`; the drafter is built with its table)
    calibrated: bool = True  # the count estimate through its fitted calibration (`ngram_calibration.json`) where one
    # was fitted (T = 0): with the match's source it is better calibrated at equal τ and speed (BENCHMARKS.md
    # "Session 39"); False: the count estimate alone

    def __post_init__(self):
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size (gamma) must be in [1, {MAX_BLOCK_SIZE}], got {self.block_size}: a round "
                             f"verifies gamma + 1 rows per request and --draft_length auto profiles every width up "
                             f"to gamma + 1")
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"n-gram lengths need 1 <= n_min <= n_max, got n_min={self.n_min}, n_max={self.n_max}")
        if not self.prior_strength > 0:
            raise ValueError(f"prior_strength must be > 0, got {self.prior_strength}")
        if self.algorithm != "ngram" or self.target_layer_ids:
            raise ValueError("an n-gram config has algorithm 'ngram' and taps no target layers")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NgramState:
    """tokens [B, L]: each request's committed tokens by position (prompt, then generated; entries at or
    past the anchor position are stale and never read). tested / accepted [B, n_max, G]: per request, how
    often draft position k of a proposal from an n-token match was verified with every earlier position
    accepted, and how often it was then accepted (the online acceptance statistics behind the confidence).
    previous [B]: drafts of the lookup's proposal known accepted in the request's last verification round that
    had a match (−1 before any); streak [B]: how many such rounds in a row accepted at least one (both read by
    the confidence's calibration, `calibrated_confidence`); prompt_len [B]: each request's prompt length (whether a
    match lies in the prompt or the generated text, also read by the calibration)."""
    tokens: jax.Array
    tested: jax.Array
    accepted: jax.Array
    previous: jax.Array
    streak: jax.Array
    prompt_len: jax.Array


def find_match(tokens: jax.Array, last: jax.Array, n_max: int, n_min: int) -> tuple[jax.Array, jax.Array]:
    """The most recent earlier occurrence of the longest suffix that occurs before.

    tokens [B, L]; last [B]: position of each request's newest token (its suffix ends there). Returns
    (end [B]: position j < last where the matched n-gram ends, -1 if none; n [B]: its length, 0 if none):
    tokens[j-n+1 .. j] == tokens[last-n+1 .. last] for the largest n in [n_min, n_max] that occurs, and the
    largest such j for that n."""
    b, length = tokens.shape
    pos = jnp.arange(length, dtype=jnp.int32)[None]
    rows = jnp.arange(b)
    matched = jnp.ones((b, length), bool)
    end = jnp.full((b,), -1, jnp.int32)
    n_found = jnp.zeros((b,), jnp.int32)
    for i in range(n_max):  # extend every window one token further back: matched = windows of length i + 1
        back = last - i
        suffix_token = tokens[rows, jnp.maximum(back, 0)]
        shifted = jnp.roll(tokens, i, axis=1)  # shifted[:, j] = tokens[:, j - i]
        matched = matched & (shifted == suffix_token[:, None]) & (pos >= i) & (back >= 0)[:, None]
        if i + 1 >= n_min:
            j = jnp.max(jnp.where(matched & (pos < last[:, None]), pos, -1), axis=1)
            end = jnp.where(j >= 0, j, end)  # a longer match overrides a shorter one
            n_found = jnp.where(j >= 0, i + 1, n_found)
    return end, n_found


def lookup_proposal(tokens: jax.Array, last: jax.Array, end: jax.Array, gamma: int) -> jax.Array:
    """[B, γ] tokens after a match ending at `end` (< last): tokens[end+1 .. last], continued with period
    last − end. Rows without a match (end < 0) get tokens[0 .. γ−1] (their proposal length is 0)."""
    period = jnp.maximum(last - end, 1)
    k = jnp.arange(gamma, dtype=jnp.int32)[None]
    idx = jnp.clip(end[:, None] + 1 + k % period[:, None], 0, tokens.shape[1] - 1)
    return jnp.take_along_axis(tokens, idx, axis=1)


PRIOR_FILE = Path(__file__).with_name("ngram_prior.json")
CORPUS_PRIOR_FILE = Path(__file__).with_name("corpus_prior.json")
CALIBRATION_FILE = Path(__file__).with_name("ngram_calibration.json")
# the calibration's features (`calibration_features`), the match's source last
SOURCE_FEATURES = ("match_in_output", "log1p_period", "short_period", "past_period", "log1p_past_period")
CALIBRATION_FEATURES = ("bias", "count_logit", "match_1", "match_2", "log1p_position", "no_previous",
                        "previous_rejected", "log1p_previous_accepted", "log1p_streak") + SOURCE_FEATURES
SHORT_PERIOD = 15  # the `short_period` feature: a loop of at most this many tokens (the block the fit used, γ 15)


def _means_per_temperature(path: Path, rows_of, gamma: int):
    """(temperatures [S], means [S][rows][γ]) of a prior file's sets, ascending by the sampling temperature their
    responses were drawn at: rows_of(a set's "tables") → its rows of per-slot means; slots past a row's columns take
    its last one."""
    sets = sorted(json.loads(path.read_text())["sets"], key=lambda e: e["temperature"])
    means = tuple(tuple(tuple(row[min(k, len(row) - 1)] for k in range(gamma)) for row in rows_of(e["tables"]))
                  for e in sets)
    return tuple(float(e["temperature"]) for e in sets), means


@functools.lru_cache(maxsize=None)
def prior_means(n_max: int, gamma: int) -> tuple[tuple[float, ...], tuple[tuple[tuple[float, ...], ...], ...]]:
    """(temperatures [S], means [S][n_max][γ]): prior acceptance c_k per match length and slot, one set per
    sampling temperature the responses were drawn at (ascending) — lookup's conditional acceptance on the
    embedded target's training responses (`benchmarks/ngram_prior.py` writes `ngram_prior.json`); n_max past a
    set's largest table uses that table, lengths past its rows the last row, slots past its columns the last one."""
    def rows_of(tables):
        table = tables[str(min(n_max, max(int(k) for k in tables)))]["mean"]
        return [table[min(n, len(table) - 1)] for n in range(n_max)]
    return _means_per_temperature(PRIOR_FILE, rows_of, gamma)


def prior_set(n_max: int, sampling_temperature: jax.Array) -> jax.Array:
    """[B] int32 index of each request's prior set (`prior_means`): the one measured at the sampling temperature
    nearest to its own — the prior means and the calibration weights (`calibration_weights`) are both per set."""
    temperatures, _ = prior_means(n_max, 1)
    return nearest_set(jnp.asarray(temperatures, jnp.float32), sampling_temperature)


def request_prior(n_max: int, gamma: int, sampling_temperature: jax.Array,
                  set_index: jax.Array | None = None) -> jax.Array:
    """[B, n_max, γ] each request's prior means: the set measured at the sampling temperature nearest to its
    own (`prior_set`, or the given set_index [B]; at T > 0 lookup's draft x is accepted with probability p_t(x),
    less often than a greedy match — a greedy prior would over-promise)."""
    _, means = prior_means(n_max, gamma)
    index = prior_set(n_max, sampling_temperature) if set_index is None else set_index
    return jnp.asarray(means, jnp.float32)[index]


@functools.lru_cache(maxsize=None)
def corpus_prior_means(n_max: int, gamma: int) -> tuple[tuple[float, ...], tuple[tuple[tuple[float, ...], ...], ...]]:
    """(temperatures [S], means [S][n_max][γ]): prior acceptance c_k of a corpus draft per match length n (row n − 1)
    and slot, one set per sampling temperature (`CORPUS_PRIOR_FILE`, written by `benchmarks/corpus_prior.py`:
    corpus lookup's conditional acceptance on training responses whose own text the fitting table leaves out);
    lengths without a table use the nearest one's, slots past its columns the last one."""
    def rows_of(tables):
        tables = {int(k): v["mean"] for k, v in tables.items()}
        return [tables[min(tables, key=lambda m: (abs(m - n), m))] for n in range(1, n_max + 1)]
    return _means_per_temperature(CORPUS_PRIOR_FILE, rows_of, gamma)


def corpus_request_prior(n_max: int, gamma: int, sampling_temperature: jax.Array) -> jax.Array:
    """[B, n_max, γ] each request's corpus prior means: the set fitted at the temperature nearest to its own."""
    temperatures, means = corpus_prior_means(n_max, gamma)
    index = nearest_set(jnp.asarray(temperatures, jnp.float32), sampling_temperature)
    return jnp.asarray(means, jnp.float32)[index]


def calibration_features(count_confidence: jax.Array, n: jax.Array, previous: jax.Array, streak: jax.Array,
                         period: jax.Array, in_output: jax.Array) -> jax.Array:
    """[B, G, F] the features of the lookup confidence's calibration (`CALIBRATION_FEATURES`): 1, the logit of
    the count estimate c_k [B, G] (`lookup_confidence`, clipped to [1e-4, 1 − 1e-4]), the match length n [B] as
    n = 1 and n = 2 indicators, log(1 + k) of the draft position k (0-based), the request's last round with a
    match: none yet, none of its drafts accepted, log(1 + drafts accepted) — previous [B] (−1: none) —, and
    log(1 + streak [B]) (`NgramState`); then the match's source: whether the matched occurrence ends in the
    generated text rather than the prompt (in_output [B]: the text repeating itself), log(1 + period) of its
    distance to the anchor (period [B], tokens), period ≤ SHORT_PERIOD, and per position k ≥ period and
    log(1 + max(k − period + 1, 0)) (drafts that continue the loop past the text it was seen in). All known before
    the round is verified."""
    b, g = count_confidence.shape
    p = jnp.clip(count_confidence.astype(jnp.float32), 1e-4, 1 - 1e-4)
    period = period.astype(jnp.float32)
    per_row = jnp.stack([n == 1, n == 2], axis=-1).astype(jnp.float32)
    per_row = jnp.concatenate([per_row, jnp.stack([previous < 0, previous == 0], -1).astype(jnp.float32),
                               jnp.log1p(jnp.maximum(previous, 0).astype(jnp.float32))[:, None],
                               jnp.log1p(streak.astype(jnp.float32))[:, None],
                               jnp.stack([in_output.astype(jnp.float32), jnp.log1p(period),
                                          (period <= SHORT_PERIOD).astype(jnp.float32)], -1)], axis=-1)  # [B, 9]
    k = jnp.arange(g, dtype=jnp.float32)[None]
    past = jnp.stack([(k >= period[:, None]).astype(jnp.float32),
                      jnp.log1p(jnp.maximum(k - period[:, None] + 1, 0))], axis=-1)  # [B, G, 2]
    return jnp.concatenate([jnp.ones((b, g, 1)), (jnp.log(p) - jnp.log1p(-p))[..., None],
                            jnp.broadcast_to(per_row[:, None, :2], (b, g, 2)),
                            jnp.broadcast_to(jnp.log1p(k)[..., None], (b, g, 1)),
                            jnp.broadcast_to(per_row[:, None, 2:], (b, g, 7)), past], axis=-1)


@functools.lru_cache(maxsize=None)
def calibration_weights(n_max: int, prior_strength: float) -> tuple[tuple[float, ...], ...] | None:
    """[S][F] logistic weights of the lookup confidence's calibration per prior set (`prior_means`' temperatures),
    from `ngram_calibration.json` (`benchmarks/lookup_calibration.py --fit` writes it): a set without a fit has
    all-NaN weights (its requests keep the count estimate). None where nothing was fitted for this n_max and prior
    strength (the features depend on both)."""
    if not CALIBRATION_FILE.exists():
        return None
    temperatures, _ = prior_means(n_max, 1)
    fits = [f for f in json.loads(CALIBRATION_FILE.read_text())["sets"]
            if f["n_max"] == n_max and f["prior_strength"] == prior_strength]
    if not fits:
        return None
    for f in fits:
        if tuple(f["features"]) != CALIBRATION_FEATURES:
            raise ValueError(f"{CALIBRATION_FILE} was fitted on features {f['features']}, this code computes "
                             f"{list(CALIBRATION_FEATURES)}: refit it (benchmarks/lookup_calibration.py --fit)")
    by_temperature = {float(f["temperature"]): tuple(float(w) for w in f["weights"]) for f in fits}
    nan = (float("nan"),) * len(CALIBRATION_FEATURES)
    return tuple(by_temperature.get(t, nan) for t in temperatures)


def calibrated_confidence(count_confidence: jax.Array, n: jax.Array, previous: jax.Array, streak: jax.Array,
                          period: jax.Array, in_output: jax.Array, weights: jax.Array) -> jax.Array:
    """[B, G] σ(features · w) per request (`calibration_features`; weights [B, F], a row of NaN: that request keeps
    `count_confidence`); 0 without a match (n = 0). A logistic calibration of the count estimate fitted on the
    lookup rounds of the target's greedy outputs for calibration prompts (`benchmarks/lookup_calibration.py`): the
    count estimate alone over- and under-predicts by the request's recent history (it enters and leaves loops faster
    than its per-request average follows; BENCHMARKS.md "Session 37") and by where the match came from (a loop in
    the output holds further than a copy of the prompt; "Session 39")."""
    weights = jnp.asarray(weights, jnp.float32)
    z = jnp.einsum("bgf,bf->bg", calibration_features(count_confidence, n, previous, streak, period, in_output),
                   jnp.nan_to_num(weights))
    fitted = ~jnp.isnan(weights[:, 0])
    conf = jnp.where(fitted[:, None], jax.nn.sigmoid(z), count_confidence)
    return jnp.where((n > 0)[:, None], conf, 0.0)


def acceptance_counts(accepted: jax.Array, limit: jax.Array, gamma: int) -> tuple[jax.Array, jax.Array]:
    """One round's contribution to per-position acceptance counts: (tested, ok) [B, γ] float32 indicators —
    draft position k was verified with every earlier position accepted (k ≤ accepted), and was accepted
    (k < accepted); only positions k < limit [B] count (the drafts this record is about)."""
    k = jnp.arange(gamma)[None]
    tested = (k < jnp.minimum(accepted + 1, limit)[:, None]).astype(jnp.float32)
    ok = (k < jnp.minimum(accepted, limit)[:, None]).astype(jnp.float32)
    return tested, ok


def record_confidence(accepted: jax.Array, tested: jax.Array, prior: jax.Array, strength: float) -> jax.Array:
    """(accepted + s·prior) / (tested + s), elementwise: a prior acceptance worth s observations, moved by a
    request's own record (`acceptance_counts` summed over its rounds)."""
    return (accepted + strength * prior) / (tested + strength)


def lookup_confidence(state: NgramState, n: jax.Array, gamma: int, prior_mean: jax.Array,
                      prior_strength: float) -> jax.Array:
    """[B, γ] c_k = P(position k accepted | earlier ones accepted, match length n) estimated per request as
    (accepted + s·m) / (tested + s): the prior mean m [rows, ≥γ] or per request [B, rows, ≥γ]
    (`request_prior`) worth s observations, moved by the request's own counts; 0 without a match (n = 0). n
    [B] is the record's row + 1 (`NgramDrafter.record_rows`: a text match's length, or past n_max a corpus match's)."""
    row = jnp.clip(n - 1, 0, state.tested.shape[1] - 1)
    tested = jnp.take_along_axis(state.tested, row[:, None, None], axis=1)[:, 0, :gamma]
    accepted = jnp.take_along_axis(state.accepted, row[:, None, None], axis=1)[:, 0, :gamma]
    prior_mean = jnp.asarray(prior_mean, jnp.float32)
    if prior_mean.ndim == 2:
        prior_mean = jnp.broadcast_to(prior_mean, (n.shape[0],) + prior_mean.shape)
    mean = jnp.take_along_axis(prior_mean, row[:, None, None], axis=1)[:, 0, :gamma]
    return jnp.where((n > 0)[:, None], record_confidence(accepted, tested, mean, prior_strength), 0.0)


class CorpusData(nnx.Variable):
    """A corpus table's arrays (`drafters.corpus.CorpusTable`), stored with the lookup drafter, never trained."""


CORPUS_FIELDS = tuple(f.name for f in dataclasses.fields(CorpusTable))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LookupDraft:
    """A lookup proposal before its confidence: tokens [B, γ], length [B] (0: no draft), row [B] of the request's
    acceptance record it belongs to (`NgramDrafter.record_rows`; 0 without a draft, its length 0 then), n [B] the
    drafted text match's length (0 for a corpus draft or none) and end [B] its last position."""
    tokens: jax.Array
    length: jax.Array
    row: jax.Array
    n: jax.Array
    end: jax.Array


class NgramDrafter(nnx.Module):
    """The drafter interface (`init_state / prefill / propose / commit / head_matrix`) for prompt lookup, with
    `NgramConfig.corpus` also for corpus lookup where the text has no match (`drafters.corpus`).

    Confidence: per request, acceptance counts keyed by match source and length and by draft position (rows 0..n_max
    − 1: a text match of n = row + 1 tokens; with a corpus, rows n_max + n − 1: a corpus match of n tokens), updated
    at every verification round's commit from the committed tokens (`commit`; plain rounds skip the proposal and
    leave them alone) and read by `lookup_confidence` with the prior of the row's source (`request_prior`,
    `corpus_request_prior`) — for text matches with `NgramConfig.calibrated`, where a calibration was fitted for
    the request's sampling temperature (T = 0), then through it with the request's recent rounds
    (`calibrated_confidence`; corpus drafts keep the count estimate); it drives a confidence threshold and the
    serving scheduler like DSpark's calibrated head."""

    def __init__(self, config: NgramConfig, vocab_size: int, corpus: CorpusTable | None = None):
        if config.corpus != (corpus is not None):
            raise ValueError("NgramConfig.corpus needs a corpus table, and a corpus table needs NgramConfig.corpus"
                             f" (corpus={config.corpus}, table {'given' if corpus is not None else 'missing'})")
        self.config = config
        self.vocab_size = vocab_size
        self.full_vocab = True
        for name in CORPUS_FIELDS:  # one variable per array: `corpus_tokens`, `corpus_hashes`, …
            setattr(self, f"corpus_{name}", None if corpus is None else CorpusData(getattr(corpus, name)))

    @property
    def corpus_table(self) -> CorpusTable | None:
        """The corpus lookup's table (None: prompt lookup alone)."""
        if self.corpus_tokens is None:
            return None
        return CorpusTable(**{name: getattr(self, f"corpus_{name}").value for name in CORPUS_FIELDS})

    @property
    def record_rows(self) -> int:
        """Rows of the acceptance record: n_max text-match lengths, then the corpus's match lengths."""
        table = self.corpus_table
        return self.config.n_max + (0 if table is None else table.n_max)

    def init_state(self, batch: int, max_len: int) -> NgramState:
        shape = (batch, self.record_rows, self.config.block_size)  # distinct buffers: engines donate leaf by leaf
        return NgramState(jnp.zeros((batch, max_len), jnp.int32), jnp.zeros(shape, jnp.float32),
                          jnp.zeros(shape, jnp.float32), jnp.full((batch,), -1, jnp.int32),
                          jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))

    def draft(self, tokens: jax.Array, last: jax.Array) -> LookupDraft:
        """The proposal after each request's text tokens [B, L] up to `last` [B] (the anchor): the text's most
        recent match (`find_match`, `lookup_proposal`: γ tokens) or the corpus's (`corpus_match`, `corpus_proposal`:
        up to γ, cut at its response's end) where `takes_corpus`, else none."""
        g = self.config.block_size
        end, n = find_match(tokens, last, self.config.n_max, self.config.n_min)
        proposed = lookup_proposal(tokens, last, end, g)
        length, row = jnp.where(n > 0, g, 0), jnp.maximum(n - 1, 0)
        table = self.corpus_table
        if table is not None:
            corpus_end, corpus_n = corpus_match(table, tokens, last, CORPUS_N_MIN)
            corpus_tokens, corpus_length = corpus_proposal(table, corpus_end, g)
            use = takes_corpus(n, corpus_n)
            proposed = jnp.where(use[:, None], corpus_tokens, proposed)
            length = jnp.where(use, corpus_length, length)
            row = jnp.where(use, self.config.n_max + corpus_n - 1, row)
            n, end = jnp.where(use, 0, n), jnp.where(use, -1, end)
        return LookupDraft(proposed, length.astype(jnp.int32), row.astype(jnp.int32), n, end)

    def prefill(self, target_model, state: NgramState, features, prompts: jax.Array,
                prompt_lens: jax.Array) -> NgramState:
        del target_model, features  # positions past a prompt are stale until committed
        tokens = jax.lax.dynamic_update_slice(state.tokens, prompts.astype(jnp.int32), (0, 0))
        return dataclasses.replace(state, tokens=tokens, prompt_len=prompt_lens.astype(jnp.int32))

    def commit(self, target_model, state: NgramState, features, verified: jax.Array, start: jax.Array,
               count: jax.Array, outcome: RoundOutcome | None = None) -> NgramState:
        """verified [B, W]: the anchor and drafts at positions start..; the first `count` are committed (the
        rest lie at or past the next anchor: stale, overwritten later). With a verification round's `outcome`
        the acceptance statistics of the lookup's match length are updated by comparing the lookup's proposal (the
        outcome's `lookup_draft` from `propose`, else computed again) with the round's committed tokens, whichever
        draft was verified (another drafter's, as in the hybrid, or none): given its prefix each committed token is
        a draw from the target's distribution, so it equals the lookup's token x with probability p_t(x) — x's
        acceptance probability had it been verified (one-hot p_d). Position k counts as tested when the proposal agrees with the first k committed tokens and k <
        count, as accepted when it agrees with the first k + 1; positions past `count` are unknown."""
        del target_model, features
        rows = jnp.arange(verified.shape[0])
        before = state.tokens.at[rows, start].set(verified[:, 0].astype(jnp.int32))
        new = dataclasses.replace(state, tokens=write_contiguous(state.tokens, verified, start))
        if outcome is None:
            return new
        g = self.config.block_size
        drafted = self.draft(before, start) if outcome.lookup_draft is None else outcome.lookup_draft  # propose's
        w = min(g, outcome.committed.shape[1])
        agree = (drafted.tokens[:, :w] == outcome.committed[:, :w]).astype(jnp.int32)
        agreed = jnp.minimum(jnp.cumprod(agree, axis=1).sum(1), drafted.length)
        tested, ok = acceptance_counts(agreed, jnp.minimum(count, drafted.length), g)
        at_row = ((jnp.arange(self.record_rows)[None] == drafted.row[:, None])
                  & (drafted.length > 0)[:, None]).astype(jnp.float32)[..., None]  # [B, rows, 1]
        accepted_now = jnp.minimum(agreed, count).astype(jnp.int32)  # drafts known accepted (known up to count)
        matched = drafted.n > 0  # the calibration's history: rounds with a text match
        return dataclasses.replace(new, tested=new.tested + at_row * tested[:, None],
                                   accepted=new.accepted + at_row * ok[:, None],
                                   previous=jnp.where(matched, accepted_now, state.previous),
                                   streak=jnp.where(matched, jnp.where(accepted_now > 0, state.streak + 1, 0),
                                                    state.streak))

    def head_matrix(self, target_model):
        return None

    def head_rows(self, target_model):
        return None

    def propose(self, target_model, state: NgramState, anchor: jax.Array, start: jax.Array, key, params, mode,
                head) -> Proposal:
        """The lookup's draft after the anchor (at position start; `draft`): γ tokens on a text match, up to γ from
        the corpus, else none (length 0), with their confidences."""
        del target_model, key, mode, head
        g = self.config.block_size
        rows = jnp.arange(anchor.shape[0])
        tokens = state.tokens.at[rows, start].set(anchor.astype(jnp.int32))
        drafted = self.draft(tokens, start)
        n, end = drafted.n, drafted.end
        set_index = prior_set(self.config.n_max, params.temperature)
        prior = request_prior(self.config.n_max, g, params.temperature, set_index)
        table = self.corpus_table
        if table is not None:
            prior = jnp.concatenate([prior, corpus_request_prior(table.n_max, g, params.temperature)], axis=1)
        conf = lookup_confidence(state, jnp.where(drafted.length > 0, drafted.row + 1, 0), g, prior,
                                 self.config.prior_strength)
        weights = calibration_weights(self.config.n_max, self.config.prior_strength) if self.config.calibrated else None
        if weights is not None:  # text matches only: corpus drafts keep the count estimate
            period = jnp.where(n > 0, start - end, 0)
            in_output = (n > 0) & (end >= state.prompt_len)
            conf = jnp.where((n > 0)[:, None],
                             calibrated_confidence(conf, n, state.previous, state.streak, period, in_output,
                                                   jnp.asarray(weights, jnp.float32)[set_index]), conf)
        conf = jnp.where(jnp.arange(g)[None] < drafted.length[:, None], conf, 0.0)
        proposed, length = drafted.tokens, drafted.length
        logits = jnp.log(jnp.maximum(conf, 1e-6)) - jnp.log(jnp.maximum(1.0 - conf, 1e-6))
        proposal = Proposal(tokens=proposed, draft_index=proposed, p_draft=None, confidence=conf,
                            confidence_logits=logits, length=length, lookup_draft=drafted)
        return dataclasses.replace(proposal, lookup_expected=proposal.expected_accept_length.astype(jnp.float32))
