"""The package as a user gets it: sdist and wheel built, checked, installed into a fresh venv.

One test, offline: a copy of the source tree is built with ``python -m build
--no-isolation`` (an sdist, then the wheel from that sdist, so a file missing from the sdist
breaks the wheel), ``twine check --strict`` reads both, their contents are checked (the
sdist carries docs, tests, golden files and the C loop's source; the wheel only the
packages, ``py.typed`` and the C loop built for the stable ABI), and the wheel is installed with ``pip --no-deps --no-index`` into a venv that sees this
interpreter's packages for the dependencies.  From outside the source tree, the installed
``deltabkp`` imports from the venv (its C loop too, and BLAKE2b goes through it), and the
three console scripts answer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import deltabkp
from deltabkp.engine import _blake2

ROOT = Path(__file__).resolve().parent.parent
VERSION = deltabkp.__version__
SCRIPTS = ("deltabkp", "deltabkp-server", "deltabkp-agent")
PACKAGES = {"deltabkp", "deltabkp_server", "deltabkp_agent"}
#: Not part of the source: caches, build outputs, the benchmarks' generated data.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", "__pycache__", "*.pyc", "*.egg-info", ".mypy_cache", ".ruff_cache",
    ".hypothesis", ".pytest_cache", "_work", "_build", "run", "build", "dist", ".venv",
    "*.so",  # an editable install's in-place build of the C loop
)


def run(*cmd: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=240,
        check=False,
    )
    assert out.returncode == 0, f"{' '.join(map(str, cmd))}:\n{out.stdout}{out.stderr}"
    return out.stdout


def test_sdist_and_wheel_build_check_and_install(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE, symlinks=True)
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, src, cwd=tmp_path)
    sdist = dist / f"deltabkp-{VERSION}.tar.gz"
    # The C loop (deltabkp/engine/_blockloop.c) makes it a platform wheel, on the stable ABI
    # of 3.11: one wheel for every later CPython.
    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    wheel = dist / f"deltabkp-{VERSION}-cp311-abi3-{platform}.whl"
    assert sorted(p.name for p in dist.iterdir()) == sorted([sdist.name, wheel.name])
    run(sys.executable, "-m", "twine", "check", "--strict", sdist, wheel, cwd=tmp_path)

    # The sdist: the source to build, test and read from.
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for wanted in ("pyproject.toml", "README.md", "CHANGELOG.md", "docs/conf.py",
                   "docs/library.md", "docs/formats.md", "tests/test_wheel.py",
                   "deltabkp/py.typed", "examples/engine_demo.py",
                   "deltabkp/engine/_blockloop.c"):
        assert wanted in names, wanted
    assert any(n.startswith("tests/golden/engine/") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert not [n for n in names if n.startswith(("docs/_build", "benchmarks/_work"))]

    # The wheel: the three packages, their typing marker, the C loop's build (not its source)
    # and metadata, nothing else.
    with zipfile.ZipFile(wheel) as zf:
        files = zf.namelist()
        meta = zf.read(f"deltabkp-{VERSION}.dist-info/METADATA").decode()
        entry_points = zf.read(f"deltabkp-{VERSION}.dist-info/entry_points.txt").decode()
    tops = {f.split("/", 1)[0] for f in files}
    assert tops == PACKAGES | {f"deltabkp-{VERSION}.dist-info"}, tops
    assert "deltabkp/py.typed" in files
    assert "deltabkp/engine/_delta.py" in files and "deltabkp_server/catalog/__init__.py" in files
    assert not [f for f in files if "__pycache__" in f or f.endswith((".pyc", ".c"))]
    assert "deltabkp/engine/_blockloop.abi3.so" in files
    assert "deltabkp/engine/_blockloop.pyi" in files
    assert f"\nVersion: {VERSION}\n" in meta
    for script in SCRIPTS:
        assert f"\n{script} = " in entry_points, script

    # Installed into a fresh venv (dependencies from this interpreter's site-packages), used
    # from outside the source tree.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv,
        cwd=tmp_path)
    vpy = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "DELTABKP_CUT_FINDER", "DELTABKP_DEFLATE_LOOP")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    run(vpy, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel,
        cwd=tmp_path, env=env)
    probe = (
        "import deltabkp; "
        "old = bytes(range(256)) * 64; new = old[:999] + b'edit' + old[999:]; "
        "d = deltabkp.delta(deltabkp.signature(old), new); "
        "assert bytes(deltabkp.patch(old, d)) == new; "
        "from deltabkp.engine import _blake2, _blockloop; "
        "from deltabkp.archive import _gzip, _libz; "
        "print(deltabkp.__file__, _blockloop.__file__, _blake2.loop() or '-', _gzip.cut_finder(), "
        "_gzip._deflate_library().loop is not None)"
    )
    where, loop_file, loop, cuts, deflate = run(vpy, "-c", probe, cwd=tmp_path, env=env).split()
    assert Path(where).is_relative_to(venv) and Path(loop_file).is_relative_to(venv), where
    assert loop == {"hashlib": "-"}.get(_blake2.implementation(), "C")
    assert cuts == "C"  # the wheel's module has the cut scan, and it passed its check
    assert deflate == "True"  # and the deflate loop, checked with libz
    version = run(vpy, "-c", "import deltabkp; print(deltabkp.__version__)", cwd=tmp_path,
                  env=env).strip()
    assert version == VERSION
    assert run(venv / "bin" / "deltabkp", "--version", cwd=tmp_path, env=env).strip() == (
        f"deltabkp {VERSION}"
    )
    for script in SCRIPTS:
        assert "usage:" in run(venv / "bin" / script, "--help", cwd=tmp_path, env=env)
