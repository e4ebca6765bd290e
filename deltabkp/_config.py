"""Configuration for the three commands: a TOML file and ``DELTABKP_*`` variables over argparse.

Job: give every flag of a parser a file key and an environment variable derived from the flag
itself (``--max-per-node`` ↔ key ``max_per_node`` ↔ ``$DELTABKP_MAX_PER_NODE``), and resolve
each value with one precedence: flag > environment > file > default.  A flag added to a parser
later gets its key and its variable without a line here.  The file has one table per program
(``[server]``, ``[agent]``, ``[ctl]``), so one file can serve a whole node; each program reads
its own table and ignores the others.  ``--print-config`` shows every value and where it came
from (flag, env NAME, FILE:LINE, default).

Invariants: a value from the file or the environment goes through the flag's own ``type`` and
``choices`` (the checks of the command line), and a required flag is required of the merged
result; an unknown table or key, a bad value or a malformed file is a ``UsageError`` naming
the file and line (or the variable); the file is read whole once, at most ``CONFIG_MAX`` bytes.
List flags (``action="append"``) take a TOML list, or comma-separated items in a variable; a
higher source replaces a list, it never extends it.  An empty variable counts as unset.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from deltabkp.errors import UsageError

__all__ = [
    "CONFIG_MAX",
    "ENV_PREFIX",
    "SECTIONS",
    "Option",
    "Options",
    "add_config_arguments",
    "adopt",
    "parse_args",
]

CONFIG_MAX = 1 << 20
ENV_PREFIX = "DELTABKP_"
#: The file's tables: one per program.
SECTIONS = ("server", "agent", "ctl")
#: ``--config``'s own variable (a file cannot name itself).
ENV_CONFIG = ENV_PREFIX + "CONFIG"
#: Flags that are about the command line itself, never configuration.
_NOT_CONFIG = frozenset({"help", "version", "config", "print_config"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_.-]+)\s*\]")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=")


def add_config_arguments(p: argparse.ArgumentParser, default: Any = None) -> None:
    """``--config FILE`` and ``--print-config`` (``default``: SUPPRESS on a subcommand's copy)."""
    p.add_argument("--config", metavar="FILE", default=default,
                   help=f"read settings from this TOML file (default: ${ENV_CONFIG}); every flag "
                   "has a key (--max-per-node: max_per_node) and a variable "
                   "($DELTABKP_MAX_PER_NODE); flags > variables > file > defaults")
    p.add_argument("--print-config", action="store_true",
                   default=False if default is None else default,
                   help="print the effective configuration, and where each value came from, "
                   "then exit")


@attrs.frozen
class Option:
    """One configurable flag: its key, its variable, and its own default."""

    key: str
    flag: str
    action: argparse.Action
    default: Any
    required: bool

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def is_list(self) -> bool:
        return isinstance(self.action, argparse._AppendAction)

    @property
    def is_switch(self) -> bool:
        return self.action.nargs == 0

    def from_file(self, raw: Any, where: str) -> Any:
        if self.is_switch:
            if not isinstance(raw, bool):
                raise UsageError(f"{where}: {self.key} must be true or false, got {_show(raw)}")
            return self.action.const if raw else self.default
        if self.is_list:
            items = raw if isinstance(raw, list) else [raw]
            return [self._scalar(item, where) for item in items]
        return self._scalar(raw, where)

    def from_env(self, text: str) -> Any:
        where = f"${self.env}"
        if self.is_switch:
            word = text.strip().lower()
            if word not in _TRUE | _FALSE:
                raise UsageError(f"{where}={text!r}: give 1/true/yes or 0/false/no")
            return self.action.const if word in _TRUE else self.default
        if self.is_list:
            return [self._scalar(item.strip(), where) for item in text.split(",") if item.strip()]
        return self._scalar(text, where)

    def _scalar(self, raw: Any, where: str) -> Any:
        kind = self.action.type
        try:
            if isinstance(raw, str):
                value = kind(raw) if callable(kind) else raw
            elif (isinstance(raw, int) and not isinstance(raw, bool) and kind in (int, float)) or (
                    isinstance(raw, float) and kind is float):
                value = kind(raw)
            else:
                raise TypeError
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            want = {int: "an integer", float: "a number"}.get(kind, "a string")  # type: ignore[call-overload]
            raise UsageError(f"{where}: {self.key} must be {want} ({self.flag} "
                             f"{self.action.metavar or 'VALUE'}), got {_show(raw)}") from None
        if self.action.choices is not None and value not in self.action.choices:
            choices = ", ".join(str(c) for c in self.action.choices)
            raise UsageError(f"{where}: {self.key} must be one of {choices}, got {_show(raw)}")
        return value


def _show(raw: Any) -> str:
    return json.dumps(raw) if isinstance(raw, (str, bool, int, float, list)) else repr(raw)


@attrs.frozen
class Options:
    """The configurable flags of one parser (``adopt``), and how to resolve them."""

    section: str
    prog: str
    options: tuple[Option, ...]

    def resolve(self, args: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, str]:
        """Fill every flag not given on the command line from the environment, the file or its
        default, in ``args``; the origin of each value by key."""
        path = getattr(args, "config", None) or environ.get(ENV_CONFIG) or None
        found = _read(Path(path), self.section) if path else {}
        known = {o.key: o for o in self.options}
        for key, (_raw, line) in found.items():
            if key not in known:
                import difflib  # only for a mistake: every ctl command imports this module

                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else (
                    f" (known: {', '.join(sorted(known))})")
                raise UsageError(f"{path}:{line}: unknown key {key!r} in [{self.section}]{hint}")
        origins: dict[str, str] = {}
        for o in self.options:
            dest = o.action.dest
            env = environ.get(o.env, "")
            if getattr(args, dest, None) is not None:
                origins[o.key] = "flag"
                continue
            if env:
                value, origins[o.key] = o.from_env(env), f"env {o.env}"
            elif o.key in found:
                raw, line = found[o.key]
                value, origins[o.key] = o.from_file(raw, f"{path}:{line}"), f"{path}:{line}"
            else:
                value, origins[o.key] = o.default, "default"
            setattr(args, dest, value)
            if o.required and value in (None, []):
                raise UsageError(f"{o.flag} is required (or {o.key} in the [{self.section}] "
                                 f"table of --config FILE, or ${o.env})")
        return origins

    def render(self, args: argparse.Namespace, origins: Mapping[str, str]) -> str:
        """The effective configuration as a TOML table, each value's origin in a comment (it
        is a valid config file: unset values are commented out)."""
        title = f"# {self.prog}: effective configuration (flag > environment > file > default)"
        lines = [title, f"[{self.section}]"]
        for o in sorted(self.options, key=lambda o: o.key):
            value = getattr(args, o.action.dest, None)
            origin = origins.get(o.key, "default")
            if value is None:
                lines.append(f"# {o.key} = (not set)  # {origin}")
            else:
                lines.append(f"{o.key} = {_toml(value)}  # {origin}")
        return "\n".join(lines)

    def as_json(self, args: argparse.Namespace, origins: Mapping[str, str]) -> dict[str, Any]:
        return {o.key: {"value": getattr(args, o.action.dest, None),
                        "from": origins.get(o.key, "default")} for o in self.options}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


def _configurable(a: argparse.Action) -> str | None:
    """The long flag of an action a file may set, else None."""
    if not a.option_strings or a.help == argparse.SUPPRESS or a.default == argparse.SUPPRESS:
        return None
    flag = next((s for s in a.option_strings if s.startswith("--")), None)
    if flag is None or flag[2:].replace("-", "_") in _NOT_CONFIG:
        return None
    return flag


def adopt(parser: argparse.ArgumentParser, section: str, prog: str | None = None) -> Options:
    """Make ``parser``'s flags configurable: call once, before parsing.

    Each flag's default moves here (the parser's default becomes None, i.e. "not given"), and
    ``required`` is checked after the merge instead (a file may give a required flag).
    """
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r}")
    options = []
    for a in parser._actions:
        flag = _configurable(a)
        if flag is None:
            continue
        default = a.default
        if isinstance(default, str) and callable(a.type):
            default = a.type(default)  # as argparse converts a string default
        options.append(Option(flag[2:].replace("-", "_"), flag, a, default, a.required))
        a.default, a.required = None, False
    return Options(section, prog or parser.prog, tuple(options))


def _read(path: Path, section: str) -> dict[str, tuple[Any, int]]:
    """The ``[section]`` table of the file: key → (value, line)."""
    try:
        with path.open("rb") as f:
            data = f.read(CONFIG_MAX + 1)
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(data) > CONFIG_MAX:
        raise UsageError(f"{path}: config file larger than {CONFIG_MAX >> 10} KiB")
    import tomllib  # only with a config file: every ctl command imports this module

    try:
        text = data.decode()
        doc = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    lines = _key_lines(text)
    for name, value in doc.items():
        line = lines.get(("", name)) or lines.get((name, ""), 0)
        if name not in SECTIONS:
            raise UsageError(f"{path}:{line}: unknown table or key {name!r} (the file has "
                             f"tables {', '.join(f'[{s}]' for s in SECTIONS)}, one per program)")
        if not isinstance(value, dict):
            raise UsageError(f"{path}:{line}: {name} must be a table ([{name}])")
    table = doc.get(section, {})
    return {k: (v, lines.get((section, k), 0)) for k, v in table.items()}


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """(table, key) → the line it is written on; a table's header is ("name", "")."""
    out: dict[tuple[str, str], int] = {}
    table = ""
    for n, line in enumerate(text.splitlines(), 1):
        m = _HEADER.match(line)
        if m:
            table = m.group(1)
            out.setdefault((table, ""), n)
            continue
        m = _KEY.match(line)
        if m:
            out.setdefault((table, m.group(1)), n)
    return out


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, section: str,
    environ: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """``parser.parse_args`` with ``--config``, ``DELTABKP_*`` and ``--print-config``: exits
    like argparse (2 and one line on a bad file or value; 0 after printing the config)."""
    add_config_arguments(parser)
    options = adopt(parser, section)
    args = parser.parse_args(argv)
    try:
        origins = options.resolve(args, os.environ if environ is None else environ)
    except UsageError as exc:
        parser.exit(exc.exit_code, f"{parser.prog}: error: {exc}\n")
    if args.print_config:
        print(options.render(args, origins))
        parser.exit(0)
    return args
