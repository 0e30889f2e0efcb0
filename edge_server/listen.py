"""Listening sockets, bound before anything slow happens, and the one-line error when a port is taken.

``rise-edge serve`` binds its websocket port and its ``--metrics-port`` first (:func:`listen`), so a
port in use is one line (:class:`BindError`, exit 2) within a second, not a traceback after the
model loaded. The line names the address and, on Linux, the process holding it when this user may
see it (:func:`port_holder`, read from ``/proc``).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path

from shared.errors import RiseError

_LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class BindError(RiseError):
    """A port could not be listened on (in use, not permitted, an address this machine lacks)."""


def listen(host: str, port: int, what: str, *, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one), for ``what`` (named in the error).

    ``host`` resolves to its first address (``0.0.0.0`` / ``::`` for every interface). Raises
    :class:`BindError` in one line, naming the address and, if known, what holds the port.
    """
    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"cannot listen on {where} ({what}): unknown host {host!r} ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    try:
        return socket.create_server(address[:2] if family == socket.AF_INET else address, family=family,
                                    backlog=backlog)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            holder = port_holder(port)
            reason = "address already in use" + (f" by {holder}" if holder else "")
            hint = f"; stop it or choose another port ({_flag(what)} PORT)"
        elif exc.errno == errno.EACCES:
            hint = f"; ports below 1024 need privileges: choose another ({_flag(what)} PORT)"
        elif exc.errno == errno.EADDRNOTAVAIL:
            hint = "; this machine has no such address (--host)"
        else:
            hint = ""
        raise BindError(f"cannot listen on {where} ({what}): {reason}{hint}") from None


def _flag(what: str) -> str:
    return "--metrics-port" if "metrics" in what else "--port"


def port_holder(port: int, proc: Path = Path("/proc")) -> str | None:
    """``pid N (name)`` of a process listening on TCP ``port``, when ``/proc`` shows it to this user; else None."""
    inodes: set[str] = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[3] == _LISTEN and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(cols[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    try:
        pids = [entry for entry in os.listdir(proc) if entry.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(proc / pid / "fd")
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            try:
                if os.readlink(proc / pid / "fd" / fd) in targets:
                    name = (proc / pid / "comm").read_text().strip()
                    return f"pid {pid} ({name})"
            except OSError:
                continue
    return "another process"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost). Other names count
    as exposed: they may resolve to any interface."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
