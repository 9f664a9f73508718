"""The error users see for bad input, and how messages list what is present."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["VcjaxInputError", "preview"]


class VcjaxInputError(ValueError):
    """Invalid user input (AnnData content, labels, options). The message names the culprit."""


def preview(items: Sequence[Any], k: int = 5) -> str:
    """The first ``k`` items quoted and comma-separated, with the total when there are more."""
    items = list(items)
    shown = ", ".join(repr(str(x)) for x in items[:k])
    return shown + (f", ... ({len(items)} in total)" if len(items) > k else "")
