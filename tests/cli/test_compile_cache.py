"""The CLI's persistent XLA compilation cache: where it lives, that it can be switched off, that a configured
cache is left alone, and that a process that enables it writes its executables there."""
from __future__ import annotations

import os
import subprocess
import sys

import jax

from dspark_jax.utils.compile_cache import compilation_cache_dir, enable_compilation_cache


def test_directory_defaults_under_the_user_cache_and_empty_disables(monkeypatch, tmp_path):
    monkeypatch.delenv("DSPARK_XLA_CACHE", raising=False)
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    assert compilation_cache_dir() == tmp_path / "xla"
    monkeypatch.setenv("DSPARK_XLA_CACHE", "")
    assert compilation_cache_dir() is None
    monkeypatch.setenv("DSPARK_XLA_CACHE", str(tmp_path / "other"))
    assert compilation_cache_dir() == tmp_path / "other"


def test_a_cache_configured_already_is_kept(monkeypatch, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("DSPARK_XLA_CACHE", str(tmp_path / "ignored"))
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "configured"))
        assert enable_compilation_cache() == tmp_path / "configured"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "configured")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


SCRIPT = """
import jax, jax.numpy as jnp
from dspark_jax.utils.compile_cache import enable_compilation_cache
print(enable_compilation_cache())
print(jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.arange(7.0)).sum())
"""


def test_a_process_that_enables_it_writes_its_executables_there(tmp_path):
    env = dict(os.environ, DSPARK_XLA_CACHE=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")
    for run in range(2):  # the second run reads what the first wrote
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == str(tmp_path / "xla")
        entries = [p for p in (tmp_path / "xla").iterdir() if p.name.endswith("-cache")]
        assert entries, f"run {run}: nothing cached"
    env["DSPARK_XLA_CACHE"] = ""
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "None"
