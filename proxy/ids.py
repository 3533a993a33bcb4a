"""Unique ids on the hot path without a system call each: a random prefix per process and a
counter. Unique across replicas (64 random bits) and within one (the counter)."""

from __future__ import annotations

import itertools
import os


class IdSource:
    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        """32 lowercase hex characters, like a W3C trace id."""
        return f"{self._prefix}{next(self._counter):016x}"


request_ids = IdSource()
