"""Shared Flax NNX layers for Gemma 3 and Qwen 3. Parameters carry logical axis names
(`sharding_names`) so sharding rules can be applied without touching model code."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.models.config import TransformerConfig
from dspark_jax.models.int8_linear import project
from dspark_jax.models.kv_cache import scatter_rows, write_contiguous
from dspark_jax.models.layout import from_grid, to_grid
from pallas_kernels import attention, block_attention, prefix_attention


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, std: float = 0.02) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), sharding_names=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32. Gemma stores w and scales by (1 + w); Qwen scales by w."""

    def __init__(self, dim: int, eps: float, unit_offset: bool, dtype, axis_name: str = "norm"):
        init = jnp.zeros((dim,), dtype) if unit_offset else jnp.ones((dim,), dtype)
        self.weight = nnx.Param(init, sharding_names=(axis_name,), eager_sharding=False)
        self.eps, self.unit_offset = eps, unit_offset

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        w = self.weight[...].astype(jnp.float32)
        return (xf * (1.0 + w if self.unit_offset else w)).astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling_factor: float = 1.0) -> jax.Array:
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta ** exponent) / scaling_factor


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """HF "rotate_half" RoPE. x: [B, T, H, D]; positions: [B, T]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    """GQA self-attention with per-head q/k RMSNorm, RoPE and an optional sliding window."""

    def __init__(self, config: TransformerConfig, layer: int, dtype, rngs: nnx.Rngs):
        c = config
        gemma = c.family == "gemma3"
        self.q_proj = param(rngs, (c.hidden_size, c.num_heads * c.head_dim), ("embed", "heads"), dtype)
        self.k_proj = param(rngs, (c.hidden_size, c.num_kv_heads * c.head_dim), ("embed", "kv_heads"), dtype)
        self.v_proj = param(rngs, (c.hidden_size, c.num_kv_heads * c.head_dim), ("embed", "kv_heads"), dtype)
        self.o_proj = param(rngs, (c.num_heads * c.head_dim, c.hidden_size), ("heads", "embed"), dtype)
        # the projections' int8 blocks where loaded from a GGUF (`int8_linear.with_int8_weight`); None: float32 only
        self.q_proj_int8 = nnx.data(None)
        self.k_proj_int8 = nnx.data(None)
        self.v_proj_int8 = nnx.data(None)
        self.o_proj_int8 = nnx.data(None)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, gemma, dtype, "head_dim")
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, gemma, dtype, "head_dim")
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.scale = c.attention_scale
        self.window = c.window_of(layer)
        full = c.layer_types[layer] == "full_attention"
        self.rope_theta = c.rope_thetas[layer]
        self.rope_scaling = c.rope_scaling_factor if full else 1.0

    def project_kv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        b, t, _ = x.shape
        k = project(x, self.k_proj[...], self.k_proj_int8).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = project(x, self.v_proj[...], self.v_proj_int8).reshape(b, t, self.num_kv_heads, self.head_dim)
        k = apply_rope(self.k_norm(k), positions, rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling))
        return k, v

    def __call__(self, x: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
                 cache_start: jax.Array, attn_impl: str) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, T, d]; positions [B, T]; the T new K/V rows are written at cache_start[b].

        Returns (output, new k_cache, new v_cache).
        """
        b, t, _ = x.shape
        q = project(x, self.q_proj[...], self.q_proj_int8).reshape(b, t, self.num_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), positions, rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling))
        k, v = self.project_kv(x, positions)
        k_cache = write_contiguous(k_cache, k, cache_start)
        v_cache = write_contiguous(v_cache, v, cache_start)
        out = attention(q, k_cache, v_cache, positions, scale=self.scale, window=self.window, impl=attn_impl)
        return project(out.reshape(b, t, -1), self.o_proj[...], self.o_proj_int8), k_cache, v_cache

    def forward_flat(self, x: jax.Array, layout, k_cache: jax.Array, v_cache: jax.Array,
                     attn_impl: str, write: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Flattened tokens x [T, d] of several requests (`models.layout.TokenLayout`); attention runs per
        request on the dense grid view, so each token sees only its request's cache, causally.
        write=True: K/V scattered into each token's own request row at its position (padding dropped), then
        attention over the cache; returns (out [T, d], k_cache, v_cache). write=False: the cache is only read
        (slots before each request's first token; `prefix_attention`) and the tokens' own K/V are returned
        instead: (out [T, d], k [T, KVH, D], v [T, KVH, D]) — for a caller that writes them outside a
        conditional, where XLA would otherwise copy the whole cache."""
        t = x.shape[0]
        pos = layout.position[None]
        q = project(x, self.q_proj[...], self.q_proj_int8).reshape(1, t, self.num_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), pos, rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling))
        k, v = self.project_kv(x[None], pos)
        q_grid, pos_grid = to_grid(q[0], layout), to_grid(layout.position, layout, fill=-1)
        if not write:
            out = prefix_attention(q_grid, k_cache, v_cache, pos_grid[:, 0], to_grid(k[0], layout),
                                   to_grid(v[0], layout), pos_grid, pos_grid, scale=self.scale, window=self.window,
                                   impl=attn_impl)
            return project(from_grid(out, layout).reshape(t, -1), self.o_proj[...], self.o_proj_int8), k[0], v[0]
        k_cache = scatter_rows(k_cache, k[0], layout.slot, layout.position)
        v_cache = scatter_rows(v_cache, v[0], layout.slot, layout.position)
        out = attention(q_grid, k_cache, v_cache, pos_grid, scale=self.scale, window=self.window, impl=attn_impl)
        return project(from_grid(out, layout).reshape(t, -1), self.o_proj[...], self.o_proj_int8), k_cache, v_cache

    def forward_block(self, x: jax.Array, positions: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, ctx_len: jax.Array,
              attn_impl: str) -> jax.Array:
        """Drafter block attention: x [B, G, d] attends to cached context K/V (< ctx_len) and, bidirectionally,
        to the whole block. The block's K/V are not cached."""
        b, g, _ = x.shape
        q = project(x, self.q_proj[...], self.q_proj_int8).reshape(b, g, self.num_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), positions, rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling))
        k, v = self.project_kv(x, positions)
        out = block_attention(q, ctx_k, ctx_v, ctx_len, k, v, scale=self.scale, impl=attn_impl)
        return project(out.reshape(b, g, -1), self.o_proj[...], self.o_proj_int8)


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); GeGLU (tanh GELU) for Gemma, SwiGLU for Qwen."""

    def __init__(self, config: TransformerConfig, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.up_proj = param(rngs, (d, f), ("embed", "mlp"), dtype)
        self.down_proj = param(rngs, (f, d), ("mlp", "embed"), dtype)
        self.gate_proj_int8 = nnx.data(None)  # int8 blocks, as Attention's
        self.up_proj_int8 = nnx.data(None)
        self.down_proj_int8 = nnx.data(None)
        self.gelu = config.family == "gemma3"

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = project(x, self.gate_proj[...], self.gate_proj_int8)
        act = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        up = project(x, self.up_proj[...], self.up_proj_int8)
        return project(act * up, self.down_proj[...], self.down_proj_int8)


class DecoderLayer(nnx.Module):
    """Pre-norm decoder layer; Gemma adds post-attention / post-MLP ("sandwich") norms."""

    def __init__(self, config: TransformerConfig, layer: int, dtype, rngs: nnx.Rngs):
        c = config
        self.gemma = c.family == "gemma3"
        norm = lambda: RMSNorm(c.hidden_size, c.rms_norm_eps, self.gemma, dtype)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(c, layer, dtype, rngs)
        self.post_attention_layernorm = norm()
        if self.gemma:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()
        self.mlp = MLP(c, dtype, rngs)

    def wrap_attention(self, x: jax.Array, attend) -> jax.Array:
        """The layer's residual structure around `attend(normed_x) -> attention output`."""
        h = attend(self.input_layernorm(x))
        if self.gemma:
            x = x + self.post_attention_layernorm(h)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))

    def __call__(self, x, positions, k_cache, v_cache, cache_start, attn_impl):
        new_cache = []

        def attend(h):
            out, k, v = self.self_attn(h, positions, k_cache, v_cache, cache_start, attn_impl)
            new_cache.extend((k, v))
            return out

        x = self.wrap_attention(x, attend)
        return x, new_cache[0], new_cache[1]
