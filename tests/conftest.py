"""Shared fixtures. Tests run on CPU in float32."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_gguf_path():
    from dspark_jax.target import default_gguf_path
    return default_gguf_path()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops every compiled XLA program after each test module. The suite compiles thousands of programs;
    kept alive in one process, their code mappings approach the kernel's vm.max_map_count and XLA:CPU
    aborts while compiling late tests."""
    yield
    import gc

    import jax

    from dspark_jax import generation
    generation._EXECUTABLES.clear()
    jax.clear_caches()
    gc.collect()
