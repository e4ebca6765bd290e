"""A private network of Linux network namespaces for hostile-network tests: cuts, slow links, loss.

``NetLab(["server", "agent", "ctl"])`` makes one namespace per node plus a hub namespace that
holds a bridge; each node is joined to the bridge by a veth pair (``eth0`` in the node, one
port on the hub) and gets an address on a private /24, ``lo`` up.  Its methods then:

- ``exec_argv`` / ``run`` / ``popen``: a command inside a node (``ip netns exec``) — clients
  must run *inside*: the root namespace has no route to the lab;
- ``shape``: ``tc tbf`` on both directions of a node's link (a slow link);
- ``cut`` / ``restore``: the hub's side of the link down / up — a pulled cable: both ends see
  silence, not an error, and an open TCP connection survives a short cut;
- ``drop``: an nftables rule in a node that drops one direction of its traffic, all of it
  (a partition) or a percentage (``numgen random mod 100 < P``), optionally per peer, per port
  and only once a connection has carried N bytes (``ct original|reply bytes > N``, so a
  partition lands in a given phase of a conversation without any timing); ``heal`` removes
  them;
- ``flood``: idle and slow (one byte every few seconds) TCP sockets from a node at an
  address, in a separate process (``flood_main``, plain selectors), which prints a JSON
  summary of what it opened and what the peer closed on exit.

Invariants:
- Namespace names are ``PREFIX<pid>-<token>-<node>``: unique per lab, so parallel runs cannot
  collide; interface names never exist in the root namespace (each veth is created directly
  in the hub and its peer moved at creation), so they cannot collide either.
- Teardown always runs (context manager; also on a failed set-up): processes still inside
  the lab's namespaces are killed, then the namespaces are deleted (which deletes the veths,
  qdiscs and rules with them).  Entering a lab first removes the leftovers of crashed runs
  with the same prefix (namespaces whose creating pid is gone).
- Every packet is one TCP segment (``gso_max_segs 1`` on each ``eth0``): drop percentages and
  rates act on wire-sized packets, not on 64 KB GSO super-packets.
- Every command has a timeout; a command that fails raises ``NetLabError`` with its stderr.
- No root, no lab: ``NetLabError`` (tests turn only that case into a skip; a root machine
  that cannot make namespaces fails loudly).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal, Self

import attrs

from deltabkp._process import pid_alive as _pid_alive
from deltabkp.errors import DeltabkpError

__all__ = ["DEFAULT_PREFIX", "NetLab", "NetLabError", "NetNode", "have_root", "sweep"]

DEFAULT_PREFIX = "dbkp-"
#: Deadline of one ``ip``/``tc``/``nft`` command (they take milliseconds).
COMMAND_TIMEOUT_S = 15.0
_TABLE = "deltabkp_lab"
#: The flood process (not ``-m``: runpy warns about a module its package already imported).
_FLOOD_MAIN = "import sys; from deltabkp.testing._netns import _main; sys.exit(_main(sys.argv[1:]))"
_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")
Direction = Literal["in", "out"]


class NetLabError(DeltabkpError):
    """The lab could not be made, changed or torn down (the command and its stderr say why)."""

    exit_code = 1


def have_root() -> bool:
    """Namespaces need CAP_SYS_ADMIN; tests skip (with this reason) only when not root."""
    return os.geteuid() == 0


@attrs.frozen
class NetNode:
    """One namespace of a lab: its short name, namespace name and address on the lab's /24."""

    name: str
    netns: str
    address: str
    #: The hub-side end of its veth (inside the hub namespace); ``eth0`` is its own end.
    hub_port: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *[str(a) for a in argv]]


#: Labs open in this process (so a sweep never takes a sibling lab for a crashed run's).
_OPEN: set[str] = set()


class NetLab:
    """A star of namespaces around a bridge; see the module docstring.  Use as ``with``."""

    def __init__(
        self, nodes: Sequence[str], *, prefix: str = DEFAULT_PREFIX, subnet: str = "10.77.0",
    ) -> None:
        if not nodes or len(set(nodes)) != len(nodes) or len(nodes) > 200:
            raise NetLabError(f"a lab needs 1 to 200 distinct node names, got {list(nodes)}")
        for n in nodes:
            if not _NAME.fullmatch(n):
                raise NetLabError(f"node name {n!r}: lower-case letters and digits, at most 12")
        self.prefix = prefix
        self.run_id = f"{prefix}{os.getpid()}-{secrets.token_hex(3)}"
        self.hub = f"{self.run_id}-hub"
        self.nodes = {
            n: NetNode(n, f"{self.run_id}-{n}", f"{subnet}.{i + 2}", f"p{i}")
            for i, n in enumerate(nodes)
        }
        self._made: list[str] = []

    def __getitem__(self, name: str) -> NetNode:
        return self.nodes[name]

    # -- life cycle -------------------------------------------------------------------------

    def __enter__(self) -> Self:
        if not have_root():
            raise NetLabError("network namespaces need root (CAP_SYS_ADMIN)")
        sweep(self.prefix)
        _OPEN.add(self.run_id)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        self._add_netns(self.hub)
        _cmd(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _cmd(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for node in self.nodes.values():
            self._add_netns(node.netns)
            _cmd(["ip", "-n", self.hub, "link", "add", node.hub_port, "type", "veth",
                  "peer", "name", "eth0", "netns", node.netns])
            _cmd(["ip", "-n", self.hub, "link", "set", node.hub_port, "master", "br0", "up"])
            _cmd(["ip", "-n", node.netns, "link", "set", "lo", "up"])
            _cmd(["ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0"])
            # One TCP segment per packet (no GSO super-packets of 64 KB): a drop percentage
            # and a rate then apply to wire-sized packets, as on a real network.
            _cmd(["ip", "-n", node.netns, "link", "set", "eth0", "gso_max_segs", "1", "up"])
            # The table exists from the start; conntrack byte counters (for ``after_bytes``)
            # are only kept for connections made once accounting is on.
            _cmd(node.exec_argv(["nft", "-f", "-"]), stdin=_table_script())
            _cmd(node.exec_argv(["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_acct=1"]))

    def _add_netns(self, name: str) -> None:
        _cmd(["ip", "netns", "add", name])
        self._made.append(name)

    def close(self) -> None:
        """Kill what still runs inside, delete the namespaces (idempotent)."""
        try:
            for name in reversed(self._made):
                _delete_netns(name)
            self._made.clear()
        finally:
            _OPEN.discard(self.run_id)

    # -- processes ----------------------------------------------------------------------------

    def exec_argv(self, node: str, argv: Sequence[str]) -> list[str]:
        return self.nodes[node].exec_argv(argv)

    def run(self, node: str, argv: Sequence[str], *, timeout: float = 120.0,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``node`` to completion (text output captured), under a deadline."""
        kw.setdefault("capture_output", True)
        return subprocess.run(self.exec_argv(node, argv), check=False, text=True, timeout=timeout, **kw)

    def popen(self, node: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``node``; the caller stops it (the lab kills leftovers)."""
        return subprocess.Popen(self.exec_argv(node, argv), **kw)

    def flood(self, node: str, target: str, *, idle: int, slow: int, seconds: float,
              slow_every: float = 3.0, **kw: Any) -> subprocess.Popen[bytes]:
        """Start a flood from ``node`` at ``HOST:PORT`` for ``seconds`` (see ``flood_main``);
        its stdout ends with one JSON line of counts."""
        argv = [sys.executable, "-c", _FLOOD_MAIN, "flood", target, str(idle), str(slow),
                f"{seconds:g}", f"{slow_every:g}"]
        return self.popen(node, argv, **kw)

    # -- the link -----------------------------------------------------------------------------

    def shape(self, node: str, rate: str, *, burst: str = "32kbit", latency: str = "400ms") -> None:
        """Limit both directions of ``node``'s link to ``rate`` (``tc tbf``, e.g. ``1mbit``)."""
        n = self.nodes[node]
        tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        _cmd(["tc", "-n", n.netns, "qdisc", "replace", "dev", "eth0", *tbf])
        _cmd(["tc", "-n", self.hub, "qdisc", "replace", "dev", n.hub_port, *tbf])

    def unshape(self, node: str) -> None:
        n = self.nodes[node]
        _cmd(["tc", "-n", n.netns, "qdisc", "del", "dev", "eth0", "root"], check=False)
        _cmd(["tc", "-n", self.hub, "qdisc", "del", "dev", n.hub_port, "root"], check=False)

    def cut(self, node: str) -> None:
        """Pull ``node``'s cable (at the hub): nothing in or out, no error seen by either end."""
        _cmd(["ip", "-n", self.hub, "link", "set", self.nodes[node].hub_port, "down"])

    def restore(self, node: str) -> None:
        _cmd(["ip", "-n", self.hub, "link", "set", self.nodes[node].hub_port, "up"])

    def drop(
        self,
        node: str,
        direction: Direction,
        *,
        percent: int = 100,
        peer: str | None = None,
        dport: int | None = None,
        sport: int | None = None,
        after_bytes: tuple[Literal["original", "reply"], int] | None = None,
    ) -> None:
        """Drop ``percent`` % of ``node``'s TCP packets going ``out`` (to ``peer``) or coming
        ``in`` (from ``peer``), optionally only to/from a port and only once the connection's
        ``original`` (initiator → responder) or ``reply`` direction has carried N bytes."""
        if not 0 < percent <= 100:
            raise NetLabError(f"percent must be in 1..100, got {percent}")
        n = self.nodes[node]
        rule: list[str] = []
        if peer is not None:
            rule += ["ip", "daddr" if direction == "out" else "saddr", self.nodes[peer].address]
        rule.append("meta l4proto tcp")
        if dport is not None:
            rule += ["tcp", "dport", str(dport)]
        if sport is not None:
            rule += ["tcp", "sport", str(sport)]
        if after_bytes is not None:
            rule += ["ct", after_bytes[0], "bytes", ">", str(after_bytes[1])]
        if percent < 100:
            rule += ["numgen", "random", "mod", "100", "<", str(percent)]
        rule += ["counter", "drop"]
        chain = "out" if direction == "out" else "in"
        _cmd(n.exec_argv(["nft", "add", "rule", "inet", _TABLE, chain, *rule]))

    def heal(self, node: str) -> None:
        """Remove every ``drop`` rule of ``node``."""
        n = self.nodes[node]
        for chain in ("in", "out"):
            _cmd(n.exec_argv(["nft", "flush", "chain", "inet", _TABLE, chain]))

    def dropped(self, node: str) -> int:
        """Packets dropped so far by ``node``'s rules (to show that a rule did bite)."""
        out = _cmd(self.nodes[node].exec_argv(["nft", "list", "table", "inet", _TABLE]))
        return sum(int(m) for m in re.findall(r"counter packets (\d+)", out))


def _table_script() -> str:
    return (
        f"table inet {_TABLE} {{\n"
        "  chain in { type filter hook input priority 0; policy accept; }\n"
        "  chain out { type filter hook output priority 0; policy accept; }\n"
        "}\n"
    )


def _cmd(argv: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    try:
        res = subprocess.run(list(argv), input=stdin, capture_output=True, text=True,
                             timeout=COMMAND_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise NetLabError(f"{argv[0]} is not installed ({' '.join(argv)})") from None
    except subprocess.TimeoutExpired:
        raise NetLabError(f"{' '.join(argv)} did not finish in {COMMAND_TIMEOUT_S:g} s") from None
    if check and res.returncode != 0:
        raise NetLabError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _netns_pids(name: str) -> list[int]:
    out = _cmd(["ip", "netns", "pids", name], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def _delete_netns(name: str) -> None:
    """Kill the processes inside ``name``, then delete it (the veths and rules go with it)."""
    for _ in range(50):  # bounded: a process that survives SIGKILL this long is a kernel matter
        pids = _netns_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    _cmd(["ip", "netns", "del", name], check=False)


def sweep(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Delete the namespaces of crashed labs with ``prefix`` (their creating pid is gone);
    returns their names."""
    out = _cmd(["ip", "netns", "list"])
    pat = re.compile(re.escape(prefix) + r"(\d+)-([0-9a-f]{6})-[a-z0-9]+")
    gone = []
    for line in out.splitlines():
        m = pat.match(line.split(" ")[0]) if line else None
        if m is None:
            continue
        run_id = f"{prefix}{m.group(1)}-{m.group(2)}"
        if run_id in _OPEN or _pid_alive(int(m.group(1))) and int(m.group(1)) != os.getpid():
            continue
        name = line.split(" ")[0]
        _delete_netns(name)
        gone.append(name)
    return gone


# -- the flood (runs as its own process, inside a namespace) ----------------------------------


def flood_main(target: str, idle: int, slow: int, seconds: float, slow_every: float) -> dict[str, int]:
    """Hold ``idle`` silent and ``slow`` trickling (one byte per ``slow_every`` s) TCP
    connections at ``HOST:PORT`` for ``seconds``; a connection the peer closes is opened again.
    Counts what happened.  Plain selectors, no Trio: it must not share the daemons' code."""
    import selectors
    import socket

    host, _, port_s = target.rpartition(":")
    addr = (host, int(port_s))
    sel = selectors.DefaultSelector()
    counts = {"opened": 0, "failed": 0, "closed_by_peer": 0, "bytes_sent": 0, "held_max": 0}
    next_byte: dict[socket.socket, float] = {}
    #: Reconnections wait a little: a peer that refuses at once must not make this spin.
    reopen: list[tuple[float, str]] = []
    end = time.monotonic() + seconds

    def open_one(kind: str) -> None:
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect_ex(addr)
        except OSError:
            counts["failed"] += 1
            s.close()
            return
        sel.register(s, selectors.EVENT_READ, kind)
        counts["opened"] += 1
        if kind == "slow":
            next_byte[s] = time.monotonic() + slow_every

    for _ in range(idle):
        open_one("idle")
    for _ in range(slow):
        open_one("slow")
    while (now := time.monotonic()) < end:
        counts["held_max"] = max(counts["held_max"], len(sel.get_map()))
        for key, _ev in sel.select(timeout=min(0.5, max(0.0, end - now))):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                continue  # whatever the server says (a TLS alert, an error), keep holding
            sel.unregister(s)
            next_byte.pop(s, None)
            s.close()
            counts["closed_by_peer"] += 1
            reopen.append((time.monotonic() + 0.05, key.data))
        now = time.monotonic()
        while reopen and reopen[0][0] <= now:
            open_one(reopen.pop(0)[1])
        for s, due in list(next_byte.items()):
            if due <= now:
                try:
                    counts["bytes_sent"] += s.send(b"\x16")
                except OSError:
                    pass
                next_byte[s] = now + slow_every
    for key in list(sel.get_map().values()):
        assert isinstance(key.fileobj, socket.socket)
        key.fileobj.close()
    return counts


def _main(argv: Sequence[str]) -> int:
    if len(argv) != 6 or argv[0] != "flood":
        print("usage: flood HOST:PORT IDLE SLOW SECONDS SLOW_EVERY", file=sys.stderr)
        return 2
    counts = flood_main(argv[1], int(argv[2]), int(argv[3]), float(argv[4]), float(argv[5]))
    print(json.dumps(counts), flush=True)
    return 0

