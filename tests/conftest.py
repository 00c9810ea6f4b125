"""Shared fixtures. Tests run on CPU in float32."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_gguf_path():
    from dspark_jax.target import default_gguf_path
    return default_gguf_path()
