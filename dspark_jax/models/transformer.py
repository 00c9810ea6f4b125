"""Decoder-only target transformer (Gemma 3 / Qwen 3) and its pure forward functions."""
from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.models.config import TransformerConfig
from dspark_jax.models.kv_cache import KVCache
from dspark_jax.models.int8_linear import Q8Blocks, dequantize_blocks
from dspark_jax.models.layers import DecoderLayer, RMSNorm, param
from dspark_jax.models.output_head import q8_logits, tied_logits, uses_q8_blocks
from dspark_jax.models.q8_ffi import kernel_blocker
from dspark_jax.parallel.placement import put


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    """hidden: final-normed last hidden states [B, T, d]; cache: the KV cache with the tokens' K/V written
    (None for `forward_flat(write=False)`); taps: raw outputs of the requested layers (id -1 = scaled embedding
    output), each [B, T, d], in the requested order; new_k / new_v: with `forward_flat(write=False)`, the
    tokens' own K/V per layer, each [T, KVH, D] (else None)."""
    hidden: jax.Array
    cache: KVCache | None
    taps: tuple[jax.Array, ...]
    new_k: tuple[jax.Array, ...] | None = None
    new_v: tuple[jax.Array, ...] | None = None


class Transformer(nnx.Module):
    def __init__(self, config: TransformerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, attn_impl: str = "reference"):
        """attn_impl: the attention implementation (`pallas_kernels.AttentionImpl`), a static field of the
        graph definition — change it with `models.attn_impl.with_attn_impl`."""
        c = config
        self.config = c
        self.dtype = dtype
        self.attn_impl = attn_impl
        self.embed_tokens = param(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(c, i, dtype, rngs) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.family == "gemma3", dtype)
        self.lm_head = None if c.tie_word_embeddings else param(
            rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), dtype)
        # the tied embedding's Q8_0 blocks (values int8 [V, d], scales float32 [V, d / 32]) when the head may read
        # them instead of the table (`with_q8_head`); None: the table only
        self.head_q8_values = nnx.data(None)
        self.head_q8_scales = nnx.data(None)
        self.head_q8_kernel = False  # static: whether several rows go to the q8_ffi kernel (`with_q8_head`)

    def embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)
        return x * jnp.asarray(self.config.embedding_scale, x.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits from final-normed hidden states (tied or untied head, optional soft-cap)."""
        rows = int(np.prod(hidden.shape[:-1]))
        if self.lm_head is None and self.head_q8_values is not None and uses_q8_blocks(rows, self.head_q8_kernel):
            out = q8_logits(hidden, self.head_q8_values[...], self.head_q8_scales[...], kernel=self.head_q8_kernel)
        elif self.lm_head is None:
            out = tied_logits(hidden, self.embed_tokens[...])
        else:
            out = jnp.einsum("...d,dv->...v", hidden, self.lm_head[...], preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        return cap * jnp.tanh(out / cap) if cap else out

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, cache_start: jax.Array,
                 *, tap_layers: tuple[int, ...] = ()) -> ForwardOutput:
        """Runs T new tokens per request. tokens/positions: [B, T]; their K/V are written into the cache
        at rows cache_start[b]..+T-1 (normally cache_start = positions[:, 0]). Queries with position < 0
        are padding."""
        x = self.embed(tokens)
        taps = {-1: x} if -1 in tap_layers else {}
        ks, vs = list(cache.k), list(cache.v)
        for i, layer in enumerate(self.layers):
            x, ks[i], vs[i] = layer(x, positions, ks[i], vs[i], cache_start, self.attn_impl)
            if i in tap_layers:
                taps[i] = x
        return ForwardOutput(self.norm(x), KVCache(tuple(ks), tuple(vs)), tuple(taps[i] for i in tap_layers))


    def forward_flat(self, tokens: jax.Array, layout, cache: KVCache, *, tap_layers: tuple[int, ...] = (),
                     write: bool = True) -> ForwardOutput:
        """Runs a flattened bucket of tokens [T] from several requests (`models.layout.TokenLayout`):
        cost scales with T, not with requests × longest request. hidden and taps are [T, d]. write=False: the
        cache is read, not written, and the tokens' K/V come back as new_k / new_v (`kv_cache.KVRows` writes
        them) — a round inside a conditional then does not copy the whole cache."""
        x = self.embed(tokens)
        taps = {-1: x} if -1 in tap_layers else {}
        ks, vs = list(cache.k), list(cache.v)
        for i, layer in enumerate(self.layers):
            def attend(h, i=i, layer=layer):
                out, ks[i], vs[i] = layer.self_attn.forward_flat(h, layout, cache.k[i], cache.v[i], self.attn_impl,
                                                                 write=write)
                return out
            x = layer.wrap_attention(x, attend)
            if i in tap_layers:
                taps[i] = x
        tapped = tuple(taps[i] for i in tap_layers)
        if write:
            return ForwardOutput(self.norm(x), KVCache(tuple(ks), tuple(vs)), tapped)
        return ForwardOutput(self.norm(x), None, tapped, new_k=tuple(ks), new_v=tuple(vs))


def abstract_model(config: TransformerConfig, dtype=jnp.float32) -> Transformer:
    """The model's structure with ShapeDtypeStruct leaves (no memory allocated)."""
    return nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))


@dataclasses.dataclass(frozen=True)
class CanonicalTensor:
    """Where a model parameter comes from: the canonical tensor `name`, transposed (torch Linear [out, in] → our
    kernel [in, out]) or not."""
    name: str
    transpose: bool = False

    def read(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        a = np.asarray(tensors[self.name])
        return a.T if self.transpose else a


def canonical_layout(config: TransformerConfig) -> dict:
    """The model's nested state (nnx pure-dict structure) with a CanonicalTensor at every parameter."""
    return _layout(config, lambda name: CanonicalTensor(name, True), CanonicalTensor)


def with_q8_head(model: Transformer, values: np.ndarray, scales: np.ndarray, kernel: bool | None = None) -> Transformer:
    """`model` whose output head reads the tied embedding's Q8_0 blocks (values int8 [V, d], scales float32
    [V, d / block]) wherever that is cheaper (`output_head.uses_q8_blocks` on CPU) and the float32 table elsewhere.
    kernel: whether 2 and more rows go to the `q8_ffi` CPU kernel; None: where it is built (`kernel_blocker`),
    True: required (RuntimeError saying why not).
    The blocks must be the table: scale · value equal to every table entry (checked on the host, bit for bit), so
    the model computes the same logits up to float summation order. Raises ValueError for an untied model, a
    table that is not float32 or blocks that are not its values."""
    table = model.embed_tokens[...]
    if model.lm_head is not None:
        raise ValueError("a Q8_0 head needs tied embeddings (this model has its own lm_head)")
    if table.dtype != jnp.float32:
        raise ValueError(f"a Q8_0 head reproduces a float32 table, this model's is {table.dtype}")
    values, scales = np.asarray(values), np.asarray(scales, np.float32)
    v, d = table.shape
    if values.dtype != np.int8 or values.shape != (v, d) or scales.shape[0] != v or not scales.shape[1] \
            or d % scales.shape[1]:
        raise ValueError(f"Q8_0 blocks must be int8 values {(v, d)} and float32 scales [{v}, {d} / block], got "
                         f"{values.dtype} {values.shape} and {scales.shape}")
    host_table = np.asarray(table)
    for i in range(0, v, 16384):  # in chunks: no second float32 table in host memory
        rows = slice(i, i + 16384)
        if not np.array_equal(dequantize_blocks(values[rows], scales[rows], None), host_table[rows]):
            raise ValueError(f"the Q8_0 blocks do not reproduce the embedding table (scale · value != the table's "
                             f"entry in rows {i}..{min(i + 16384, v) - 1})")
    blocker = kernel_blocker() if kernel is not False else None
    if kernel and blocker:
        raise RuntimeError(f"the Q8_0 head kernel is not available: {blocker}")
    model.head_q8_values = Q8Blocks(jax.device_put(values), sharding_names=("vocab", None), eager_sharding=False)
    model.head_q8_scales = Q8Blocks(jax.device_put(scales), sharding_names=("vocab", None), eager_sharding=False)
    model.head_q8_kernel = kernel is not False and blocker is None
    return model


def canonical_to_pure_dict(config: TransformerConfig, tensors: Mapping[str, np.ndarray]) -> dict:
    """Maps canonical (HF text-model, torch [out, in]) tensor names onto the model's nested state."""
    return jax.tree.map(lambda spec: np.ascontiguousarray(spec.read(tensors)), canonical_layout(config))


def _layout(config: TransformerConfig, t, w) -> dict:
    """The nested state with t(name) at Linear kernels (stored transposed) and w(name) at every other tensor."""
    layers = {}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        layer = {
            "input_layernorm": {"weight": w(p + "input_layernorm.weight")},
            "post_attention_layernorm": {"weight": w(p + "post_attention_layernorm.weight")},
            "self_attn": {
                "q_proj": t(p + "self_attn.q_proj.weight"), "k_proj": t(p + "self_attn.k_proj.weight"),
                "v_proj": t(p + "self_attn.v_proj.weight"), "o_proj": t(p + "self_attn.o_proj.weight"),
                "q_norm": {"weight": w(p + "self_attn.q_norm.weight")},
                "k_norm": {"weight": w(p + "self_attn.k_norm.weight")},
            },
            "mlp": {"gate_proj": t(p + "mlp.gate_proj.weight"), "up_proj": t(p + "mlp.up_proj.weight"),
                    "down_proj": t(p + "mlp.down_proj.weight")},
        }
        if config.family == "gemma3":
            layer["pre_feedforward_layernorm"] = {"weight": w(p + "pre_feedforward_layernorm.weight")}
            layer["post_feedforward_layernorm"] = {"weight": w(p + "post_feedforward_layernorm.weight")}
        layers[i] = layer
    out = {"embed_tokens": w("embed_tokens.weight"), "layers": layers, "norm": {"weight": w("norm.weight")}}
    if not config.tie_word_embeddings:
        out["lm_head"] = t("lm_head.weight")
    return out


def model_from_canonical(config: TransformerConfig, tensors: Mapping[str, np.ndarray], dtype=jnp.float32,
                         shardings: nnx.State | None = None) -> Transformer:
    """Builds a Transformer whose parameters are the given canonical tensors cast to `dtype`, one tensor at a time:
    each is read from `tensors` (a dict, or a lazy reader such as `io.hf_checkpoint.SafetensorsReader`), cast on the
    host, placed on its device(s) (`shardings`: the abstract state's NamedShardings, e.g.
    `parallel.state_shardings`; None = the default device) and dropped, so host memory holds one tensor beyond the
    placed model, never a second copy of it."""
    graphdef, state = nnx.split(abstract_model(config, dtype))
    host_dtype = np.dtype(dtype)
    placements = None if shardings is None else nnx.to_pure_dict(shardings)

    def place(spec: CanonicalTensor, sharding=None) -> jax.Array:
        # one host copy at most (cast and / or transposed into place), then one device copy: jax.device_put, not
        # jnp.asarray, which stages a second host copy of the whole tensor on CPU
        a = np.ascontiguousarray(spec.read(tensors), dtype=host_dtype)
        return jax.device_put(a) if sharding is None else put(a, sharding)

    layout = canonical_layout(config)
    pure = jax.tree.map(place, layout) if placements is None else jax.tree.map(place, layout, placements)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)
