"""A tiny config for tests and smoke runs."""
from dspark_jax.training.trainer import TrainConfig

CONFIG = TrainConfig(algorithm="dspark", gamma=4, num_layers=1, markov_rank=8, draft_vocab_size=None,
                     learning_rate=3e-3, warmup_fraction=0.1, epochs=2, batch_size=2, num_anchors=8, max_len=64,
                     seed=0, log_every=1, checkpoint_every=3, keep_checkpoints=2)
