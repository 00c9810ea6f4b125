"""Sampling, KV-cache decoding loops (autoregressive baseline; speculative loop builds on it)."""
