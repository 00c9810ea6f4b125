"""API keys → tenants: `Authorization: Bearer <key>` names the tenant of the policy file.

Keys come from a file (one `<key> <tenant>` per line; blank lines and `#` comments ignored) and/or the
environment variable DSPARK_API_KEYS (`key=tenant` pairs separated by commas). A presented key is compared
with every known key in constant time (`hmac.compare_digest`), and keys never appear in errors or logs.
"""
from __future__ import annotations

import hmac
import os
from pathlib import Path

ENV_VAR = "DSPARK_API_KEYS"


class ApiKeys:
    """Known keys and their tenants. Raises ValueError on a malformed source (naming the line, never the key)."""

    def __init__(self, keys: dict[str, str]):
        for key, tenant in keys.items():
            if not key or not tenant or any(c.isspace() for c in key):
                raise ValueError("API keys and tenants must be non-empty and keys may not contain whitespace")
        self._keys = [(key.encode(), tenant) for key, tenant in keys.items()]

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def tenants(self) -> set[str]:
        return {tenant for _, tenant in self._keys}

    def tenant(self, presented: str | None) -> str | None:
        """The tenant of a presented key, or None. Every known key is compared, in constant time each."""
        if not presented:
            return None
        got = presented.encode()
        found = None
        for key, tenant in self._keys:
            if hmac.compare_digest(key, got):
                found = tenant
        return found

    @staticmethod
    def load(path: str | os.PathLike | None = None, environ: dict | None = None) -> "ApiKeys":
        """Keys from `path` (if given) and $DSPARK_API_KEYS (if set)."""
        keys: dict[str, str] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"API key file {path} does not exist")
            for n, line in enumerate(path.read_text().splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{path}:{n}: expected '<key> <tenant>'")
                keys[parts[0]] = parts[1]
        env = (os.environ if environ is None else environ).get(ENV_VAR, "")
        for n, pair in enumerate(p.strip() for p in env.split(",")):
            if not pair:
                continue
            key, sep, tenant = pair.partition("=")
            if not sep or not key.strip() or not tenant.strip():
                raise ValueError(f"${ENV_VAR}: entry {n + 1} is not 'key=tenant'")
            keys[key.strip()] = tenant.strip()
        return ApiKeys(keys)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
