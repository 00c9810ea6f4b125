"""Frozen configuration of a decoder-only target transformer (Gemma 3 or Qwen 3)."""
from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["gemma3", "qwen3"]
SUPPORTED_FAMILIES: tuple[str, ...] = ("gemma3", "qwen3")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shapes and numerics of one target model.

    `layer_types[i]` is "sliding_attention" or "full_attention"; `rope_thetas[i]` is the RoPE base of
    layer i. Gemma 3 differs from Qwen 3 by sandwich norms, (1+w) RMSNorm scales, GeGLU, a scaled
    embedding and sliding-window layers; everything else is shared.
    """
    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_thetas: tuple[float, ...]
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None
    query_pre_attn_scalar: float | None = None  # attention scale = scalar ** -0.5 (default head_dim)
    tie_word_embeddings: bool = True
    rope_scaling_factor: float = 1.0  # linear RoPE scaling of full-attention layers (Gemma 3 >= 4B)
    max_position_embeddings: int = 32768
    final_logit_softcapping: float | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    name: str = ""

    def __post_init__(self):
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {SUPPORTED_FAMILIES}")
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                      "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, field) <= 0:
                raise ValueError(f"config field {field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if len(self.layer_types) != self.num_layers or len(self.rope_thetas) != self.num_layers:
            raise ValueError(f"layer_types ({len(self.layer_types)}) and rope_thetas ({len(self.rope_thetas)}) "
                             f"must have num_layers ({self.num_layers}) entries")
        bad = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if bad:
            raise ValueError(f"unknown layer types {sorted(bad)}")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a positive sliding_window")

    def fingerprint(self) -> str:
        """A short hash of everything that shapes the model's computation (not its display name), used to
        check that a drafter or a target cache belongs to this target."""
        import hashlib
        fields = dataclasses.asdict(self)
        fields.pop("name")
        return hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:16]

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embedding_scale(self) -> float:
        return self.hidden_size ** 0.5 if self.family == "gemma3" else 1.0

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None


def gemma3_layer_types(num_layers: int, pattern: int = 6) -> tuple[str, ...]:
    """Gemma 3: every `pattern`-th layer (1-based) is global, the others slide."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))


def gemma3_rope_thetas(layer_types: tuple[str, ...], global_base: float = 1e6,
                       local_base: float = 1e4) -> tuple[float, ...]:
    return tuple(global_base if t == "full_attention" else local_base for t in layer_types)
