"""DSpark for the embedded Gemma 3 270M, sized for a 2-core CPU (the equal-budget comparison run; the shipped
default trains the same drafter longer: gemma3_270m_dspark_default.py).

One draft layer, 3 tapped target layers, Markov rank 64, a 16,384-token draft vocabulary: a drafter that
costs a fraction of one verification on CPU and fits the 25 MB budget in bfloat16.
"""
from dspark_jax.training.trainer import TrainConfig

CONFIG = TrainConfig(algorithm="dspark", gamma=7, num_layers=1, markov_rank=64, draft_vocab_size=16384,
                     target_layer_ids=(1, 8, 15), learning_rate=1e-3, warmup_fraction=0.04, epochs=4,
                     batch_size=4, grad_accum=1, num_anchors=48, max_len=384, seed=42, log_every=10,
                     checkpoint_every=100)
