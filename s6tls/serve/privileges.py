"""Whom a connection runs as: the ids asked for, checked at start, applied once.

The ids come from ``-u``/``-g``/``-U`` (``s6-tlsserver``) or from
``TLS_UID``/``TLS_GID`` (every program).  ``check_ids`` refuses at start
what could never work: a uid without a gid (the process would keep root's
group and supplementary groups), or a change of ids asked of a process that
is not root.  ``drop_privileges`` then always sets the supplementary groups
(none, unless a list is given) before the gid and the uid; ``as_ids`` runs
a check of the start-up as those ids (a directory they must write to).
"""

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from ..errors import SystemFailure, UsageError
from ..numbers import decimal, gid_list
from ..tls.config import TlsConfig


@dataclass(frozen=True)
class Ids:
    """The uid, gid and supplementary groups to become; None: keep ours."""

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()
    names: tuple[str, str] = ("TLS_UID", "TLS_GID")  # where they come from, for messages

    @property
    def wanted(self) -> bool:
        return self.uid is not None or self.gid is not None


def ids_from_options(
    uid: int | None,
    gid: int | None,
    from_env: bool,
    environ: Mapping[str, str],
    groups: tuple[int, ...] = (),
) -> Ids:
    """``-u``/``-g``/``-G``, or with ``-U`` the UID, GID and GIDLIST variables of s6-envuidgid.

    Raises ``UsageError`` for a variable that is missing or not numeric, and
    for supplementary groups (-G) without a gid.
    """
    if not from_env:
        if groups and gid is None:
            raise UsageError("-G needs -g: the supplementary groups go with a gid")
        return Ids(uid, gid, groups, names=("-u", "-g"))
    groups = gid_list(environ.get("GIDLIST", ""), "-U: GIDLIST")  # checked first, as ever
    return Ids(_env_id(environ, "UID"), _env_id(environ, "GID"), groups, names=("UID", "GID"))


def _env_id(environ: Mapping[str, str], name: str) -> int:
    value = decimal(environ.get(name, ""))
    if value is None:
        raise UsageError(f"-U needs a numeric {name} in the environment")
    return value


def ids_from_config(cfg: TlsConfig) -> Ids:
    """TLS_UID and TLS_GID, where 0 or unset means no change."""
    return Ids(cfg.uid or None, cfg.gid or None)


def check_ids(ids: Ids) -> Ids:
    """The ids to apply, after refusing at start what can never work.

    Returns ``Ids()`` when there is nothing to change (nothing asked, or a
    process that is not root asked for the ids it already has).

    Raises ``UsageError`` (100) for a uid without a gid or a gid without a
    uid, and for a process that is not root asking to become someone else
    (setgid and setuid would fail on every connection).
    """
    if not ids.wanted:
        return Ids()
    uid_name, gid_name = ids.names
    if ids.uid is not None and ids.gid is None:
        raise UsageError(
            f"{uid_name} needs {gid_name}: with a uid alone,"
            " the process would keep root's group and supplementary groups"
        )
    if ids.gid is not None and ids.uid is None and os.geteuid() == 0:
        raise UsageError(
            f"{gid_name} needs {uid_name}: with a gid alone, the process would stay root"
        )
    euid, egid = os.geteuid(), os.getegid()
    if euid == 0:
        return ids
    if ids.uid in (None, euid) and ids.gid in (None, egid) and not ids.groups:
        return Ids()
    raise UsageError(
        f"unable to become uid {_show(ids.uid)} gid {_show(ids.gid)} ({uid_name}, {gid_name}):"
        f" setgid and setuid need root, and this process runs as uid {euid}"
    )


def _show(value: int | None) -> str:
    return "-" if value is None else str(value)


@contextlib.contextmanager
def as_ids(ids: Ids) -> Iterator[None]:
    """Run the block as ``ids`` would (effective ids and groups), then as before.

    For the checks at start of what the connections will do after the drop
    (a directory they write to): root, and only root, can switch back.
    Nothing changes when ``ids`` asks for nothing.  Raises ``SystemFailure``
    if the kernel refuses.
    """
    if not ids.wanted:
        yield
        return
    groups, egid, euid = os.getgroups(), os.getegid(), os.geteuid()
    _take(ids, os.setegid, os.seteuid, "take the ids to check them")
    try:
        yield
    finally:
        os.seteuid(euid)
        os.setegid(egid)
        os.setgroups(groups)


def drop_privileges(ids: Ids) -> None:
    """Become ``ids`` (checked by ``check_ids``): groups, then gid, then uid.

    Called after the keys are read and before the handshake.  The
    supplementary groups are always replaced (by ``ids.groups``, usually
    none).  Raises ``SystemFailure`` (111) if the kernel refuses.

    Everything a connection needs is imported by then (``program.start``
    sees to it before it builds the contexts): the new user may not be allowed to
    read the Python installation (one under a 0700 home, for instance).
    """
    if ids.wanted:
        _take(ids, os.setgid, os.setuid, "drop privileges")


def _take(
    ids: Ids, setgid: Callable[[int], None], setuid: Callable[[int], None], what: str
) -> None:
    """The groups of ``ids``, then its gid and uid, with ``setgid`` and ``setuid``.

    Raises ``SystemFailure``, "unable to ``what``", if the kernel refuses.
    """
    try:
        os.setgroups(list(ids.groups))
        if ids.gid is not None:
            setgid(ids.gid)
        if ids.uid is not None:
            setuid(ids.uid)
    except OSError as exc:
        raise SystemFailure(f"unable to {what}: {exc.strerror}") from None
