"""``openssl s_client`` as a one-shot peer: what it negotiated, what it received.

``s_client(port, *args)`` connects to 127.0.0.1:``port`` with ``-brief``
(the negotiated facts on stderr) and ``-ign_eof`` (it reads until the server
closes, so the application's whole answer arrives), sends ``input`` and
returns a ``Peer`` result.  Debian's openssl is 3.0: it knows X25519, the
NIST curves and X448, not the hybrid post-quantum groups.
"""

import re
import subprocess
from dataclasses import dataclass


@dataclass
class Peer:
    code: int
    out: bytes
    err: str

    def fact(self, name: str) -> str | None:
        """A ``-brief`` line's value, e.g. ``fact("Protocol version")``."""
        found = re.search(rf"^{re.escape(name)}: (.*)$", self.err, re.MULTILINE)
        return found.group(1).strip() if found else None

    @property
    def connected(self) -> bool:
        return "CONNECTION ESTABLISHED" in self.err

    @property
    def protocol(self) -> str | None:
        return self.fact("Protocol version")

    @property
    def cipher(self) -> str | None:
        return self.fact("Ciphersuite")

    @property
    def group(self) -> str | None:
        key = self.fact("Server Temp Key") or self.fact("Negotiated TLS1.3 group")
        return key.split(",")[0] if key else None


def s_client(
    port: int, *args: str, input: bytes = b"", timeout: float = 30, brief: bool = True
) -> Peer:
    """See the module docstring; ``brief=False`` for s_client's full report on stdout."""
    options = ["-brief"] if brief else []
    argv = ["openssl", "s_client", *options, "-ign_eof", "-connect", f"127.0.0.1:{port}", *args]
    res = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
    return Peer(res.returncode, res.stdout, res.stderr.decode(errors="replace"))
