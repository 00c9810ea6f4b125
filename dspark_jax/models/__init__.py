"""Target transformers (Gemma 3, Qwen 3) built from one shared set of Flax NNX layers."""
