"""Deployment files: Docker cannot run on the test machines, so every YAML/JSON file under deploy/
and the Dockerfile are loaded and the fields that matter checked against what tiergate reads."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings import LEGACY_ENV, PACKAGE_ROOT, RouterConfig
from proxy.table.routing import load_table

DEPLOY = PACKAGE_ROOT / "deploy"
# written by the observability work in another branch; referenced here, checked when present
FROM_OTHER_BRANCHES = {DEPLOY / "prometheus.yml", DEPLOY / "grafana" / "llm_routing.json"}
PORT = RouterConfig.defaults().port


def known_env(name: str) -> bool:
    """An environment variable tiergate (or a library it uses) reads."""
    if name.startswith("OTEL_") or name in {"TIERGATE_CONFIG", "TIERGATE_API_KEYS_FILE", "PROMETHEUS_MULTIPROC_DIR"}:
        return True
    settings = {f.name for f in dataclasses.fields(RouterConfig)} - {"env"}
    return name in LEGACY_ENV.values() or (name.startswith("TIERGATE_") and name[9:].lower() in settings)


def load(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    return [json.loads(text)] if path.suffix == ".json" else list(yaml.safe_load_all(text))


@pytest.mark.parametrize("path", sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml", ".json")),
                         ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_deploy_file_loads(path: Path):
    docs = load(path)
    assert docs and all(isinstance(d, dict) for d in docs), path


def test_dockerfile():
    text = (PACKAGE_ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert re.match(r"FROM python:3\.1[1-9]-slim", lines[0])
    user = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user and user[-1] not in ("root", "0")
    # dependencies are installed from pyproject.toml alone, before the source is copied
    assert text.index("COPY pyproject.toml") < text.index("pip install -r") < text.index("COPY proxy")
    # installed as a user would (not editable): the tables come with the package, not from config/
    assert "pip install --no-deps /tmp/tiergate-src" in text and "pip install --no-deps -e" not in text
    assert "COPY config" not in text
    assert f"EXPOSE {PORT}" in text
    health = text[text.index("HEALTHCHECK"):]
    assert "/health" in health.split("\n\n")[0]
    assert 'ENTRYPOINT ["tiergate"]' in text and 'CMD ["serve", "--host", "0.0.0.0"]' in text
    for name in re.findall(r"\b(TIERGATE_[A-Z_]+)=", text):
        assert known_env(name), name


def test_compose_stack():
    compose = load(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    assert set(services) >= {"tiergate", "postgres", "redis", "prometheus", "grafana", "otel-collector"}
    tg = services["tiergate"]
    command = " ".join(tg["entrypoint"])
    assert command.index("tiergate db init") < command.index("exec tiergate serve")
    assert f"{PORT}:{PORT}" in tg["ports"]
    env = tg["environment"]
    assert all(known_env(name) for name in env), [n for n in env if not known_env(n)]
    assert env["TIERGATE_CONFIG"] == "/etc/tiergate/routes.yaml"
    assert any(v.endswith(":/etc/tiergate/routes.yaml:ro") for v in tg["volumes"])
    assert "@postgres:5432/" in env["DATABASE_URL"] and env["TIERGATE_REDIS_URL"].startswith("redis://redis:")
    assert "?" in env["TIERGATE_API_KEYS"]  # required: compose refuses to start without keys
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
    assert tg["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert int(tg["stop_grace_period"].rstrip("s")) > RouterConfig.defaults().drain_timeout

    # every file the stack mounts exists (or comes from the observability branch)
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                path = (DEPLOY / source).resolve()
                assert path.exists() or path in FROM_OTHER_BRANCHES, f"{name}: {source} missing"
    grafana_mounts = " ".join(services["grafana"]["volumes"])
    assert "./grafana/llm_routing.json:" in grafana_mounts and "./grafana/provisioning:" in grafana_mounts
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml" in " ".join(services["prometheus"]["volumes"])

    dashboards = load(DEPLOY / "grafana" / "provisioning" / "dashboards" / "tiergate.yml")[0]
    dashboard_dir = dashboards["providers"][0]["options"]["path"]
    assert f"{dashboard_dir}/llm_routing.json" in grafana_mounts
    datasource = load(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")[0]
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"

    otel = load(DEPLOY / "otel-collector.yaml")[0]
    assert otel["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert otel["service"]["pipelines"]["traces"]["receivers"] == ["otlp"]
    assert "4318:4318" in services["otel-collector"]["ports"]


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in load(path):
            docs[doc["kind"]] = doc
    return docs


def test_k8s_sidecar(tmp_path):
    docs = k8s_docs()
    assert {"Deployment", "ConfigMap", "Secret"} <= set(docs)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    sidecars = [c for c in pod.get("initContainers", []) if c["name"] == "tiergate"]
    assert sidecars and sidecars[0]["restartPolicy"] == "Always"  # native sidecar: outlives the app
    tg = sidecars[0]
    app = pod["containers"][0]

    assert tg["args"][0] == "serve" and tg["image"].split("/")[-1].startswith("tiergate:")
    port = tg["ports"][0]["containerPort"]
    env = {e["name"]: e for e in tg["env"]}
    assert all(known_env(name) for name in env), [n for n in env if not known_env(n)]
    assert int(env["TIERGATE_PORT"]["value"]) == port == PORT
    assert tg["livenessProbe"]["httpGet"]["path"] == "/health"
    assert tg["readinessProbe"]["httpGet"]["path"] == "/ready"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert tg[probe]["httpGet"]["port"] in (port, tg["ports"][0]["name"])

    # Prometheus scrapes the metrics port (GET /metrics without a key), not the API port
    metrics_port = next(p["containerPort"] for p in tg["ports"] if p["name"] == "metrics")
    assert int(env["TIERGATE_METRICS_PORT"]["value"]) == metrics_port != port
    annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)

    drain = float(env["TIERGATE_DRAIN_TIMEOUT"]["value"])
    assert pod["terminationGracePeriodSeconds"] >= drain + 5

    # keys come from the Secret, never inline; the Secret example has every key referenced
    secret = docs["Secret"]
    for name in ("TIERGATE_API_KEYS", "OPENROUTER_API_KEY", "PORTKEY_API_KEY", "DATABASE_URL"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
        assert "value" not in env[name]

    # the routes come from the ConfigMap, mounted where TIERGATE_CONFIG points, and the table is valid
    config_path = Path(env["TIERGATE_CONFIG"]["value"])
    mount = next(m for m in tg["volumeMounts"] if m["name"] == "routes")
    assert Path(mount["mountPath"]) == config_path.parent and mount["readOnly"]
    volume = next(v for v in pod["volumes"] if v["name"] == "routes")
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    table_file = tmp_path / config_path.name
    table_file.write_text(configmap["data"][config_path.name])
    assert len(load_table(table_file).routes) >= 1

    # non-root, and the application talks to tiergate on localhost
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert not tg["securityContext"]["allowPrivilegeEscalation"]
    app_env = {e["name"]: e for e in app["env"]}
    assert app_env["OPENAI_BASE_URL"]["value"] == f"http://127.0.0.1:{port}/v1"
    assert app_env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "TIERGATE_API_KEYS"
