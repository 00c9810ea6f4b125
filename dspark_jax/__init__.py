"""dspark-jax: speculative decoding in JAX/Flax."""
