"""Shared test fixtures: hypothesis profiles, and real services (one PostgreSQL per session)."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from deltabkp.testing import PostgresServer

# CI machines are shared and noisy: never let hypothesis fail a run on wall-clock time.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throwaway PostgreSQL for the whole session, started on first use (~1-3 s)."""
    with PostgresServer() as pg:
        yield pg


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database of the session's PostgreSQL, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    yield url
    postgres_server.drop_database(name)


@pytest.fixture(autouse=True)
def _daemon_loggers_restored() -> Iterator[None]:
    """A daemon's logging set-up run in-process (``configure_logging``, also at import by
    some test modules) makes its package logger stop propagating: each test starts with it
    propagating and gets the rest back after, so ``caplog`` sees the package's records
    whichever tests ran before on the same xdist worker."""
    loggers = [logging.getLogger(n) for n in ("deltabkp_server", "deltabkp_agent")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.propagate = True
    yield
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
