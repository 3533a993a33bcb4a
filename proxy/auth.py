"""API keys: format, keyed hashing and extraction from a request. Pure, no I/O."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

KEY_ID_BYTES = 6
KEY_SECRET_BYTES = 32
MAX_KEY_LEN = 256


def new_key(prefix: str) -> tuple[str, str]:
    """A fresh key and its public id; the id is embedded so `key list` can name keys safely."""
    key_id = secrets.token_hex(KEY_ID_BYTES)
    return f"{prefix}{key_id}_{secrets.token_urlsafe(KEY_SECRET_BYTES)}", key_id


def key_id_of(key: str, prefix: str) -> str | None:
    """The public id part of a well-formed key, or None when the key is not ours."""
    if not key.startswith(prefix):
        return None
    head, sep, _ = key[len(prefix) :].partition("_")
    if not sep or len(head) != KEY_ID_BYTES * 2:
        return None
    return head


def hash_key(key: str, pepper: str) -> str:
    """HMAC-SHA256 with a server-side pepper: a leaked Redis dump alone cannot check guesses."""
    return hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()


def keys_match(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def extract_key(headers: Mapping[str, str]) -> str | None:
    """The tenant key from `Authorization: Bearer <key>` or `X-API-Key`, else None."""
    token = _offered(headers)
    return None if token is None else _plausible(token)


def key_offered(headers: Mapping[str, str]) -> bool:
    """Whether the request offers a key at all, usable or not: a refusal then says the key is
    invalid rather than missing (RFC 6750: no credentials at all is not an invalid token)."""
    return _offered(headers) is not None


def _offered(headers: Mapping[str, str]) -> str | None:
    """The non-empty token where a key goes (the Bearer token, else X-API-Key), unchecked."""
    auth = headers.get("Authorization")
    if auth is not None:
        scheme, _, token = auth.strip().partition(" ")
        token = token.strip()
        return token if token and scheme.lower() == "bearer" else None
    api_key = headers.get("X-API-Key")
    if api_key is not None:
        return api_key.strip() or None
    return None


def _plausible(token: str) -> str | None:
    """Keys are printable ASCII; anything else cannot be one (and must not reach hashing)."""
    ok = 0 < len(token) <= MAX_KEY_LEN and token.isascii() and token.isprintable()
    return token if ok else None
