"""Configuration (``deltabkp._config``): ``--config FILE``, ``DELTABKP_*`` and ``--print-config``.

The real commands: ``deltabkp-server --config f --print-config`` shows each value and where it
came from (flag > env > file > default); a bad key or value is one line naming FILE:LINE; a
server and a ctl really run from one file.  The generic part is checked on the three real
parsers: every flag has a key and a variable, so flags added later are configurable too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers_proc import exe

from deltabkp import _config, testing
from deltabkp.ctl import register as ctl_register
from deltabkp_agent.__main__ import build_parser as agent_parser
from deltabkp_server.__main__ import build_parser as server_parser


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    # No DELTABKP_* from the outer environment may leak into what is being checked.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTABKP_")}
    return {**env, "HOME": str(tmp_path / "home"), **extra}


def _run(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=60, env=env)


def _lines(text: str) -> dict[str, str]:
    """``--print-config`` output: key → 'VALUE  # ORIGIN' (commented-out unset keys too)."""
    out = {}
    for line in text.splitlines():
        body = line.removeprefix("# ")
        if " = " in body and not body.startswith("deltabkp"):
            key, _, rest = body.partition(" = ")
            out[key] = rest
    return out


def test_server_print_config_says_where_each_value_came_from(tmp_path: Path) -> None:
    conf = tmp_path / "deltabkp.toml"
    conf.write_text(
        "# one file for the node\n"
        "[server]\n"
        "max_per_node = 3\n"
        "keep = 4        # a comment\n"
        "max_concurrent = 6\n"
        "lease_ttl = 20\n"
        "\n"
        "[agent]\n"
        "allow = [\"/srv/a\"]\n"
    )
    res = _run("deltabkp-server", "--config", str(conf), "--print-config", "--lease-ttl", "9",
               env=_env(tmp_path, DELTABKP_MAX_CONCURRENT="5", DELTABKP_KEY_FILE="/k"))
    assert res.returncode == 0, res.stderr
    got = _lines(res.stdout)
    assert got["lease_ttl"] == "9.0  # flag"                     # flag beats the file
    assert got["max_concurrent"] == "5  # env DELTABKP_MAX_CONCURRENT"  # env beats the file
    assert got["max_per_node"] == f"3  # {conf}:3"
    assert got["keep"] == f"4  # {conf}:4"
    assert got["key_file"] == '"/k"  # env DELTABKP_KEY_FILE'   # the old variable still works
    assert got["listen"] == '"127.0.0.1:7470"  # default'
    assert got["data_dir"] == "(not set)  # default"
    # The output is itself a valid config file (the [server] table).
    assert "[server]" in res.stdout and "allow" not in got


@pytest.mark.parametrize("text, needle", [
    ("[server]\nkeep = 4\nmax_per_nod = 3\n", ":3: unknown key 'max_per_nod' in [server] "
                                               "(did you mean max_per_node?)"),
    ("[server]\n\nkeep = \"ten\"\n", ":3: keep must be an integer (--keep N), got \"ten\""),
    ("[server]\nquiet = 1\n", ":2: quiet must be true or false, got 1"),
    ("[server]\nmax_concurrent = 2.5\n", ":2: max_concurrent must be an integer"),
    ("[sever]\nkeep = 1\n", ":1: unknown table or key 'sever'"),
    ("listen = \"0.0.0.0:7470\"\n", ":1: unknown table or key 'listen'"),
    ("[server]\nkeep = \n", "not valid TOML"),
])
def test_bad_files_are_one_line_naming_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needle: str
) -> None:
    # In-process on the real parser (the same code path as the command; cheaper than a process).
    conf = tmp_path / "c.toml"
    conf.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        _config.parse_args(server_parser(), ["--config", str(conf)], "server", environ={})
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"deltabkp-server: error: {conf}")
    assert needle in line, line


def test_bad_variable_and_missing_required_are_clear(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv, environ, needle in [
        ([], {"DELTABKP_MAX_BUILDS": "two", "DELTABKP_ALLOW": "/srv"},
         "$DELTABKP_MAX_BUILDS: max_builds must be an integer"),
        ([], {"DELTABKP_NO_ARCHIVE_CACHE": "maybe", "DELTABKP_ALLOW": "/srv"},
         "$DELTABKP_NO_ARCHIVE_CACHE='maybe': give 1/true/yes or 0/false/no"),
        ([], {}, "--allow is required (or allow in the [agent] table"),
        (["--config", str(tmp_path / "nope.toml")], {}, "cannot read config file"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            _config.parse_args(agent_parser(), argv, "agent", environ=environ)
        assert exit_.value.code == 2
        assert needle in capsys.readouterr().err, needle


def test_lists_and_switches_from_each_source(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[agent]\nallow = ["/srv/a", "/srv/b"]\nexclude = "*.tmp"\n'
                    "no_archive_cache = true\n")
    args = _config.parse_args(agent_parser(), ["--config", str(conf)], "agent",
                              environ={"DELTABKP_SERVER": "b1:7470, b2"})
    assert args.allow == ["/srv/a", "/srv/b"] and args.exclude == ["*.tmp"]
    assert args.no_archive_cache is True and args.server == ["b1:7470", "b2"]
    # A flag replaces the file's list (it does not extend it); a variable set to "0" is false.
    args = _config.parse_args(agent_parser(), ["--config", str(conf), "--allow", "/x"], "agent",
                              environ={"DELTABKP_NO_ARCHIVE_CACHE": "0"})
    assert args.allow == ["/x"] and args.no_archive_cache is False
    # Nothing given anywhere: the parser's own defaults, converted as argparse would.
    args = _config.parse_args(server_parser(), [], "server", environ={})
    assert args.max_handshakes == 64 and args.quiet is False and args.extra_key_file == []


@pytest.mark.parametrize("section", _config.SECTIONS)
def test_every_flag_has_a_key_and_a_variable(section: str) -> None:
    """Generic over argparse: whatever flags a parser has (and gains later), each is
    configurable, under the name derived from the flag."""
    if section == "ctl":
        top = argparse.ArgumentParser(prog="deltabkp")
        ctl_register(top.add_subparsers(dest="command"))
        args = top.parse_args(["ctl", "status"])
        options: _config.Options = args._ctl_config
        parser = args._ctl_parser
    else:
        parser = server_parser() if section == "server" else agent_parser()
        options = _config.adopt(parser, section)
    keys = {o.key for o in options.options}
    flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
    expected = {f[2:].replace("-", "_") for f in flags} - {"help", "version", "config",
                                                           "print_config"}
    assert keys == expected
    for o in options.options:
        assert o.env == "DELTABKP_" + o.flag[2:].replace("-", "_").upper()


def test_a_server_and_ctl_run_from_one_config_file(tmp_path: Path) -> None:
    key = tmp_path / "cluster.key"
    key.write_text("0123456789abcdef" * 4 + "\n")
    conf = tmp_path / "node.toml"
    conf.write_text(
        "[server]\n"
        'listen = "127.0.0.1:0"\n'
        f'data_dir = "{tmp_path / "data"}"\n'
        f'key_file = "{key}"\n'
        "max_per_node = 3\n"
        "[ctl]\n"
        f'key_file = "{key}"\n'
        "json = true\n"
    )
    env = _env(tmp_path, PYTHONUNBUFFERED="1")
    with testing.Daemon([exe("deltabkp-server"), "--config", str(conf)],
                        log=tmp_path / "server.log", env=env) as server:
        res = _run("deltabkp", "ctl", "--config", str(conf), "status",
                   env={**env, "DELTABKP_SERVER": server.address})
        assert res.returncode == 0, res.stderr
        status = json.loads(res.stdout)  # json = true came from the file
        assert status["max_per_node"] == 3 and status["listen"] == server.address
        assert (tmp_path / "data" / "catalog.sqlite3").exists()
        # ctl shows its own configuration the same way, as JSON under --json.
        res = _run("deltabkp", "ctl", "--config", str(conf), "--print-config",
                   env={**env, "DELTABKP_SERVER": server.address})
        shown = json.loads(res.stdout)
        assert shown["server"] == {"value": server.address, "from": "env DELTABKP_SERVER"}
        assert shown["json"] == {"value": True, "from": f"{conf}:8"}
        assert shown["timeout"] == {"value": 30.0, "from": "default"}
