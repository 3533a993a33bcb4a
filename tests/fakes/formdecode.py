"""Stripe-style form decoding for the Stripe fake.

Stripe's v1 API takes ``application/x-www-form-urlencoded`` bodies (and query strings) whose
keys nest with brackets: ``payload[value]=3``, ``items[0][price]=price_1``,
``lookup_keys[]=basic``. :func:`decode_form` turns the pairs into nested dicts of strings.
Arrays stay dicts keyed by their index (``{"0": {...}}``) until a handler asks for a list with
:func:`as_list`, so a metadata key that happens to be ``"0"`` is never mistaken for an index.
:func:`unknown_keys` checks raw keys against a route's declared parameter patterns, which is
how the fake answers "Received unknown parameter" like Stripe does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

Form = dict[str, Any]

_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SEGMENT = re.compile(r"\[([^\[\]]*)\]")


class FormError(ValueError):
    """A body or query string that cannot be decoded; ``param`` names the offending key."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def split_key(key: str) -> list[str]:
    """``"items[0][price]"`` -> ``["items", "0", "price"]``; ``"a[]"`` -> ``["a", ""]``."""
    match = _KEY.fullmatch(key)
    if match is None:
        raise FormError(f"Invalid parameter name: {key}", key)
    return [match.group(1), *_SEGMENT.findall(match.group(2))]


def parse_pairs(raw: str) -> list[tuple[str, str]]:
    """Split a urlencoded string into (key, value) pairs, keeping blank values."""
    if not raw:
        return []
    try:
        return parse_qsl(raw, keep_blank_values=True, strict_parsing=True, errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise FormError(f"Invalid form-encoded request: {exc}") from exc


def decode_form(pairs: Iterable[tuple[str, str]]) -> Form:
    """Nest bracketed keys into dicts. ``[]`` appends at the next index.

    A key given twice, or used both as a scalar and as a container, is an error.
    """
    root: Form = {}
    for key, value in pairs:
        segments = split_key(key)
        node = root
        for depth, segment in enumerate(segments):
            name = segment if segment else str(len(node))
            last = depth == len(segments) - 1
            if last:
                if name in node:
                    raise FormError(f"Received the parameter {key} more than once.", key)
                node[name] = value
                break
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise FormError(f"Invalid parameter {key}: {segment or name} is not a hash.", key)
            node = child
    return root


def as_list(value: Any, param: str) -> list[Any]:
    """A decoded array (a dict keyed ``"0"``, ``"1"``...) as a list in index order."""
    if not isinstance(value, dict) or not all(k.isdigit() for k in value):
        raise FormError(f"Invalid array: {param} must be an array.", param)
    indices = sorted(int(k) for k in value)
    if indices != list(range(len(indices))):
        raise FormError(f"Invalid array: the indices of {param} must start at 0 and be contiguous.")
    return [value[str(i)] for i in indices]


def _matches(segments: list[str], pattern: list[str]) -> bool:
    if len(segments) != len(pattern):
        return False
    for seg, pat in zip(segments, pattern, strict=True):
        if pat == "*":
            continue
        if pat == "#":
            if seg and not seg.isdigit():
                return False
            continue
        if seg != pat:
            return False
    return True


def unknown_keys(keys: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The keys that match none of ``patterns``.

    A pattern is a key in bracket syntax where a segment ``#`` stands for an array index
    (digits, or empty for ``[]``) and ``*`` for any single segment (a metadata key).
    """
    compiled = [split_key(p) for p in patterns]
    return [k for k in keys if not any(_matches(split_key(k), p) for p in compiled)]
