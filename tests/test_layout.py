"""The layout's rules, checked on the source: no import cycles, a sans-I/O protocol and
engine, a library free of Trio, server and agent apart, modules of a readable size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("deltabkp", "deltabkp_server", "deltabkp_agent")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of ours that ``name`` imports, anywhere in its body (lazy imports too)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_module_imports_a_module_that_imports_it_back() -> None:
    graph = _graph()
    cycles = sorted(m for m in graph if m in _reaches(graph, m))
    assert not cycles, f"import cycles through: {cycles}"


def test_the_graph_sees_real_imports() -> None:
    # The checker itself must not pass by seeing nothing.
    graph = _graph()
    assert "deltabkp.protocol._messages" in graph["deltabkp.protocol._frames"]
    assert "deltabkp.net._channel" in _reaches(graph, "deltabkp_server.server")


def _stdlib_and_third_party(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_protocol_and_engine_do_no_io() -> None:
    forbidden = {"trio", "socket", "threading", "time", "asyncio", "selectors"}
    # deltabkp._lazy: PEP 562 module attributes (importlib only), for protocol's backup side.
    for pkg, allowed_ours in (("protocol", {"deltabkp.errors", "deltabkp.protocol",
                                            "deltabkp._lazy"}),
                              ("engine", {"deltabkp.errors", "deltabkp.engine"})):
        graph = _graph()
        for path in (ROOT / "deltabkp" / pkg).glob("*.py"):
            name = _module_name(path)
            bad = _stdlib_and_third_party(path) & forbidden
            if pkg == "engine" and path.name == "_patch.py":
                # patch() overlaps hashing with copying in one helper thread of its own;
                # it reads no clock and opens nothing.
                bad -= {"threading"}
            if pkg == "engine" and path.name == "_rolling.py":
                bad -= {"threading"}  # a lock around the shared power tables
            if pkg == "engine" and path.name == "_rdiff_sums.py":
                # a lock around its power tables, and a small pool of helper threads
                # hashing tasks of blocks (BLAKE2b/MD4 release the GIL); no clock, nothing
                # opened
                bad -= {"threading"}
            if pkg == "engine" and path.name == "_blake2.py":
                bad -= {"threading"}  # a lock around the one load of the BLAKE2b library
            assert not bad, f"{name} imports {bad}"
            ours = {m for m in graph[name] if not any(m.startswith(a) for a in allowed_ours)}
            assert not ours, f"{name} imports {ours}"


def test_import_deltabkp_stays_free_of_trio() -> None:
    code = "import sys, deltabkp, deltabkp.protocol; print('trio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_server_and_agent_never_import_each_other() -> None:
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("deltabkp_server"):
            assert not any(d.startswith("deltabkp_agent") for d in deps), name
        if name.startswith("deltabkp_agent"):
            assert not any(d.startswith("deltabkp_server") for d in deps), name
        if name.startswith("deltabkp.") or name == "deltabkp":
            assert not any(d.startswith(("deltabkp_server", "deltabkp_agent")) for d in deps), name


def test_long_modules_say_why() -> None:
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > 450:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "long" in doc.lower(), f"{name} has {text.count(chr(10))} lines and no word on why"


def test_seek_points_and_layout_delta_do_no_io() -> None:
    # Bytes and buffers in, bytes out: callers (agent cache, server seek files) do the I/O.
    forbidden = {"trio", "socket", "threading", "time", "asyncio", "selectors", "os",
                 "pathlib", "shutil", "tempfile", "logging"}
    for name in ("_seek.py", "_layout.py"):
        path = ROOT / "deltabkp" / "archive" / name
        bad = _stdlib_and_third_party(path) & forbidden
        assert not bad, f"{name} imports {bad}"
        calls = {n.func.id for n in ast.walk(ast.parse(path.read_text()))
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        assert "open" not in calls, f"{name} opens files"
        assert "len" in calls  # the walk sees calls at all
