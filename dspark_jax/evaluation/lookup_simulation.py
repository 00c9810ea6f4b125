"""Prompt lookup in plain Python: the reference for the on-device n-gram drafter (`drafters/ngram.py`) and
an offline simulation of its accept length τ on already-decoded greedy outputs (no model needed).

At temperature 0 a round commits the drafted tokens that equal the target's greedy continuation plus one
(the correction or bonus token); a round without a match commits one token (a plain step). The simulation
replays exactly those rounds over `prompt + output`, so at batch 1 it predicts the jitted loop's rounds.
"""
from __future__ import annotations

from typing import Sequence


def lookup_match(tokens: Sequence[int], n_max: int, n_min: int, gamma: int) -> tuple[list[int], int]:
    """The lookup proposal after `tokens` (the anchor last) and its match length n: for the longest n in
    n_max..n_min whose last n tokens occur earlier, the most recent occurrence's following tokens, continued
    with the period (the distance from that occurrence to the end) up to `gamma`; ([], 0) when nothing
    matches."""
    last = len(tokens) - 1
    for n in range(min(n_max, len(tokens)), n_min - 1, -1):
        suffix = list(tokens[len(tokens) - n:])
        for end in range(last - 1, n - 2, -1):  # most recent earlier window first
            if list(tokens[end - n + 1:end + 1]) == suffix:
                period = last - end
                return [tokens[end + 1 + k % period] for k in range(gamma)], n
    return [], 0


def lookup(tokens: Sequence[int], n_max: int, n_min: int, gamma: int) -> list[int]:
    """The lookup proposal alone (`lookup_match`)."""
    return lookup_match(tokens, n_max, n_min, gamma)[0]


def simulate_rounds(prompt: Sequence[int], output: Sequence[int], n_max: int = 3, n_min: int = 1,
                    gamma: int = 7) -> list[int]:
    """Tokens committed per verification round when lookup drafts the greedy `output` of `prompt` (its first
    token comes from the prefill, as in the loop). Σ = len(output) − 1."""
    seq = list(prompt) + list(output)
    anchor = len(prompt)  # index of the newest committed token
    end = len(seq)
    counts = []
    while anchor < end - 1:
        draft = lookup(seq[:anchor + 1], n_max, n_min, gamma)
        accepted = 0
        while accepted < len(draft) and anchor + 1 + accepted < end and draft[accepted] == seq[anchor + 1 + accepted]:
            accepted += 1
        count = min(accepted + 1, end - 1 - anchor)
        counts.append(count)
        anchor += count
    return counts


def conditional_acceptance(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], n_max: int = 3,
                           n_min: int = 1, gamma: int = 15,
                           first_only: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Over the simulated rounds of (prompt, greedy output) pairs: tested[n−1][k] rounds whose proposal came
    from an n-token match and reached draft position k with every earlier one accepted, accepted[n−1][k] of
    them accepting position k too (c_k = accepted / tested: the statistic `NgramDrafter` estimates online).
    first_only: only each pair's first round with an n-token match, per n — the rounds a request decodes before
    it has any record of its own for n, where `NgramDrafter` reads its prior alone."""
    tested = [[0] * gamma for _ in range(n_max)]
    accepted = [[0] * gamma for _ in range(n_max)]
    for prompt, output in pairs:
        seq = list(prompt) + list(output)
        anchor, end = len(prompt), len(prompt) + len(output)
        seen = set()
        while anchor < end - 1:
            draft, n = lookup_match(seq[:anchor + 1], n_max, n_min, gamma)
            room = min(len(draft), end - 1 - anchor)
            a = 0
            while a < room and draft[a] == seq[anchor + 1 + a]:
                a += 1
            if not (first_only and n in seen):
                for k in range(min(a + 1, room)):
                    tested[n - 1][k] += 1
                    accepted[n - 1][k] += k < a
            if room > 0:
                seen.add(n)
            anchor += min(a + 1, end - 1 - anchor)
    return tested, accepted


def simulated_tau(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], n_max: int = 3, n_min: int = 1,
                  gamma: int = 7) -> float:
    """Pooled τ (Σ committed / Σ rounds, bonus included) of lookup over (prompt, greedy output) pairs."""
    counts = [c for p, o in pairs for c in simulate_rounds(p, o, n_max, n_min, gamma)]
    return sum(counts) / len(counts) if counts else float("nan")
