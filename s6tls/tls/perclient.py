"""TLS settings per client, from s6-tlsserver's access rules.

An access rule's ``env/`` directory sets variables for the clients it
matches (``net.rules``).  As in s6-networking, where s6-tlsd reads them
after s6-tcpserver-access set them, those that configure TLS apply to that
client's connection: ``CERTFILE``, ``KEYFILE``, ``CAFILE``, ``CADIR``,
``KEYPASSFILE`` and the policy variables (``TLS_CIPHERS``, ``PSKFILE``,
``TLS_PEER_DNS``, ...; ``config.VARIABLES``).  ``TLS_UID``/``TLS_GID``
cannot change per connection (the workers already run as their ids) and
are not among them.

``ClientContexts`` turns the server's environment with a rule's changes
into a context, built once per distinct set of values and kept (at most
``CACHE_MAX``, the least recently used go first), together with the
outcome of a set that cannot be used (its error, until the cache forgets
it), so that a bad rule costs one check, not one per connection.  The
files are read when a rule is first used, by the worker, with its ids.
A worker starts with an empty cache: a reload (SIGHUP, new workers) reads
every rule's files again.
"""

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from OpenSSL import SSL

from ..errors import S6tlsError
from ..net.rules import apply_env
from .config import SECRET_PREFIXES, VARIABLES, Role, TlsConfig
from .context import Contexts, Warn

CACHE_MAX = 32  # distinct sets of TLS settings kept per worker
# What a rule may set for its clients' TLS.
PER_CLIENT = frozenset({"CERTFILE", "KEYFILE", "CAFILE", "CADIR", *(v.name for v in VARIABLES)})


def tls_changes(changes: Sequence[tuple[str, str | None]]) -> dict[str, str | None]:
    """The changes of a rule that configure TLS (a value None unsets the variable)."""
    return {name: value for name, value in changes if name in PER_CLIENT}


@dataclass(frozen=True)
class _Failure:
    """A set of settings that cannot be used: what to raise for it (no traceback kept)."""

    kind: type[S6tlsError]
    message: str


class ClientContexts:
    """The contexts of the rules' TLS settings, for one worker; see the module docstring.

    ``environ`` is the server's environment, ``cfg`` its configuration (its
    options stand for every client); ``warn`` gets the warnings about a
    rule's files (an expired certificate), once, when they are read.
    """

    def __init__(self, role: Role, cfg: TlsConfig, environ: Mapping[str, str], warn: Warn) -> None:
        self.role = role
        self.cfg = cfg
        self.base = {
            k: v for k, v in environ.items() if k in PER_CLIENT or k.startswith(SECRET_PREFIXES)
        }
        self.warn = warn
        self.cache: OrderedDict[tuple, tuple[TlsConfig, SSL.Context] | _Failure] = OrderedDict()

    def get(self, changes: Mapping[str, str | None]) -> tuple[TlsConfig, SSL.Context]:
        """The configuration and context for the server's settings with ``changes``.

        Raises the ``UsageError`` (100) or ``ConfigError`` (96) that the
        configuration or its files give, as at start.
        """
        env = dict(self.base)
        apply_env(env, changes.items())
        key = tuple(sorted(env.items()))
        entry = self.cache.get(key)
        if entry is None:
            entry = self._build(env)
            self.cache[key] = entry
            if len(self.cache) > CACHE_MAX:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        if isinstance(entry, _Failure):
            raise entry.kind(entry.message)
        return entry

    def _build(self, env: Mapping[str, str]) -> tuple[TlsConfig, SSL.Context] | _Failure:
        try:
            cfg = TlsConfig.from_env(self.role, env, self.cfg.options, dtls=self.cfg.dtls)
            return cfg, Contexts(cfg, self.warn, tickets=True).context
        except S6tlsError as exc:
            return _Failure(type(exc), str(exc))
