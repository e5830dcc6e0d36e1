"""The errors of the data layer: what is wrong and how to fix it, in one line."""

from __future__ import annotations


class DataError(ValueError):
    """Missing or malformed data; the message says how to get it or fix it."""


class CorruptImageError(DataError):
    """One image that cannot be decoded; ``where`` names its file (or id)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: unreadable image ({reason}); remove or replace the file, or use on_corrupt='skip'")
        self.where = where
