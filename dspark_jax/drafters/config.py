"""Frozen drafter configuration and the default rule for tapped target layers."""
from __future__ import annotations

import dataclasses
from typing import Literal

from dspark_jax.models.config import TransformerConfig

Algorithm = Literal["dspark", "dflash", "eagle3"]
ALGORITHMS: tuple[str, ...] = ("dspark", "dflash", "eagle3")
MARKOV_HEAD_TYPES: tuple[str, ...] = ("vanilla", "gated", "rnn")


def default_target_layer_ids(num_target_layers: int, count: int = 5) -> tuple[int, ...]:
    """DFlash's rule, spreading `count` ids evenly over [1, L-3]: 36 layers -> (1, 9, 17, 25, 33).

    Shallow targets get fewer ids (never duplicates, never the last layer)."""
    hi = max(num_target_layers - 3, 1)
    count = max(1, min(count, hi))
    if count == 1:
        return (min(1, num_target_layers - 2),) if num_target_layers > 1 else (0,)
    ids = [1 + round(i * (hi - 1) / (count - 1)) for i in range(count)]
    return tuple(sorted(set(ids)))


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    """What a drafter is and which target it fits.

    block_size (γ): draft tokens per round. DSpark/DFlash: anchor + (γ-1) mask tokens predict γ tokens.
    markov_rank 0 disables the Markov head; confidence_head False disables the confidence head
    (DFlash = both off). draft_vocab_size None = the target's full vocabulary.
    lookup_inputs n > 0 (DSpark/DFlash; our deviation from the paper, 0 = the paper's drafter): block slot k
    also reads the token a prompt lookup over the committed text (last n..1 tokens) proposes for the position
    it predicts, so copying is an input the drafter learns to trust or overrule; without it a parallel
    drafter learns to copy only its first slot (`tests/training/test_copy_learning.py`).
    """
    algorithm: Algorithm
    target_layer_ids: tuple[int, ...]
    block_size: int = 7
    num_layers: int = 5
    mask_token_id: int = 0
    markov_rank: int = 256
    markov_head_type: str = "vanilla"
    confidence_head: bool = True
    confidence_with_markov: bool = True
    draft_vocab_size: int | None = None
    lookup_inputs: int = 0

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown draft algorithm {self.algorithm!r}; choose from {ALGORITHMS}")
        if self.block_size < 1:
            raise ValueError(f"block_size (gamma) must be >= 1, got {self.block_size}")
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not self.target_layer_ids or list(self.target_layer_ids) != sorted(set(self.target_layer_ids)):
            raise ValueError(f"target_layer_ids must be non-empty and strictly increasing, got {self.target_layer_ids}")
        if self.markov_rank < 0:
            raise ValueError(f"markov_rank must be >= 0, got {self.markov_rank}")
        if self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise ValueError(f"unknown markov_head_type {self.markov_head_type!r}; choose from {MARKOV_HEAD_TYPES}")
        if self.lookup_inputs < 0 or (self.lookup_inputs and self.algorithm == "eagle3"):
            raise ValueError(f"lookup_inputs must be >= 0 (and 0 for eagle3), got {self.lookup_inputs}")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 2:
            raise ValueError(f"draft_vocab_size must be >= 2 or None, got {self.draft_vocab_size}")
        if self.algorithm == "dflash" and (self.markov_rank or self.confidence_head):
            raise ValueError("dflash has neither a Markov head nor a confidence head (markov_rank=0, "
                             "confidence_head=False)")
        if self.algorithm == "eagle3" and self.num_layers != 1:
            raise ValueError(f"eagle3 drafters have exactly one layer, got num_layers={self.num_layers}")
        if self.algorithm == "eagle3" and -1 in self.target_layer_ids:
            raise ValueError("eagle3 cannot tap the embedding output (layer id -1)")

    @property
    def uses_confidence_markov_input(self) -> bool:
        return self.confidence_head and self.confidence_with_markov and self.markov_rank > 0

    def check_fits(self, target: TransformerConfig) -> None:
        """Raises ValueError naming the mismatch if this drafter cannot serve `target`."""
        bad = [i for i in self.target_layer_ids if not -1 <= i < target.num_layers - 1]
        if bad:
            raise ValueError(f"drafter taps target layers {bad}, but the target has {target.num_layers} layers "
                             f"(valid ids: -1..{target.num_layers - 2}; the last layer cannot be tapped)")
        if not 0 <= self.mask_token_id < target.vocab_size:
            raise ValueError(f"mask_token_id {self.mask_token_id} is outside the target vocabulary "
                             f"({target.vocab_size})")
        if self.draft_vocab_size is not None and self.draft_vocab_size > target.vocab_size:
            raise ValueError(f"draft_vocab_size {self.draft_vocab_size} exceeds the target vocabulary "
                             f"({target.vocab_size})")


def make_drafter_config(algorithm: str, target: TransformerConfig, *, block_size: int = 7,
                        num_layers: int | None = None, mask_token_id: int | None = None,
                        draft_vocab_size: int | None = None, markov_rank: int = 256,
                        markov_head_type: str = "vanilla", target_layer_ids: tuple[int, ...] | None = None,
                        lookup_inputs: int = 0) -> DrafterConfig:
    """Paper defaults for each algorithm, fitted to `target`."""
    ids = tuple(target_layer_ids) if target_layer_ids else default_target_layer_ids(target.num_layers)
    mask = mask_token_id if mask_token_id is not None else default_mask_token_id(target)
    if algorithm == "eagle3":
        return DrafterConfig("eagle3", ids, block_size=block_size, num_layers=1, mask_token_id=mask,
                             markov_rank=0, confidence_head=False, draft_vocab_size=draft_vocab_size)
    dspark = algorithm == "dspark"
    return DrafterConfig(algorithm, ids, block_size=block_size, num_layers=num_layers or 5, mask_token_id=mask,
                         markov_rank=markov_rank if dspark else 0, markov_head_type=markov_head_type,
                         confidence_head=dspark, draft_vocab_size=draft_vocab_size, lookup_inputs=lookup_inputs)


def default_mask_token_id(target: TransformerConfig) -> int:
    """Gemma's `<mask>` (id 4); Qwen3's first padding row past the tokenizer (151669); else the last row."""
    if target.family == "gemma3" and target.vocab_size > 4:
        return 4
    if target.family == "qwen3" and target.vocab_size == 151936:
        return 151669
    return target.vocab_size - 1
