#!/usr/bin/env bash
# Checks deploy/ and docker-compose.yml without starting anything:
#   - the Prometheus configuration and alert rules (promtool check config, check rules);
#   - the alert rules' unit tests, deploy/prometheus/alerts.test.yml (promtool test rules);
#   - the Grafana provisioning and dashboard and the OpenTelemetry Collector configuration:
#     parsed, and what they refer to checked (data source uids, pipeline components, mounts);
#   - docker-compose.yml (`docker compose config`, else `docker-compose config`).
# Installs what it needs from Debian's packages (promtool comes with `prometheus`). Exits
# non-zero on the first failure. That every metric the rules and the dashboard use is defined
# is checked by the runtime crate's unit tests (workers/runtime/src/metrics.rs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '== %s\n' "$*"; }
die() {
  printf 'check-deploy.sh: %s\n' "$*" >&2
  exit 1
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

apt_updated=false
apt_install() {
  step "installing $* (apt)"
  if ! $apt_updated; then
    as_root apt-get update -qq
    apt_updated=true
  fi
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

compose_client() {
  if docker compose version >/dev/null 2>&1; then
    echo "docker compose"
  elif command -v docker-compose >/dev/null; then
    echo "docker-compose"
  fi
}

# A Python with PyYAML: the one on PATH, or Debian's.
yaml_python() {
  local py
  for py in python3 /usr/bin/python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import yaml' 2>/dev/null; then
      echo "$py"
      return
    fi
  done
}

missing=()
command -v promtool >/dev/null || missing+=(prometheus)
[[ -n $(compose_client) ]] || missing+=(docker-compose)
[[ -n $(yaml_python) ]] || missing+=(python3-yaml)
if ((${#missing[@]})); then
  apt_install "${missing[@]}"
fi
PY=$(yaml_python)
[[ -n $PY ]] || die "no Python with PyYAML after installing python3-yaml"

step "promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml

step "promtool check rules deploy/prometheus/alerts.yml"
promtool check rules deploy/prometheus/alerts.yml

step "promtool test rules deploy/prometheus/alerts.test.yml"
promtool test rules deploy/prometheus/alerts.test.yml

step "Grafana provisioning and dashboard, OpenTelemetry Collector, compose mounts"
"$PY" - <<'EOF'
import json
import os
import sys

import yaml

errors = []


def check(ok, message):
    if not ok:
        errors.append(message)


def load(path):
    with open(path) as f:
        return json.load(f) if path.endswith(".json") else yaml.safe_load(f)


compose = load("docker-compose.yml")
services = compose["services"]

# Grafana: the dashboard refers to provisioned data sources by uid.
sources = load("deploy/grafana/provisioning/datasources/datasources.yml")["datasources"]
uids = {s["uid"] for s in sources}
check(sum(bool(s.get("isDefault")) for s in sources) == 1, "exactly one default data source")
for s in sources:
    host = s["url"].split("//", 1)[1].split(":", 1)[0]
    check(host in services, f"data source {s['name']} points at {host}, not a compose service")

dashboard = load("deploy/grafana/dashboards/twophase.json")
check(dashboard.get("uid"), "the dashboard has a uid")
ids = set()
panels = dashboard["panels"]
for panel in panels:
    name = panel.get("title", "?")
    check(panel["id"] not in ids, f"panel id {panel['id']} is used twice")
    ids.add(panel["id"])
    grid = panel["gridPos"]
    check(grid["x"] + grid["w"] <= 24, f"panel {name} is wider than the grid")
    if panel["type"] == "row":
        continue
    check(panel["datasource"]["uid"] in uids, f"panel {name}: unknown data source")
    check(panel.get("targets"), f"panel {name} has no query")
    for target in panel.get("targets", []):
        check(target["datasource"]["uid"] in uids, f"panel {name}: unknown data source")
        check(target.get("expr", "").strip(), f"panel {name}: empty query")
print(f"dashboard: {len(panels)} panels, data sources {sorted(uids)}")

# The dashboard provider reads the folder compose mounts the dashboards into.
providers = load("deploy/grafana/provisioning/dashboards/dashboards.yml")["providers"]
mounts = {}
for name, service in services.items():
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        mounts[target] = source
        check(os.path.exists(source), f"{name} mounts {source}, which does not exist")
for provider in providers:
    path = provider["options"]["path"]
    check(path in mounts, f"dashboard provider reads {path}, which compose does not mount")
home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
if home:
    folder, file = home.rsplit("/", 1)
    check(
        folder in mounts and os.path.exists(os.path.join(mounts[folder], file)),
        f"the home dashboard {home} is not mounted",
    )

# OpenTelemetry Collector: every pipeline component is defined, and exports go to a service.
collector = load("deploy/otel/collector.yaml")
for pipeline, spec in collector["service"]["pipelines"].items():
    for kind in ("receivers", "processors", "exporters"):
        for component in spec.get(kind, []):
            check(component in collector.get(kind, {}), f"{pipeline} uses undefined {component}")
for name, exporter in collector["exporters"].items():
    host = exporter["endpoint"].split("//")[-1].split(":")[0]
    check(host in services, f"exporter {name} sends to {host}, not a compose service")
collector_service = [s for s in services.values() if any("collector.yaml" in v for v in s.get("volumes", []))]
check(len(collector_service) == 1, "compose runs the collector with deploy/otel/collector.yaml")

# Prometheus scrapes every worker compose runs, and nothing compose does not run.
prometheus = load("deploy/prometheus/prometheus.yml")
scraped = set()
for job in prometheus["scrape_configs"]:
    for static in job.get("static_configs", []):
        for target in static["targets"]:
            scraped.add(target)
for name, service in services.items():
    listen = service.get("environment", {}).get("TWOPHASE_METRICS_LISTEN")
    if listen:
        target = f"{name}:{listen.rsplit(':', 1)[1]}"
        check(target in scraped, f"prometheus.yml does not scrape {target}")
not_run = sorted(t for t in scraped if t.split(":")[0] not in services and t.split(":")[0] != "localhost")
check(not not_run, f"prometheus.yml scrapes what docker-compose.yml does not run: {', '.join(not_run)}")

# Every worker tells compose whether it is ready; init runs once and ends.
for name, service in services.items():
    if service.get("image") == "twophase:local" and name != "init":
        check("healthcheck" in service, f"{name} has no healthcheck")

if errors:
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
print("ok")
EOF

client=$(compose_client)
if [[ -n $client ]]; then
  step "$client config"
  $client -f docker-compose.yml config -q
else
  # Only when no compose client could be installed: parse it and check the references.
  step "docker-compose.yml (no compose client: YAML and references only)"
  "$PY" - <<'EOF'
import yaml

services = yaml.safe_load(open("docker-compose.yml"))["services"]
for name, service in services.items():
    assert "image" in service or "build" in service, f"{name}: no image or build"
    for dependency in service.get("depends_on", {}):
        assert dependency in services, f"{name} depends on unknown {dependency}"
print("ok")
EOF
fi

step "deploy checks passed"
