"""Structured logs: ``--log-format json`` on both real daemons (every stderr line one JSON
object with time, level, logger, message, and node/path/execution when it is about one);
failures at WARNING (a failed execution, an unreachable agent, a key from another cluster
on both sides); the text format showing the same context."""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from deltabkp import net
from deltabkp.ctl._client import Client
from deltabkp.net import _logfmt, log_context
from helpers_proc import Cluster, Daemon, cluster, exe, wait_for  # noqa: F401


def _record(msg: str, *args: object, exc: bool = False, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("deltabkp_server", logging.WARNING, __file__, 1, msg, args,
                            sys.exc_info() if exc else None)
    rec.__dict__.update(extra)
    return rec


def test_json_lines_carry_time_level_message_and_context() -> None:
    fmt = _logfmt.formatter("json", "deltabkp-server")
    line = fmt.format(_record("execution %d of %s failed", 7, "n:1 /srv",
                              **log_context(node="n:1", path="/srv", execution=7),
                              event="execution-failed"))
    obj = json.loads(line)
    assert obj["level"] == "WARNING" and obj["logger"] == "deltabkp_server"
    assert obj["daemon"] == "deltabkp-server"
    assert obj["message"] == "execution 7 of n:1 /srv failed"
    assert (obj["node"], obj["path"], obj["execution"], obj["event"]) == (
        "n:1", "/srv", 7, "execution-failed")
    when = dt.datetime.fromisoformat(obj["time"])
    assert when.utcoffset() == dt.timedelta(0)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        tb = json.loads(fmt.format(_record("crashed", exc=True)))
    assert "ValueError: boom" in tb["exception"] and "\n" not in fmt.format(_record("x"))


def test_text_lines_show_the_context_the_message_lacks() -> None:
    fmt = _logfmt.formatter("text", "deltabkp-agent")
    line = fmt.format(_record("backup of %s failed", "/srv/app",
                              **log_context(node="10.0.0.5:7471", path="/srv/app",
                                            event="backup-failed")))
    assert line.endswith("WARNING backup of /srv/app failed [node=10.0.0.5:7471]")
    assert "[" not in fmt.format(_record("plain"))
    with pytest.raises(ValueError, match="unknown log format"):
        _logfmt.formatter("xml", "deltabkp-agent")


def _json_lines(d: Daemon) -> list[dict[str, Any]]:
    """Every line the daemon wrote to stderr, each parsed (stdout's one line excluded)."""
    lines = [ln for ln in d.log_text().splitlines() if ln.strip() and " listening on " not in ln]
    out = []
    for ln in lines:
        try:
            obj = json.loads(ln)
        except ValueError:
            pytest.fail(f"not a JSON line in {d.name}'s log: {ln!r}")
        assert {"time", "level", "logger", "message", "daemon"} <= obj.keys(), ln
        out.append(obj)
    return out


def _find(d: Daemon, **want: Any) -> list[dict[str, Any]]:
    return [r for r in _json_lines(d) if all(r.get(k) == v for k, v in want.items())]


def test_daemons_log_json_with_context_and_failures_as_warnings(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    server = c.start_server("--log-format", "json")
    agent = Daemon("deltabkp-agent", [
        exe("deltabkp-agent"), "--listen", "127.0.0.1:0", "--allow", str(src),
        "--key-file", str(c.key_file), "--log-format", "json"], tmp_path / "json-agent.log", c.env)
    c.agents.append(agent)
    other_key = tmp_path / "other.key"
    other_key.write_text(secrets.token_hex(32) + "\n")
    other_key.chmod(0o600)
    stranger = c.start_agent(src, key_file=other_key, announce=False)

    # The requests from this process (a ctl subprocess per request costs seconds here).
    client = Client(net.Address.parse(server.address), net.load_key(str(c.key_file)), 60.0)

    def ask(op: str, node: str, path: str, **args: Any) -> Any:
        return trio.run(client.request, op, {"node": node, "path": path, **args})

    node = agent.address
    ask("register", node, str(src), every="60")
    assert ask("backup-now", node, str(src), wait=True)["outcome"] in ("stored", "unchanged")
    # An agent that is not there, and one holding another cluster's key.
    ask("register", "127.0.0.1:1", "/srv/gone", every="60")
    ask("register", stranger.address, str(src), every="60")

    ended = wait_for(lambda: _find(server, event="execution-ended", node=node),
                     what="the server's execution-ended record")[0]
    assert ended["level"] == "INFO" and ended["path"] == str(src)
    assert isinstance(ended["execution"], int)
    started = _find(server, event="execution-started", execution=ended["execution"])
    assert started and started[0]["node"] == node
    served = wait_for(lambda: _find(agent, event="backup-served"), what="the agent's record")[0]
    assert served["path"] == str(src) and served["node"] == node

    gone = wait_for(lambda: _find(server, event="agent-unreachable", node="127.0.0.1:1"),
                    what="the unreachable agent's warning")
    assert all(r["level"] == "WARNING" for r in gone) and gone[0]["path"] == "/srv/gone"
    wrong = wait_for(lambda: _find(server, event="auth-failed", node=stranger.address),
                     what="the server's warning about the stranger's key")
    assert all(r["level"] == "WARNING" and "another cluster" in r["message"] for r in wrong)
    assert not _find(server, event="agent-unreachable", node=stranger.address)
    # The stranger logs it too (text format: it was started without --log-format).
    wait_for(lambda: "authentication failed" in stranger.log_text(),
             what="the stranger's refusal line")
    assert "WARNING refused connection from" in stranger.log_text()
