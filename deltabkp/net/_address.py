"""Addresses and target paths: one parser and one formatter for ``host:port`` and ``[v6]:port``.

Every place that reads a node, a listen address or a server address from a user or a peer
goes through ``Address.parse``; every place that prints one uses ``str(address)``, so the two
always agree (IPv6 literals bracketed).  ``normalise_path`` is the one check of a target path.
Errors are ``UsageError`` with the text as given; a server turns them into ``invalid``.

The one rule for an address without a port: it means the default port of what it names —
a server 7470 (``net.DEFAULT_SERVER_PORT``), a node's agent 7471 (``DEFAULT_AGENT_PORT``), a
daemon's ``--listen`` its own default — so ``--server backup``, ``register 10.0.0.5 /srv``
and ``--listen 0.0.0.0`` all work, and print with their port.  An IPv6 literal with a port is
bracketed (``[::1]:7471``); without brackets it is a host alone.
"""

from __future__ import annotations

import ipaddress
import posixpath

import attrs

from deltabkp.errors import UsageError

__all__ = ["Address", "normalise_path", "DEFAULT_AGENT_PORT", "is_loopback"]

#: Where a node's agent listens unless told otherwise (a NODE without :PORT means this port).
DEFAULT_AGENT_PORT = 7471


@attrs.frozen
class Address:
    """A TCP endpoint; ``str()`` is ``host:port`` or ``[v6]:port``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Address:
        """``"host:port"`` or ``"[v6]:port"`` (the port optional with ``default_port``)."""
        s = text.strip()
        if s.startswith("["):
            host, sep, rest = s[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
            if not sep or (rest and not rest.startswith(":")):
                raise UsageError(f"bad address {text!r}: expected HOST:PORT")
            if rest == ":":
                raise UsageError(f"bad address {text!r}: missing port after ':'")
        elif s.count(":") > 1:
            # An IPv6 literal without brackets has no port that could be told apart from it.
            if default_port is None:
                raise UsageError(f"bad address {text!r}: write an IPv6 address as [ADDR]:PORT")
            host, port_s = s, ""
        else:
            host, sep, port_s = s.rpartition(":")
            if not sep:
                host, port_s = s, ""
            elif not port_s:  # "host:" asks for a port and gives none: a typo, not a default
                raise UsageError(f"bad address {text!r}: missing port after ':'")
        if not port_s:
            if default_port is None:
                raise UsageError(f"bad address {text!r}: expected HOST:PORT")
            port_s = str(default_port)
        if not host:
            raise UsageError(f"bad address {text!r}: missing host")
        if not (port_s.isascii() and port_s.isdigit()):
            raise UsageError(f"bad address {text!r}: port {port_s!r} is not a number")
        port = int(port_s)
        if not 0 <= port <= 65535:
            raise UsageError(f"bad address {text!r}: port out of range")
        return cls(host, port)

    @classmethod
    def parse_node(cls, text: object, default_port: int | None = DEFAULT_AGENT_PORT) -> Address:
        """A node's agent address: a real port (1-65535, ``default_port`` if none is given),
        host in canonical (lower) case.  A request on the wire names the node canonically,
        port included: the server parses it with ``default_port=None``."""
        if not isinstance(text, str):
            raise UsageError(f"node must be a string HOST:PORT, got {text!r}")
        addr = cls.parse(text, default_port)
        if not 1 <= addr.port <= 65535:
            raise UsageError(f"bad node {text!r}: port must be 1-65535")
        return cls(addr.host.lower(), addr.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def normalise_path(text: object) -> str:
    """A target path: a non-empty absolute POSIX path without NUL, ``..`` and ``//`` folded."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"path must be a non-empty string, got {text!r}")
    if not text.startswith("/"):
        raise UsageError(f"path {text!r} must be absolute (a directory on the node)")
    if "\x00" in text:
        raise UsageError(f"path {text!r} contains a NUL byte")
    return posixpath.normpath(text)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: the addresses plaintext and the unauthenticated
    metrics port are allowed on without being asked for more."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"
