"""The documentation is true: it builds without a warning and every sample in it runs.

``make docs`` and the first test run the same Sphinx build (autodoc + napoleon over the
public API, MyST for the Markdown guides) with warnings as errors.  The sample tests take the
fenced ``python`` blocks of README.md and docs/*.md, and the ``sh`` blocks of the library
guide, and run each file's blocks in order in one fresh temporary directory, as a reader
would paste them.  (The ``sh`` blocks of docs/operating.md install services system-wide and
are not run here; tests/test_systemd_units.py checks the units they install.)
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
#: Files whose ``sh`` blocks are runnable samples (the others are install instructions).
SHELL_SAMPLES = [DOCS / "library.md"]

_FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


def blocks(path: Path, lang: str) -> list[str]:
    """The fenced blocks of ``path`` tagged ``lang``, in order."""
    return [body for tag, body in _FENCE.findall(path.read_text()) if tag == lang]


def test_fence_parser_finds_the_samples() -> None:
    # Guards the sample tests below against passing by finding nothing.
    assert len(blocks(ROOT / "README.md", "python")) >= 1
    assert len(blocks(DOCS / "library.md", "python")) >= 4
    assert len(blocks(DOCS / "library.md", "sh")) >= 1
    assert blocks(DOCS / "operating.md", "python") == []


def test_sphinx_builds_without_warnings(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         str(DOCS), str(tmp_path / "html")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    api = (tmp_path / "html" / "api.html").read_text()
    # Every public name has its entry in the reference.
    import deltabkp

    anchors = ("deltabkp.{}", "deltabkp.errors.{}", "module-deltabkp.{}")
    missing = [
        n for n in deltabkp.__all__
        if n != "__version__" and not any(f'id="{a.format(n)}"' in api for a in anchors)
    ]
    assert not missing, f"not in docs/api.rst: {missing}"
    assert (tmp_path / "html" / "library.html").exists()


def test_make_docs_is_this_build() -> None:
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(ROOT), "docs"], check=True,
        capture_output=True, text=True,
    )
    assert "-m sphinx -W --keep-going -b html" in out.stdout
    assert out.stdout.rstrip().endswith("/docs/_build/html")


@pytest.mark.parametrize(
    "doc", [p for p in MARKDOWN if blocks(p, "python")], ids=lambda p: p.name
)
def test_python_samples_run(doc: Path, tmp_path: Path) -> None:
    script = tmp_path / f"{doc.stem}_samples.py"
    script.write_text("\n\n".join(blocks(doc, "python")))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(script)], check=False, cwd=work, capture_output=True, text=True, env=env,
        timeout=120,
    )
    assert out.returncode == 0, f"{doc.name}:\n{out.stdout}{out.stderr}"


@pytest.mark.parametrize("doc", SHELL_SAMPLES, ids=lambda p: p.name)
def test_shell_samples_run(doc: Path, tmp_path: Path) -> None:
    # `deltabkp` on PATH is this tree's, whatever is installed.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "deltabkp"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m deltabkp "$@"\n')
    wrapper.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = "\n".join(blocks(doc, "sh"))
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], check=False, cwd=work, capture_output=True, text=True,
        env=env, timeout=120,
    )
    assert out.returncode == 0, f"{doc.name}:\n{out.stdout}{out.stderr}"
