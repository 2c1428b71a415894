"""Which devices to deploy to: ``--host`` values and ``--hosts FILE`` (a fleet).

A hosts file has one device per line::

    # user@host[:port]   [identity=FILE] [python=PATH] [root=DIR]
    nvidia@orin-01
    nvidia@orin-02:2222  identity=~/.ssh/orin_ed25519
    nvidia@[fd00::12]:22 python=/usr/bin/python3.10 root="/data/edgekit"

Blank lines and ``#`` comments are ignored; values may be quoted (shell rules). Every
problem is a :class:`DeployError` naming ``FILE:LINE``. Host and user names are checked
strictly: they end up on ssh's command line, and a name starting with ``-`` would be an option.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from edgekit.errors import DeployError

_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?")
FIELDS = ("identity", "python", "root")
SPEC_HELP = "write [USER@]HOST[:PORT], e.g. nvidia@orin-01 or nvidia@192.168.1.20:2222 ([IPV6]:PORT for IPv6)"


@dataclass(frozen=True)
class HostSpec:
    """One device. ``None`` fields fall back to the command-line defaults (see :meth:`with_defaults`)."""

    host: str
    user: str | None = None
    port: int | None = None
    identity: str | None = None
    python: str | None = None
    root: str | None = None

    @property
    def label(self) -> str:
        """``user@host[:port]`` as the user wrote it: names the host in tables, errors and report paths."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{self.user}@{host}" if self.user else host
        return f"{text}:{self.port}" if self.port else text

    @property
    def destination(self) -> str:
        """What ssh and rsync take: ``user@host`` (the port is an option)."""
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def rsync_destination(self) -> str:
        """rsync's ``user@host`` for ``user@host:path`` (an IPv6 address in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    def with_defaults(self, *, port: int | None, identity: str | None, python: str, root: str) -> HostSpec:
        return replace(self, port=self.port or port, identity=self.identity or identity, python=self.python or python,
                       root=self.root or root)


def parse_host(text: str, *, where: str) -> HostSpec:
    """``[user@]host[:port]`` (``[v6addr]:port`` for IPv6) -> HostSpec; DeployError naming ``where``."""
    raw = text.strip()
    user = None
    rest = raw
    if "@" in raw:
        user, rest = raw.rsplit("@", 1)
        if not _USER.fullmatch(user):
            raise DeployError(f"invalid user name {user!r} in {raw!r}", where=where, how=SPEC_HELP)
    port_text = None
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise DeployError(f"unclosed '[' in {raw!r}", where=where, how=SPEC_HELP)
        host, tail = rest[1:close], rest[close + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise DeployError(f"unexpected {tail!r} after ']' in {raw!r}", where=where, how=SPEC_HELP)
            port_text = tail[1:]
        if not _IPV6.fullmatch(host):
            raise DeployError(f"invalid IPv6 address {host!r} in {raw!r}", where=where, how=SPEC_HELP)
    else:
        host = rest
        if rest.count(":") == 1:
            host, port_text = rest.split(":")
        elif rest.count(":") > 1:
            raise DeployError(f"an IPv6 address needs brackets: {raw!r}", where=where, how=SPEC_HELP)
        if not _HOSTNAME.fullmatch(host):
            raise DeployError(f"invalid host name {host!r} in {raw!r}", where=where, how=SPEC_HELP)
    port = None
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise DeployError(f"invalid port {port_text!r} in {raw!r}", where=where, how="give a port number from 1 to 65535")
        port = int(port_text)
    return HostSpec(host=host, user=user, port=port)


def read_hosts_file(path: str | Path) -> list[HostSpec]:
    """The devices listed in a hosts file (see the module docstring)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DeployError("hosts file not found", where=str(path), how="check the path given to --hosts") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeployError(f"cannot read the hosts file: {exc}", where=str(path),
                          how="make it a readable UTF-8 text file") from None
    hosts: list[HostSpec] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise DeployError(f"cannot split the line ({exc})", where=where,
                              how="close the quote or remove the stray one") from None
        if not words:
            continue
        spec = parse_host(words[0], where=where)
        fields: dict[str, str] = {}
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep or key not in FIELDS:
                raise DeployError(f"unknown field {word!r}", where=where,
                                  how=f"use key=value with a key from {', '.join(FIELDS)} (quote values with spaces)")
            if not value:
                raise DeployError(f"empty value for {key}", where=where, how=f"write {key}=VALUE or leave the field out")
            if key in fields:
                raise DeployError(f"{key} given twice", where=where, how="keep one")
            fields[key] = value
        spec = replace(spec, **fields)
        if spec.label in seen:
            raise DeployError(f"{spec.label} is listed twice (first on line {seen[spec.label]})", where=where,
                              how="remove one of the two lines")
        seen[spec.label] = number
        hosts.append(spec)
    if not hosts:
        raise DeployError("the hosts file lists no host", where=str(path), how="add one line per device: user@host[:port]")
    return hosts
