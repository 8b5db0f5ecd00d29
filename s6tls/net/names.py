"""Host names and IP literals: what a valid name is, and how one is encoded.

A server name travels as ASCII: LDH labels (letters, digits, hyphens, 1 to
63 octets, no hyphen at either end) joined by dots, at most 253 octets, with
international labels as IDNA 2008 A-labels (``xn--...``).  ``is_host_name``
says whether text is such a name; ``encode_host_name`` turns what a user
typed (``straße.de``, ``Example.COM.``) into it, once, at configuration time,
so that SNI sends and the certificate check matches the same octets.

What a server takes from a client is looser (``server_name``): names on
internal networks and in containers often hold an underscore, and a final
dot is common, so any printable ASCII labels are a name there.
"""

import ipaddress
import re

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)
# 1 to 63 printable ASCII characters but the space and the dot, then a dot, or the end.
_SERVER_NAME = re.compile(rb"(?:[!-\-/-~]{1,63}(?:\.|\Z))+")
MAX_NAME = 253


def is_ip(text: str) -> bool:
    """True for an IPv4 or IPv6 literal."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_host_name(name: str) -> bool:
    """True if ``name`` is an ASCII host name as SNI carries it (no trailing dot)."""
    if not name or len(name) > MAX_NAME or not name.isascii():
        return False
    return all(_LABEL.fullmatch(label) for label in name.split("."))


def server_name(sent: bytes) -> str | None:
    """The server name a client sent (SNI) as a server matches it, or None if it is none.

    A name is labels of 1 to 63 printable ASCII characters (no space, no
    dot) joined by dots, at most 253 in all; the result is in lower case,
    without the one final dot it may have.  None for anything else: a
    control character or a byte outside ASCII, which no log line or
    environment variable may carry, an empty label, a longer name.
    """
    if not _SERVER_NAME.fullmatch(sent):
        return None
    name = sent.decode("ascii").lower().removesuffix(".")
    return name if len(name) <= MAX_NAME else None


def encode_host_name(name: str) -> str:
    """``name`` as an ASCII host name in lower case, international labels IDNA 2008-encoded.

    One trailing dot is dropped.  Raises ``ValueError`` saying why for
    anything that is not a valid host name (an empty or over-long label, a
    character no host name may hold, an invalid A-label).
    """
    text = name[:-1] if name.endswith(".") else name
    if text.isascii() and "xn--" not in text.lower():
        ascii_name = text.lower()
    else:
        import idna  # only for international names; before any privilege drop

        try:
            ascii_name = idna.encode(text, uts46=True, std3_rules=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"not a valid international host name: {exc}") from None
    if not is_host_name(ascii_name):
        raise ValueError(
            "not a valid host name (labels of 1 to 63 letters, digits or hyphens,"
            f" at most {MAX_NAME} characters in all)"
        )
    return ascii_name
