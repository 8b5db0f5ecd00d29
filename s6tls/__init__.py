"""s6tls: the TLS tools of s6-networking, and the engine behind them.

The public names are imported lazily (PEP 562), so that ``s6-tlsd``, started
once per connection, pays only for the modules it uses.  The handshake
function is ``s6tls.tls.handshake.handshake``.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ExitCode",
    "HandshakeError",
    "HandshakeTimeout",
    "Options",
    "S6tlsError",
    "SelfPipe",
    "TlsConfig",
    "TlsRuntimeError",
    "UsageError",
    "build_context",
    "connection_facts",
    "new_link",
    "run",
]

_HOMES = {
    "ConfigError": "errors",
    "ExitCode": "errors",
    "HandshakeError": "errors",
    "HandshakeTimeout": "errors",
    "S6tlsError": "errors",
    "TlsRuntimeError": "errors",
    "UsageError": "errors",
    "Options": "tls.config",
    "TlsConfig": "tls.config",
    "SelfPipe": "selfpipe",
    "build_context": "tls.context",
    "connection_facts": "tls.handshake",
    "new_link": "link",
    "run": "engine",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 's6tls' has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value
