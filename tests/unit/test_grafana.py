"""The Grafana dashboard: one source (the JSON), a ConfigMap generated from it, no hard-coded data source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "manifests" / "grafana"


def dashboard() -> dict:
    return json.loads((GRAFANA / "sknf-dashboard.json").read_text())


def test_configmap_is_generated_from_the_json() -> None:
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "grafana_configmap.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    cm = yaml.safe_load((GRAFANA / "sknf-dashboard-configmap.yaml").read_text())
    assert json.loads(cm["data"]["sknf.json"]) == dashboard()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    provider = yaml.safe_load(cm["data"]["sknf-provider.yaml"])
    assert provider["providers"][0]["type"] == "file"
    kubernetes_validate.validate(cm, "1.30", strict=True)


def test_datasource_is_a_variable_everywhere() -> None:
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"node", "namespace", "pod"} <= set(variables)
    for v in ("node", "namespace", "pod"):
        assert variables[v]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    queries = [p for p in d["panels"] if p["type"] != "row"]
    assert len(queries) >= 15
    for p in queries:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]


def test_panels_cover_the_issue() -> None:
    exprs = " ".join(t["expr"] for p in dashboard()["panels"] for t in p.get("targets", []))
    for needle in ("topk(", "histogram_quantile(", "sknf_pod_fastpath_packets_total", "sknf_ipam_capacity_addresses",
                   "sknf_datapath_mode", "sknf_cni_requests_total", "sknf_overlay_peers",
                   "sknf_reconcile_errors_total", 'pod=~"$pod"', 'namespace=~"$namespace"', 'node=~"$node"'):
        assert needle in exprs, needle


def test_panels_do_not_overlap() -> None:
    cells: set[tuple[int, int]] = set()
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, p["title"]
        cells |= mine
