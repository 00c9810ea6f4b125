"""Tiny random target configs for tests (fast on CPU, exercise every architectural feature)."""
from __future__ import annotations

from dspark_jax.models.config import TransformerConfig, gemma3_layer_types, gemma3_rope_thetas


def tiny_gemma3(vocab_size: int = 97, num_layers: int = 4, sliding_window: int = 4) -> TransformerConfig:
    """Alternating sliding/global layers with distinct RoPE bases, MQA-style GQA (4 heads / 2 KV heads)."""
    lt = gemma3_layer_types(num_layers, 2)
    return TransformerConfig(family="gemma3", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                             num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=8,
                             rope_thetas=gemma3_rope_thetas(lt), layer_types=lt, sliding_window=sliding_window,
                             max_position_embeddings=512, name="tiny-gemma3")


def tiny_qwen3(vocab_size: int = 97, num_layers: int = 2, tie: bool = False) -> TransformerConfig:
    """MQA (4 heads / 1 KV head), untied head by default."""
    return TransformerConfig(family="qwen3", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                             num_layers=num_layers, num_heads=4, num_kv_heads=1, head_dim=8,
                             rope_thetas=(1e4,) * num_layers, layer_types=("full_attention",) * num_layers,
                             tie_word_embeddings=tie, max_position_embeddings=512, name="tiny-qwen3")
