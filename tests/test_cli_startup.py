"""What a ``deltabkp`` command line builds and imports before it runs (issue 10, the ctl's CPU).

A ``ctl`` command line gets a parser with the ctl family only (``cli._families``): the engine
and archive families' modules are neither imported nor built — and every output of the
parser (help, usage errors, exit codes) is the same as the full parser's.  The protocol's
backup side (``protocol._backup``: twelve attrs classes) is built only when something needs
it: one of its names, one of its tags on the wire, a server's or an agent's connection
(``test_ctl_blocking``: a real ctl command against a real server does not build it).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from deltabkp import _cli_run, cli
from deltabkp.ctl._commands import COMMANDS

_OTHER_FAMILIES = {"deltabkp._cli_engine", "deltabkp._cli_archive"}


def _imported(*argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``deltabkp ARGV`` in a fresh interpreter: its output and the modules it imported
    (``sys.modules``: ``-X importtime`` does not list ``importlib.import_module``'s)."""
    code = ("import sys\nfrom deltabkp import cli\ntry:\n    cli.main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint('MODULES', *sorted(sys.modules), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code, *argv],
                         capture_output=True, text=True, check=False, timeout=60)
    modules = out.stderr.rsplit("MODULES ", 1)[-1].split()
    return out, set(modules)


def test_a_ctl_command_imports_no_other_family_and_the_top_level_help_has_them_all() -> None:
    out, imported = _imported("ctl", "status", "--help")
    assert "usage: deltabkp ctl status" in out.stdout, out.stderr
    assert "deltabkp.ctl._commands" in imported  # the list is real
    assert not imported & _OTHER_FAMILIES
    assert "deltabkp.protocol._connection" in imported
    assert "deltabkp.protocol._backup" not in imported
    out, imported = _imported("--help")
    assert imported >= _OTHER_FAMILIES
    assert all(f" {name} " in out.stdout for name in ("signature", "archive", "ctl"))


@pytest.mark.parametrize("argv", [
    ["ctl"], ["ctl", "--help"], ["ctl", "status", "--help"], ["ctl", "--version"],
    ["ctl", "bogus"], ["ctl", "status", "--nope"], ["ctl", "list", "only-a-node"],
    ["ctl", "backup-now", "--wait-timeout", "x"],
])
def test_the_ctl_parser_says_what_the_full_parser_says(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli._families(argv) == ("deltabkp.ctl",)

    def outcome(families: tuple[str, ...]) -> tuple[object, str, str]:
        try:
            code: object = _cli_run.run(cli.build_parser(families), argv)
        except SystemExit as exc:
            code = exc.code
        got = capsys.readouterr()
        return code, got.out, got.err

    full = outcome(cli._FAMILIES)
    assert full[0] == (0 if "--help" in argv else 2)  # none of these reaches the network
    assert outcome(cli._families(argv)) == full


def test_other_command_lines_get_every_family() -> None:
    for argv in ([], ["--help"], ["signature", "a", "b"], ["archive", "x"], ["--version"],
                 ["xctl"], ["--", "ctl"]):
        assert cli._families(argv) == cli._FAMILIES, argv


_FRESH = """
import sys
import msgpack
from deltabkp import protocol
from deltabkp.protocol import _frames

def built():
    return 'deltabkp.protocol._backup' in sys.modules

assert not built()
{case}
assert built()
from deltabkp.protocol import _backup
assert sorted(protocol._BACKUP_NAMES) == sorted(_backup.__all__)
assert {{getattr(protocol, n) for n in _backup.__all__}} == {{getattr(_backup, n) for n in _backup.__all__}}
print('ok')
"""


@pytest.mark.parametrize("case", [
    "assert repr(_frames.decode_payload(msgpack.packb({'t': 'ack'}))) == 'Ack()'",
    "assert protocol.BackupRequest('/srv').path == '/srv'",
    ("assert protocol.Connection(key=b'k' * 32, our_role='server', initiator=True).peer_role"
     " == 'agent'"),
])
def test_the_backup_side_is_built_when_first_needed(case: str) -> None:
    out = subprocess.run([sys.executable, "-c", _FRESH.format(case=case)],
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0 and out.stdout == "ok\n", out.stderr


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action._name_parser_map


def test_a_ctl_command_line_builds_only_its_subcommand_parser() -> None:
    parser = cli.build_parser(cli._families(["ctl"]))
    args = parser.parse_args(["ctl", "list", "10.0.0.5:7471", "/srv/shop"])
    assert (args.node, args.path) == ("10.0.0.5:7471", "/srv/shop")
    subs = _subparsers(_subparsers(parser)["ctl"])
    assert list(dict.keys(subs)) == ["list"]  # the one built
    assert list(subs) == [c.name for c in COMMANDS] and len(subs) == len(COMMANDS)
    assert "status" in subs and "nope" not in subs
    assert subs["status"].prog == "deltabkp ctl status" and list(dict.keys(subs)) == ["list", "status"]
