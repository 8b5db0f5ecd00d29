"""One line from a pyOpenSSL error, for a message or a log line.

``ssl_error_text`` is the reason OpenSSL gives (or the system error behind
it); ``error_reason`` words a failure on an established connection.
"""

import os

from OpenSSL import SSL


def error_reason(exc: SSL.Error) -> str:
    """One line for a failure on an established connection."""
    if isinstance(exc, SSL.SysCallError) or _system_error(exc):
        return f"connection broken: {ssl_error_text(exc)}"
    return f"TLS error: {ssl_error_text(exc)}"


def _system_error(exc: SSL.Error) -> bool:
    """True for an ``SSL.Error`` that only reports failed system calls.

    Once a socket call failed (a reset, say), OpenSSL reports the next
    failure as a "system library" entry whose reason text is empty, and
    pyOpenSSL raises it as a plain ``SSL.Error``, without the errno.
    """
    args = exc.args[0] if exc.args else None
    return (
        isinstance(args, list)
        and bool(args)
        and all(isinstance(e, tuple) and e[0] == "system library" and not e[2] for e in args)
    )


def ssl_error_text(exc: SSL.Error) -> str:
    """One line from a pyOpenSSL error: its OpenSSL reasons, or the system error."""
    if isinstance(exc, SSL.SysCallError):
        code = exc.args[0] if exc.args else -1
        return os.strerror(code) if isinstance(code, int) and code > 0 else "unexpected EOF"
    args = exc.args[0] if exc.args else []
    if isinstance(args, list) and args and isinstance(args[0], tuple):
        text = "; ".join(reason for (_lib, _func, reason) in args if reason)
        if text:
            return text
        return "a system call failed" if _system_error(exc) else "no reason given by OpenSSL"
    if args == []:  # OpenSSL gives no reason once a connection has failed
        return "connection already failed"
    return str(exc) or type(exc).__name__
