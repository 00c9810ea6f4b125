"""Per-request sampling: temperature, top-k, top-p, greedy at temperature 0 (below drafters and decoding, which
both draw tokens).

`filter_logits` is the one transform applied to every distribution that is sampled from or compared
(target and draft alike), so acceptance ratios are computed on exactly the sampled distributions.
Filtering is a per-row threshold on the scaled logits (`filter_threshold`, no sort): keep x >= threshold.
The verification round reads the target distribution through `LazyTokenProbs`: the values of `token_probs`
(same formula on the same per-row threshold / max / normaliser) at the drafted tokens and for the one full
row per request that rejection sampling needs, without materialising [T, V].

Modules: params (SamplingParams, FilterMode, scaling), exact_compare (argmax and Gumbel draws), threshold
(top-k / top-p thresholds), distribution (token_probs, sample), lazy (LazyTokenProbs), keys (per-request keys).
"""
from dspark_jax.sampling.distribution import (sample, sample_checked, softmax_stats, token_probs,
                                              top_k_candidates)
from dspark_jax.sampling.exact_compare import argmax_and_finite, categorical, fast_argmax
from dspark_jax.sampling.lazy import LazyTokenProbs, lazy_token_probs
from dspark_jax.sampling.params import (FilterMode, SamplingParams, check_batch, inverse_temperature, scale_logits,
                                        validate_sampling)
from dspark_jax.sampling.threshold import filter_logits, filter_threshold

__all__ = ["FilterMode", "LazyTokenProbs", "SamplingParams", "argmax_and_finite", "categorical", "check_batch",
           "fast_argmax", "filter_logits", "filter_threshold", "inverse_temperature", "lazy_token_probs", "sample",
           "sample_checked", "scale_logits", "softmax_stats", "token_probs", "top_k_candidates", "validate_sampling"]
