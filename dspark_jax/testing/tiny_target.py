"""A tiny random Gemma 3 target (vocabulary 97; BOS 2, EOS 1, pad 0) and its plain greedy continuations: the
shared fixture of the engine, governance, training and sharding tests."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.testing.tiny_configs import tiny_gemma3
from dspark_jax.decoding.autoregressive import generate
from dspark_jax.sampling import SamplingParams
from dspark_jax.models.transformer import Transformer
from dspark_jax.target import Target


class CharTokenizer:
    """Characters → ids 3..96 (BOS 2, EOS 1, pad 0): enough for generate_text's host side."""
    vocab_size, bos_id, eos_id, pad_id, stop_ids = 97, 2, 1, 0, (1,)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([2] if add_bos else []) + [3 + ord(c) % 94 for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i - 3) if i >= 3 else "" for i in ids)


def make_tiny_target(num_layers: int = 4, seed: int = 0) -> Target:
    """A random tiny target whose EOS (1) stops generation."""
    cfg = dataclasses.replace(tiny_gemma3(num_layers=num_layers), bos_token_id=2, eos_token_ids=(1,))
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)))
    return Target(cfg, graphdef, state, CharTokenizer(), "tiny")


def plain_greedy(target: Target, prompt: list[int], n: int, width: int = 32) -> list[int]:
    """The target's own greedy continuation of `prompt` (plain decoding, up to `n` tokens or a stop)."""
    toks = jnp.asarray([list(prompt) + [0] * (width - len(prompt))], jnp.int32)
    out = generate(target.graphdef, target.state, toks, jnp.asarray([len(prompt)]), jax.random.key(0),
                   SamplingParams.create(1), max_new_tokens=n, stop_ids=target.stop_ids)
    return [int(t) for t in out.tokens[0, :int(out.num_tokens[0])]]
