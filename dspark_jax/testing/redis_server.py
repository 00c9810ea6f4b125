"""A real redis-server on a free loopback port, for the tests of the shared governance store. Tests that need it
fail (never skip) with a clear message when the binary is missing or does not start."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`start()` / `stop()` may alternate (same port: an outage and the return); nothing is persisted."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen | None = None

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: the shared-store tests need a real Redis "
                        "(Debian/Ubuntu: apt-get install redis-server; .ci/run installs it)", pytrace=False)
        self._proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--protected-mode", "no"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.time() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.time() > deadline:
                    out = self._proc.stdout.read().decode(errors="replace") if self._proc.poll() is not None else ""
                    self.stop()
                    pytest.fail(f"redis-server did not start on port {self.port}: {out[-2000:]}", pytrace=False)
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        self._proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)
