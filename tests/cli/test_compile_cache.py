"""The CLI's persistent XLA compilation cache: where it lives, that it can be switched off, that a configured
cache is left alone, that an unusable directory only turns it off, and that a process that enables it writes its
executables there — also into a directory holding entries written without eviction."""
from __future__ import annotations

import os
import subprocess
import sys

import jax

import pytest

from dspark_jax.utils.compile_cache import (MAX_BYTES_ENV, add_missing_access_times, compilation_cache_dir,
                                            compilation_cache_max_bytes, enable_compilation_cache)


def test_directory_defaults_under_the_user_cache_and_empty_disables(monkeypatch, tmp_path):
    monkeypatch.delenv("DSPARK_XLA_CACHE", raising=False)
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    assert compilation_cache_dir() == tmp_path / "xla"
    monkeypatch.setenv("DSPARK_XLA_CACHE", "")
    assert compilation_cache_dir() is None
    monkeypatch.setenv("DSPARK_XLA_CACHE", "  ")
    assert compilation_cache_dir() is None
    monkeypatch.setenv("DSPARK_XLA_CACHE", str(tmp_path / "other"))
    assert compilation_cache_dir() == tmp_path / "other"
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("DSPARK_XLA_CACHE", "~/xla")
    assert compilation_cache_dir() == tmp_path / "xla"


def test_a_cache_configured_already_is_kept(monkeypatch, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("DSPARK_XLA_CACHE", str(tmp_path / "ignored"))
    try:
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "configured"))
        assert enable_compilation_cache() == tmp_path / "configured"
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "configured")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_max_bytes_from_the_environment(monkeypatch):
    monkeypatch.delenv(MAX_BYTES_ENV, raising=False)
    assert compilation_cache_max_bytes() == 2 << 30
    monkeypatch.setenv(MAX_BYTES_ENV, " -1 ")
    assert compilation_cache_max_bytes() == -1
    for bad in ("0", "-2", "2GiB"):
        monkeypatch.setenv(MAX_BYTES_ENV, bad)
        with pytest.raises(ValueError, match=MAX_BYTES_ENV):
            compilation_cache_max_bytes()


def test_an_unusable_directory_turns_the_cache_off_with_one_line(monkeypatch, tmp_path, capsys):
    before = jax.config.jax_compilation_cache_dir
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("DSPARK_XLA_CACHE", str(blocker / "xla"))
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert enable_compilation_cache() is None
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    err = capsys.readouterr().err
    assert "compilation cache off" in err and str(blocker / "xla") in err and len(err.strip().splitlines()) == 1


def test_entries_written_without_eviction_get_an_access_time(tmp_path):
    (tmp_path / "a-cache").write_bytes(b"x")
    (tmp_path / "b-cache").write_bytes(b"y")
    (tmp_path / "b-atime").write_bytes((7).to_bytes(8, "little"))
    assert add_missing_access_times(tmp_path) == 1
    assert len((tmp_path / "a-atime").read_bytes()) == 8 and (tmp_path / "b-atime").read_bytes()[0] == 7
    assert add_missing_access_times(tmp_path) == 0


SCRIPT = """
import jax, jax.numpy as jnp
from dspark_jax.utils.compile_cache import enable_compilation_cache
print(enable_compilation_cache())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this program compiles in under a second
print(jax.jit(lambda x: jnp.sin(x) * 2 + 1)(jnp.arange(7.0)).sum())
"""


def test_a_process_that_enables_it_writes_its_executables_there(tmp_path):
    env = dict(os.environ, DSPARK_XLA_CACHE=str(tmp_path / "xla"), JAX_PLATFORMS="cpu")
    env.pop(MAX_BYTES_ENV, None)  # the default: eviction on
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    (tmp_path / "xla").mkdir()
    (tmp_path / "xla" / "written_without_eviction-cache").write_bytes(b"x")  # no -atime: JAX's eviction fails on it
    for run in range(2):  # the second run reads what the first wrote
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "Error writing persistent compilation cache" not in out.stderr, out.stderr
        assert out.stdout.splitlines()[0] == str(tmp_path / "xla")
        entries = [p for p in (tmp_path / "xla").iterdir() if p.name.endswith("-cache")]
        assert len(entries) > 1, f"run {run}: nothing cached"
    env["DSPARK_XLA_CACHE"] = ""
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[0] == "None"
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_own")  # JAX's own setting wins over ours
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.splitlines()[0] == str(tmp_path / "jax_own"), out.stderr


def test_a_bad_size_limit_is_a_one_line_error_of_the_command():
    env = dict(os.environ, **{MAX_BYTES_ENV: "2GiB"})
    out = subprocess.run([sys.executable, "-m", "dspark_jax.cli.main", "generate", "--prompt", "hi"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and MAX_BYTES_ENV in out.stderr and "Traceback" not in out.stderr
