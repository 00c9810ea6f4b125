"""Prompt lookup in plain Python: the reference for the on-device n-gram drafter (`drafters/ngram.py`) and
an offline simulation of its accept length τ on already-decoded greedy outputs (no model needed).

At temperature 0 a round commits the drafted tokens that equal the target's greedy continuation plus one
(the correction or bonus token); a round without a match commits one token (a plain step). The simulation
replays exactly those rounds over `prompt + output`, so at batch 1 it predicts the jitted loop's rounds.
`corpus_lookup_rounds` replays prompt lookup with corpus lookup where the text has no match (`drafters.corpus`; its
table lookups run in JAX, batched over a text's positions).
"""
from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def match_source(tokens: Sequence[int], n_max: int, n_min: int) -> tuple[int, int]:
    """(n, end): the longest n in n_max..n_min whose last n tokens of `tokens` occur earlier, and the index of the
    most recent earlier occurrence's last token; (0, −1) when nothing matches. The proposal repeats the tokens
    after `end` with period len(tokens) − 1 − end."""
    last = len(tokens) - 1
    for n in range(min(n_max, len(tokens)), n_min - 1, -1):
        suffix = list(tokens[len(tokens) - n:])
        for end in range(last - 1, n - 2, -1):  # most recent earlier window first
            if list(tokens[end - n + 1:end + 1]) == suffix:
                return n, end
    return 0, -1


def lookup_match(tokens: Sequence[int], n_max: int, n_min: int, gamma: int) -> tuple[list[int], int]:
    """The lookup proposal after `tokens` (the anchor last) and its match length n: for the longest n in
    n_max..n_min whose last n tokens occur earlier, the most recent occurrence's following tokens, continued
    with the period (the distance from that occurrence to the end) up to `gamma`; ([], 0) when nothing
    matches (`match_source`)."""
    n, end = match_source(tokens, n_max, n_min)
    return (periodic_proposal(tokens, end, gamma), n) if n else ([], 0)


def periodic_proposal(tokens: Sequence[int], end: int, gamma: int) -> list[int]:
    """`gamma` tokens after the match ending at `end` (`match_source`), repeated with the period from it to the
    anchor, the last of `tokens`."""
    period = len(tokens) - 1 - end
    return [tokens[end + 1 + k % period] for k in range(gamma)]


def lookup(tokens: Sequence[int], n_max: int, n_min: int, gamma: int) -> list[int]:
    """The lookup proposal alone (`lookup_match`)."""
    return lookup_match(tokens, n_max, n_min, gamma)[0]


class LookupRound(NamedTuple):
    """One verification round of lookup over a greedy output: match length n (0 without a match), drafts
    accepted, drafts that could be checked (room), tokens committed, and where the match came from: period (the
    distance from the matched occurrence to the anchor; 0 without a match) and whether that occurrence ends in the
    output rather than the prompt (the text repeating itself, not copying the prompt)."""
    n: int
    accepted: int
    room: int
    count: int
    period: int
    in_output: bool


def lookup_round_details(prompt: Sequence[int], output: Sequence[int], n_max: int = 3, n_min: int = 1,
                         gamma: int = 7) -> Iterator[LookupRound]:
    """`lookup_rounds` with each round's match source (`LookupRound`)."""
    seq = list(prompt) + list(output)
    anchor, end = len(prompt), len(seq)  # anchor: index of the newest committed token
    while anchor < end - 1:
        committed = seq[:anchor + 1]
        n, source = match_source(committed, n_max, n_min)
        period = anchor - source if n else 0
        draft = periodic_proposal(committed, source, gamma) if n else []
        room = min(len(draft), end - 1 - anchor)
        accepted = 0
        while accepted < room and draft[accepted] == seq[anchor + 1 + accepted]:
            accepted += 1
        count = min(accepted + 1, end - 1 - anchor)
        yield LookupRound(n, accepted, room, count, period, bool(n) and source >= len(prompt))
        anchor += count


def lookup_rounds(prompt: Sequence[int], output: Sequence[int], n_max: int = 3, n_min: int = 1,
                  gamma: int = 7) -> Iterator[tuple[int, int, int, int]]:
    """The verification rounds of lookup drafting the greedy `output` of `prompt` (its first token comes from the
    prefill, as in the loop), in order: (match length n — 0 without a match —, drafts accepted, drafts that could
    be checked against `output` (the proposal cut where the output ends), tokens committed)."""
    for r in lookup_round_details(prompt, output, n_max, n_min, gamma):
        yield r.n, r.accepted, r.room, r.count


def simulate_rounds(prompt: Sequence[int], output: Sequence[int], n_max: int = 3, n_min: int = 1,
                    gamma: int = 7) -> list[int]:
    """Tokens committed per verification round when lookup drafts the greedy `output` of `prompt` (its first
    token comes from the prefill, as in the loop). Σ = len(output) − 1."""
    return [count for *_, count in lookup_rounds(prompt, output, n_max, n_min, gamma)]


def conditional_acceptance(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], n_max: int = 3,
                           n_min: int = 1, gamma: int = 15,
                           first_only: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Over the simulated rounds of (prompt, greedy output) pairs: tested[n−1][k] rounds whose proposal came
    from an n-token match and reached draft position k with every earlier one accepted, accepted[n−1][k] of
    them accepting position k too (c_k = accepted / tested: the statistic `NgramDrafter` estimates online).
    first_only: only each pair's first round with an n-token match, per n — the rounds a request decodes before
    it has any record of its own for n, where `NgramDrafter` reads its prior alone."""
    tested, accepted = np.zeros((n_max, gamma), np.int64), np.zeros((n_max, gamma), np.int64)
    for prompt, output in pairs:
        seen = set()
        for n, a, room, _ in lookup_rounds(prompt, output, n_max, n_min, gamma):
            if room == 0 or (first_only and n in seen):
                continue
            seen.add(n)
            reached, passed = position_outcomes(a, room, gamma)
            tested[n - 1] += reached
            accepted[n - 1] += passed
    return tested.tolist(), accepted.tolist()


def position_outcomes(accepted: int, room: int, gamma: int) -> tuple[np.ndarray, np.ndarray]:
    """Which of a round's γ draft positions were tested (reached with every earlier one accepted, within the
    checkable room) and which of those were accepted, from its accepted count and room: two bool arrays [γ]."""
    k = np.arange(gamma)
    return k < min(accepted + 1, room), k < min(accepted, room)


def simulated_tau(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], n_max: int = 3, n_min: int = 1,
                  gamma: int = 7) -> float:
    """Pooled τ (Σ committed / Σ rounds, bonus included) of lookup over (prompt, greedy output) pairs."""
    counts = [c for p, o in pairs for c in simulate_rounds(p, o, n_max, n_min, gamma)]
    return sum(counts) / len(counts) if counts else float("nan")


class LookupRecord(NamedTuple):
    """One simulated lookup round with a draft, as `NgramDrafter` sees it before verification: match length n,
    the count estimate c [γ] (`drafters.ngram.lookup_confidence`), previous / streak (`NgramState`), and its
    outcome: drafts accepted, drafts checkable (room); the match's period and whether it lies in the output
    (`LookupRound`; read by the drafter's calibration, `drafters.ngram.calibration_features`)."""
    n: int
    count_confidence: np.ndarray
    previous: int
    streak: int
    accepted: int
    room: int
    period: int
    in_output: bool


def lookup_records(prompt: Sequence[int], output: Sequence[int], prior: np.ndarray, strength: float,
                   n_max: int = 3, n_min: int = 1, gamma: int = 15) -> Iterator[LookupRecord]:
    """The rounds of `lookup_rounds` that have a draft, with the state `NgramDrafter` keeps for the request —
    the plain-Python reference of its counts, previous and streak: per match length n and position k, c_k =
    (accepted_k + s·m_k) / (tested_k + s) from the request's earlier rounds and the prior m = prior[n − 1] [γ]
    worth s = `strength` observations; previous: drafts accepted in the last round with a draft (−1 before any);
    streak: such rounds in a row with at least one accepted."""
    prior = np.asarray(prior, np.float64)
    tested, ok = np.zeros((n_max, gamma)), np.zeros((n_max, gamma))
    previous, streak = -1, 0
    for n, a, room, _, period, in_output in lookup_round_details(prompt, output, n_max, n_min, gamma):
        if room == 0:
            continue
        c = (ok[n - 1] + strength * prior[n - 1, :gamma]) / (tested[n - 1] + strength)
        yield LookupRecord(n, c, previous, streak, a, room, period, in_output)
        reached, passed = position_outcomes(a, room, gamma)
        tested[n - 1] += reached
        ok[n - 1] += passed
        previous, streak = a, (streak + 1 if a >= 1 else 0)


@functools.partial(jax.jit, static_argnames="n_min")
def _corpus_matches(table, text, n_min: int):
    """`drafters.corpus.corpus_match` at every position of one text (text [W, W]: W copies of it)."""
    from dspark_jax.drafters.corpus import corpus_match
    return corpus_match(table, text, jnp.arange(text.shape[0]), n_min)


class CorpusRound(NamedTuple):
    """One round of prompt lookup with corpus lookup where the text has no match (`corpus_lookup_rounds`):
    source "prompt", "corpus" or "" (no draft), its match length n (0: none), drafts accepted, drafts checkable
    (room) and tokens committed."""
    source: str
    n: int
    accepted: int
    room: int
    count: int


def corpus_lookup_rounds(prompt: Sequence[int], output: Sequence[int], table, n_max: int = 3, n_min: int = 1,
                         corpus_n_min: int = 2, gamma: int = 15, prompt_lookup: bool = True,
                         corpus: bool = True, text_first: bool = False) -> Iterator[CorpusRound]:
    """The rounds of `lookup_round_details` where a round drafts from the corpus table where `takes_corpus` (the
    text has no match, or a short one against a long corpus match; `drafters.corpus`, one batched lookup for every
    position of the text; prompt_lookup False: the corpus alone; corpus False: prompt lookup alone; text_first: the
    corpus only where the text has no match, session 52's rule), over the greedy `output` of `prompt`."""
    from dspark_jax.drafters.corpus import corpus_proposal, takes_corpus
    seq = list(prompt) + list(output)
    width = max(256, 1 << (len(seq) - 1).bit_length())  # few shapes: one compilation per width
    text = jnp.asarray([seq + [0] * (width - len(seq))] * width, jnp.int32)
    ends, found = _corpus_matches(table, text, corpus_n_min)
    drafts, lengths = (np.asarray(a) for a in corpus_proposal(table, ends, gamma))
    found = np.asarray(found)
    anchor, end = len(prompt), len(seq)
    while anchor < end - 1:
        committed = seq[:anchor + 1]
        n, source = match_source(committed, n_max, n_min) if prompt_lookup else (0, -1)
        corpus_n = int(found[anchor])
        if corpus and (n == 0 < corpus_n if text_first else takes_corpus(n, corpus_n)):
            kind, n, draft = "corpus", corpus_n, list(drafts[anchor][:lengths[anchor]])
        elif n:
            kind, draft = "prompt", periodic_proposal(committed, source, gamma)
        else:
            kind, draft = "", []
        room = min(len(draft), end - 1 - anchor)
        accepted = 0
        while accepted < room and draft[accepted] == seq[anchor + 1 + accepted]:
            accepted += 1
        count = min(accepted + 1, end - 1 - anchor)
        yield CorpusRound(kind, n, accepted, room, count)
        anchor += count
