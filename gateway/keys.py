"""API keys: `sk-` + 43 random url-safe characters, stored only as a SHA-256 hash and a short prefix.

A key carries 256 bits of randomness, so one fast hash is enough (no password stretching needed);
the plaintext exists only in the response that creates it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

KEY_PREFIX = "sk-"
VISIBLE_CHARS = 12  # "sk-" + 9 characters: enough to tell keys apart in a listing, useless to an attacker


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def visible_prefix(key: str) -> str:
    return key[:VISIBLE_CHARS]


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison of two key hashes."""
    return hmac.compare_digest(a.encode(), b.encode())


def key_from_headers(headers: dict[str, str] | object) -> str | None:
    """The key from `Authorization: Bearer`, `api-key` or `x-api-key` (clients use all three)."""
    get = headers.get  # type: ignore[attr-defined]
    auth = get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return str(value.strip())
    for name in ("api-key", "x-api-key"):
        value = get(name)
        if value and value.strip():
            return str(value.strip())
    return None
