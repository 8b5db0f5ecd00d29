"""Decimal numbers as the command line and the environment give them.

Every integer s6tls reads from text goes through ``decimal``: ASCII digits
only, so no sign, space, underscore or digit of another script gets in.
The callers word their own messages (``UsageError``, exit 100).
"""

from .errors import UsageError


def decimal(text: str) -> int | None:
    """``text`` as an integer if it is ASCII digits only, else None."""
    return int(text) if text.isascii() and text.isdigit() else None


def gid_list(text: str, name: str) -> tuple[int, ...]:
    """Comma-separated numeric group ids (an empty list for "").

    Raises ``UsageError`` naming ``name`` for anything else.
    """
    parts = [decimal(p) for p in text.split(",")] if text else []
    if None in parts:
        raise UsageError(f"{name} must be a comma-separated list of gids, not {text!r}")
    return tuple(p for p in parts if p is not None)
