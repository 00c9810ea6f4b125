"""DSpark for Qwen3-4B with the DeepSpec reference values (spec §5): 5 draft layers, γ = 7, Markov rank 256,
taps [1, 9, 17, 25, 33], 512 anchors, lr 6e-4 with 4 % warmup, 10 epochs, global batch 512 (local 1 ×
8 devices × 64 accumulation steps on 8 GPUs; adjust batch_size × grad_accum × data-parallel devices = 512)."""
from dspark_jax.training.trainer import TrainConfig

CONFIG = TrainConfig(algorithm="dspark", gamma=7, num_layers=5, markov_rank=256, markov_head_type="vanilla",
                     draft_vocab_size=None, target_layer_ids=(1, 9, 17, 25, 33), learning_rate=6e-4,
                     warmup_fraction=0.04, weight_decay=0.0, clip_norm=1.0, epochs=10, batch_size=8, grad_accum=64,
                     num_anchors=512, max_len=4096, loss_decay=4.0, loss_weights=(0.1, 0.9, 1.0), seed=42,
                     log_every=10, checkpoint_every=3000, compute_dtype="bfloat16")
