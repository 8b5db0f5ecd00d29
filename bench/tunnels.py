"""The tunnels compared: s6tls, socat (twice) and stunnel, each as a server and a client.

With ``S6TLS_BEFORE`` naming another checkout of s6tls (with its .venv),
its s6-tlsserver and s6-tlsclient run too, as ``s6tls-before``, run by run
beside this one's.

Every tunnel carries the same TLS: TLS 1.3 (each side's default suite,
TLS_AES_256_GCM_SHA384), an ECDSA P-256 certificate for ``localhost``, the
client verifying the chain and the name.  The server side runs the
application itself (s6-tlsserver's prog, socat's ``EXEC``, stunnel's
``exec``).  On the client side s6-tlsclient runs it too; socat and stunnel
talk to it on their stdin/stdout (``STDIO``, and stunnel's inetd mode).

socat runs twice: with its default 8 KiB per read, as most command lines
use it (and as the targets of issue 5 were first measured), and with
``-b 65536``, the 64 KiB s6tls reads, its best here.  Both wait up to 60 s
for the other direction after one ends (``-t``; the default 0.5 s would cut
a transfer short).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .common import BEFORE, ENDPOINT, ROOT, SERVER_NAME, Pki, program


@dataclass(frozen=True)
class Command:
    """A tunnel process to start: its argv and its environment.

    ``app_on_stdio`` means the tool does not start the application itself:
    the benchmark starts it and joins its stdin/stdout to the tool's.
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    app_on_stdio: bool = False


def endpoint(rfd: int, wfd: int, args: Sequence[str]) -> list[str]:
    """The argv of ``bench/endpoint.py`` reading ``rfd`` and writing ``wfd``."""
    return [*ENDPOINT, "--rfd", str(rfd), "--wfd", str(wfd), *args]


def _plain(argv: Sequence[str], special: str) -> str:
    """``argv`` joined by spaces, refusing the characters ``special`` the tool would parse."""
    text = " ".join(argv)
    if any(c in text for c in special):
        raise ValueError(f"cannot pass {text!r} through a tool that parses {special!r}")
    return text


def stunnel_config(path: Path, options: dict[str, str], service: dict[str, str] | None) -> Path:
    """Write a stunnel configuration to ``path``: global ``options``, one ``service``.

    With no service (so no ``accept``) this is stunnel's inetd mode: its
    network side is stdin/stdout and every option is global.  Logs go to
    ``path`` with ``.log`` added, errors only.
    """
    base = {"pid": "", "syslog": "no", "output": f"{path}.log", "debug": "3"}
    lines = [f"{k} = {v}\n" for k, v in {**base, **options}.items()]
    if service is not None:
        lines += ["[bench]\n", *(f"{k} = {v}\n" for k, v in service.items())]
    path.write_text("".join(lines))
    return path


def stunnel_exec(argv: Sequence[str]) -> dict[str, str]:
    """stunnel's ``exec``/``execArgs`` options for running ``argv``."""
    return {"exec": argv[0], "execArgs": _plain([Path(argv[0]).name, *argv[1:]], "\n")}


@dataclass(frozen=True)
class Tunnel:
    """One tool: how to start its server and its client around an endpoint.

    ``server(tmp, pki, port, args)`` and ``client(...)`` return the
    ``Command`` to start, where ``args`` are the endpoint's options beyond
    its descriptors.
    """

    name: str
    server: Callable[[Path, Pki, int, Sequence[str]], Command]
    client: Callable[[Path, Pki, int, Sequence[str]], Command]


def _s6tls(
    role: str,
    options: Sequence[str],
    env: dict[str, str],
    root: Path,
    tmp: Path,
    pki: Pki,
    port: int,
    args: Sequence[str],
) -> Command:
    if role == "server":
        argv = [*program("s6-tlsserver", root), "-H", *options, "127.0.0.1", str(port)]
        keys = {"CERTFILE": pki.cert, "KEYFILE": pki.key}
        return Command([*argv, *endpoint(0, 1, args)], {**keys, **env})
    argv = [*program("s6-tlsclient", root), "-H", *options, "-k", SERVER_NAME]
    argv += ["127.0.0.1", str(port)]
    return Command([*argv, *endpoint(6, 7, args)], {"CAFILE": pki.ca, **env})


def s6tls(
    name: str,
    options: Sequence[str] = (),
    env: dict[str, str] | None = None,
    root: Path = ROOT,
) -> Tunnel:
    """s6-tlsserver and s6-tlsclient of checkout ``root`` (this one by default), both with
    ``options`` and ``env`` (TLS policy...)."""
    env = env or {}
    return Tunnel(
        name,
        partial(_s6tls, "server", options, env, root),
        partial(_s6tls, "client", options, env, root),
    )


def _socat_server(
    options: Sequence[str], tmp: Path, pki: Pki, port: int, args: Sequence[str]
) -> Command:
    listen = f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,cert={pki.cert},key={pki.key}"
    app = "EXEC:" + _plain(endpoint(0, 1, args), ",:!")
    return Command(["socat", *options, f"{listen},verify=0", app])


def _socat_client(
    options: Sequence[str], tmp: Path, pki: Pki, port: int, args: Sequence[str]
) -> Command:
    connect = f"OPENSSL:127.0.0.1:{port},cafile={pki.ca},commonname={SERVER_NAME}"
    return Command(["socat", *options, "STDIO", connect], app_on_stdio=True)


def _stunnel_server(tmp: Path, pki: Pki, port: int, args: Sequence[str]) -> Command:
    conf = stunnel_config(
        tmp / "stunnel-server.conf",
        {"foreground": "yes"},
        {
            "accept": f"127.0.0.1:{port}",
            "cert": pki.cert,
            "key": pki.key,
            **stunnel_exec(endpoint(0, 1, args)),
        },
    )
    return Command(["stunnel", str(conf)])


def _stunnel_client(tmp: Path, pki: Pki, port: int, args: Sequence[str]) -> Command:
    conf = stunnel_config(
        tmp / "stunnel-client.conf",
        {
            "client": "yes",
            "connect": f"127.0.0.1:{port}",
            "CAfile": pki.ca,
            "verifyChain": "yes",
            "checkHost": SERVER_NAME,
            "sni": SERVER_NAME,
        },
        None,
    )
    return Command(["stunnel", str(conf)], app_on_stdio=True)


def _socat(name: str, options: Sequence[str]) -> Tunnel:
    return Tunnel(name, partial(_socat_server, options), partial(_socat_client, options))


S6TLS = s6tls("s6tls")
SOCATS = (_socat("socat", ["-t", "60"]), _socat("socat-b64k", ["-b", "65536", "-t", "60"]))
STUNNEL = Tunnel("stunnel", _stunnel_server, _stunnel_client)
# s6tls-before: the checkout S6TLS_BEFORE names (README.md: the commit before the workers).
BEFORE_TUNNELS = (s6tls("s6tls-before", root=BEFORE),) if BEFORE is not None else ()
TUNNELS = (S6TLS, *BEFORE_TUNNELS, *SOCATS, STUNNEL)
