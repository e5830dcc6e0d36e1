"""README blocks that the scripts generate: the text between ``<!-- NAME:start -->`` and
``<!-- NAME:end -->`` is replaced, the rest of the file kept."""

from __future__ import annotations

import sys
from pathlib import Path


def splice(text: str, name: str, block: str) -> str:
    """``text`` with block ``name`` replaced by ``block``; exits naming the markers when one is missing."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < i:
        sys.exit(f"error: README has no '{start}' ... '{end}' block; add both markers, in that order")
    return text[: i + len(start)] + "\n" + block.strip() + "\n" + text[j:]


def write_block(readme: Path, name: str, block: str) -> None:
    readme.write_text(splice(readme.read_text(), name, block))
