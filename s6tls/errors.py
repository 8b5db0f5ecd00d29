"""The exception tree and the exit codes of s6tls.

Every failure s6tls can report is one of these exceptions; ``cli.failure`` is
the only place that turns one into its line on stderr and its exit code.  An
``OSError`` that escapes is a system call failure (111).
"""

from enum import IntEnum


class ExitCode(IntEnum):
    """The exit codes of s6tls itself, as s6-networking defines them."""

    OK = 0
    REFUSED = 1  # a connection refused before TLS: access rules, PROXY header
    CONFIG = 96  # TLS configuration: unreadable or bad certificate, key or CA
    HANDSHAKE = 97  # handshake failed, or the peer was rejected
    TLS = 98  # TLS error after the handshake; also the handshake timeout
    USAGE = 100  # bad option, bad or missing environment
    SYSTEM = 111  # a system call failed
    CANNOT_EXEC = 126  # the application is not executable (as a shell says it)
    NOT_FOUND = 127  # the application is not found


class S6tlsError(Exception):
    """Base of every error s6tls reports; ``exit_code`` says how it exits."""

    exit_code: ExitCode = ExitCode.SYSTEM


class UsageError(S6tlsError):
    """Bad command line or environment (missing CERTFILE, bad TLS_UID, ...)."""

    exit_code = ExitCode.USAGE


class ConfigError(S6tlsError):
    """A certificate, key or trust anchor that cannot be read or used."""

    exit_code = ExitCode.CONFIG


class HandshakeError(S6tlsError):
    """The handshake failed, or a check of the peer rejected it."""

    exit_code = ExitCode.HANDSHAKE


class TlsRuntimeError(S6tlsError):
    """A TLS error after the handshake: bad record, alert, truncation under -J."""

    exit_code = ExitCode.TLS


class HandshakeTimeout(TlsRuntimeError):
    """The handshake did not finish within -K milliseconds (exit 98, as s6 documents)."""


class Refused(S6tlsError):
    """A connection refused before TLS: denied by the access rules, or a bad PROXY header."""

    exit_code = ExitCode.REFUSED


class SystemFailure(S6tlsError):
    """A system call failed; the message says what s6tls was unable to do (111)."""

    exit_code = ExitCode.SYSTEM


class AppNotExecutable(S6tlsError):
    """The application exists but cannot be executed: refused at start (126)."""

    exit_code = ExitCode.CANNOT_EXEC


class AppNotFound(S6tlsError):
    """The application is not found, in PATH or at its path: refused at start (127)."""

    exit_code = ExitCode.NOT_FOUND
