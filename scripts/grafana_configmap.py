#!/usr/bin/env python3
"""Write manifests/grafana/sknf-dashboard-configmap.yaml from sknf-dashboard.json (the one source of truth).

Edit the JSON (or export it from Grafana), then run this; `--check` exits 1 if the ConfigMap is stale
(the unit tests run it so). Stdlib only: the JSON goes in verbatim as a YAML literal block.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "manifests" / "grafana"
SOURCE = HERE / "sknf-dashboard.json"
TARGET = HERE / "sknf-dashboard-configmap.yaml"

HEADER = """\
# GENERATED from sknf-dashboard.json by scripts/grafana_configmap.py: edit the JSON, then rerun the script.
#
# Grafana with the dashboard sidecar (kube-prometheus-stack, grafana chart): apply this ConfigMap in a
# namespace the sidecar watches; the grafana_dashboard label makes it pick up sknf.json.
# Plain Grafana provisioning: mount the key sknf-provider.yaml (subPath) into
# /etc/grafana/provisioning/dashboards/ and sknf.json into /var/lib/grafana/dashboards/sknf/.
# The dashboard asks for its Prometheus data source (${datasource}); nothing names one.
apiVersion: v1
kind: ConfigMap
metadata:
  name: sknf-grafana-dashboard
  labels:
    app.kubernetes.io/name: sknf
    app.kubernetes.io/component: dashboard
    grafana_dashboard: "1"
data:
  sknf-provider.yaml: |
    apiVersion: 1
    providers:
      - name: sknf
        folder: sknf
        type: file
        disableDeletion: false
        options:
          path: /var/lib/grafana/dashboards/sknf
  sknf.json: |
"""


def render(dashboard_json: str) -> str:
    body = "".join(f"    {line}\n" if line else "\n" for line in dashboard_json.rstrip("\n").split("\n"))
    return HEADER + body


def main(argv: list[str]) -> int:
    wanted = render(SOURCE.read_text())
    if argv[1:] == ["--check"]:
        if not TARGET.exists() or TARGET.read_text() != wanted:
            print(f"{TARGET} is stale: run scripts/grafana_configmap.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
