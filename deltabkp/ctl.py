"""Placeholder: this command family registers no subcommands yet."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add this family's subcommands to the ``deltabkp`` parser."""
