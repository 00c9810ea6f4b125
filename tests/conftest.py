"""Shared fixtures. Tests run on CPU in float32."""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
    """A persistent XLA compilation cache: the suite compiles the same tiny programs in many modules (and the
    compiled programs are dropped after each module, below); reading them back from disk instead of compiling
    again (measured: tests/governance/test_governed_engine.py 36 s cold, 12 s warm). $DSPARK_TEST_JAX_CACHE overrides the directory ('' disables); CLI
    subprocesses use it too ($DSPARK_XLA_CACHE, `dspark_jax.utils.compile_cache`)."""
    from pathlib import Path

    from dspark_jax.utils.compile_cache import MAX_BYTES_ENV, configure_compilation_cache
    directory = os.environ.get("DSPARK_TEST_JAX_CACHE",
                               os.path.join(os.path.expanduser("~"), ".cache", "dspark_jax", "jax_test_cache"))
    if directory:
        # the CLI subprocesses tests start share it, without eviction as here (JAX's eviction scans every entry
        # on each write: the suite writes thousands)
        os.environ.setdefault("DSPARK_XLA_CACHE", directory)
        os.environ.setdefault(MAX_BYTES_ENV, "-1")
        configure_compilation_cache(Path(directory), max_bytes=-1, min_compile_s=0.0)


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
    from dspark_jax.generation import release_compiled_programs
    release_compiled_programs()


@pytest.fixture(scope="session")
def redis_server():
    """One real redis-server for the session (tests keep apart by key prefix: see `store_prefix`)."""
    from dspark_jax.testing.redis_server import RedisServer
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def store_prefix(request):
    """A key prefix of this test alone."""
    import re
    return "t" + re.sub(r"[^A-Za-z0-9]", "", request.node.name)[-40:] + str(id(request))[-6:]


@pytest.fixture(params=["memory", "redis"])
def store_kind(request):
    """Parametrizes a test over the governance stores: in-process, and Redis (a real redis-server)."""
    return request.param


@pytest.fixture
def store_section(store_kind, request, store_prefix):
    """The policy's `store` section for the kind under test ({} = the in-process default); Redis leases long
    enough never to expire under fake clocks, rollback states re-read at every use."""
    if store_kind == "memory":
        return {}
    return {"store": {"url": request.getfixturevalue("redis_server").url, "key_prefix": store_prefix,
                      "lease_s": 1e9, "sync_s": 0}}
