"""Tests for proxy.auth: key format, key ids, peppered hashing and header extraction."""

from __future__ import annotations

import hashlib
import hmac
import re

import pytest
from multidict import CIMultiDict

from proxy.auth import (
    KEY_ID_BYTES,
    MAX_KEY_LEN,
    extract_key,
    hash_key,
    key_id_of,
    key_offered,
    keys_match,
    new_key,
)

PREFIX = "mqp_"
PEPPER = "unit-test-pepper-0123456789"


def headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


# --- new_key / key_id_of --------------------------------------------------------------------


def test_new_key_format() -> None:
    key, key_id = new_key(PREFIX)
    assert re.fullmatch(rf"[0-9a-f]{{{KEY_ID_BYTES * 2}}}", key_id)
    assert key.startswith(f"{PREFIX}{key_id}_")
    secret = key[len(PREFIX) + len(key_id) + 1 :]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", secret)  # token_urlsafe(32)
    assert len(key) <= MAX_KEY_LEN


def test_new_key_is_unique() -> None:
    pairs = [new_key(PREFIX) for _ in range(200)]
    assert len({k for k, _ in pairs}) == 200
    assert len({i for _, i in pairs}) == 200


def test_new_key_round_trips_through_key_id_of() -> None:
    for prefix in ("mqp_", "acme_", "x"):
        key, key_id = new_key(prefix)
        assert key_id_of(key, prefix) == key_id


def test_new_key_is_extractable_from_headers() -> None:
    key, _ = new_key(PREFIX)
    assert extract_key(headers(("Authorization", f"Bearer {key}"))) == key


@pytest.mark.parametrize(
    "key",
    [
        "",
        "mqp_",
        "sk_live_0123456789ab_secret",
        "MQP_0123456789ab_secret",  # prefix is case-sensitive
        "mqp_0123456789absecret",  # no separator after the id
        "mqp_0123456789a_secret",  # id one character short
        "mqp_0123456789abc_secret",  # id one character long
        "mqp__secret",
    ],
)
def test_key_id_of_rejects_foreign_or_malformed(key: str) -> None:
    assert key_id_of(key, PREFIX) is None


def test_key_id_of_rejects_key_with_another_prefix() -> None:
    key, _ = new_key("acme_")
    assert key_id_of(key, PREFIX) is None


# --- hashing --------------------------------------------------------------------------------


def test_hash_key_is_hex_sha256() -> None:
    digest = hash_key("mqp_0123456789ab_secret", PEPPER)
    assert re.fullmatch(r"[0-9a-f]{64}", digest)


def test_hash_key_is_deterministic() -> None:
    assert hash_key("k", PEPPER) == hash_key("k", PEPPER)


def test_hash_key_depends_on_pepper() -> None:
    key = "mqp_0123456789ab_secret"
    assert hash_key(key, PEPPER) != hash_key(key, PEPPER + "x")
    assert hash_key(key, PEPPER) != hashlib.sha256(key.encode()).hexdigest()


def test_hash_key_depends_on_key() -> None:
    assert hash_key("a", PEPPER) != hash_key("b", PEPPER)


def test_hash_key_is_hmac_sha256_keyed_by_pepper() -> None:
    expected = hmac.new(PEPPER.encode(), b"the-key", hashlib.sha256).hexdigest()
    assert hash_key("the-key", PEPPER) == expected


def test_keys_match() -> None:
    assert keys_match(hash_key("a", PEPPER), hash_key("a", PEPPER))
    assert not keys_match(hash_key("a", PEPPER), hash_key("b", PEPPER))


# --- extract_key ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["Bearer tok", "bearer tok", "BEARER tok", "  Bearer   tok  ", "Bearer tok\t"],
)
def test_extract_key_from_bearer(value: str) -> None:
    assert extract_key(headers(("Authorization", value))) == "tok"


def test_extract_key_header_name_is_case_insensitive() -> None:
    assert extract_key(headers(("authorization", "Bearer tok"))) == "tok"
    assert extract_key(headers(("x-api-key", "tok"))) == "tok"


@pytest.mark.parametrize("value", ["tok", "  tok ", "\ttok"])
def test_extract_key_from_x_api_key(value: str) -> None:
    assert extract_key(headers(("X-API-Key", value))) == "tok"


def test_bearer_wins_over_x_api_key() -> None:
    found = extract_key(
        headers(("X-API-Key", "from-header"), ("Authorization", "Bearer from-auth"))
    )
    assert found == "from-auth"


@pytest.mark.parametrize(
    "value",
    ["Basic dXNlcjpwYXNz", "Token tok", "tok", "Bearer", "Bearer ", "Bearer    ", ""],
)
def test_extract_key_rejects_other_schemes_and_empty_tokens(value: str) -> None:
    assert extract_key(headers(("Authorization", value))) is None


@pytest.mark.parametrize("value", ["", "   "])
def test_extract_key_rejects_empty_x_api_key(value: str) -> None:
    assert extract_key(headers(("X-API-Key", value))) is None


def test_extract_key_length_limit_for_bearer() -> None:
    longest = "k" * MAX_KEY_LEN
    assert extract_key(headers(("Authorization", f"Bearer {longest}"))) == longest
    assert extract_key(headers(("Authorization", f"Bearer {longest}k"))) is None


def test_extract_key_length_limit_for_x_api_key() -> None:
    longest = "k" * MAX_KEY_LEN
    assert extract_key(headers(("X-API-Key", longest))) == longest
    assert extract_key(headers(("X-API-Key", longest + "k"))) is None


def test_extract_key_without_credentials() -> None:
    assert extract_key(headers()) is None
    assert extract_key(headers(("Cookie", "key=tok"), ("X-Api-Token", "tok"))) is None


# --- key_offered: "invalid API key" versus "API key required" -------------------------------


@pytest.mark.parametrize(
    "pairs",
    [
        (("Authorization", "Bearer mqp_000000000000_unknown"),),
        (("Authorization", "bearer tok"),),
        (("Authorization", "Bearer " + "k" * (MAX_KEY_LEN + 1)),),  # offered, but unusable
        (("Authorization", "Bearer caf\u00e9"),),
        (("X-API-Key", "not-a-key"),),
    ],
    ids=["bearer", "lower-case-scheme", "too-long", "non-ascii", "x-api-key"],
)
def test_a_token_in_the_key_places_is_offered(pairs: tuple[tuple[str, str], ...]) -> None:
    assert key_offered(headers(*pairs))


@pytest.mark.parametrize(
    "pairs",
    [
        (),
        (("Authorization", "Bearer "),),
        (("Authorization", "Bearer"),),
        (("Authorization", "Basic dXNlcjpwYXNz"),),  # another scheme: no key was offered
        (("Authorization", "Token tok"), ("X-API-Key", "tok")),  # Authorization decides
        (("X-API-Key", "  "),),
    ],
    ids=["nothing", "empty-bearer", "bare-bearer", "basic", "other-scheme-wins", "blank"],
)
def test_no_token_is_not_offered(pairs: tuple[tuple[str, str], ...]) -> None:
    assert not key_offered(headers(*pairs))
