#!/usr/bin/env python3
"""Render docs/img/dashboard-*.png: the Grafana dashboard's rows, drawn with matplotlib from the data
of a real Prometheus scraping a lab run (Grafana itself is not installed here).

As root: `.venv/bin/python scripts/observability_pictures.py [--minutes 4]`. It brings up a lab
(prefix "skd"), starts Prometheus in the lab's underlay namespace, drives a few minutes of traffic
and CNI requests, then draws each dashboard row from the dashboard JSON (its panels, layout, queries
and units: the JSON stays the one source), with every query run against that Prometheus.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the file-only backend

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests" / "integration")]

from promserver import Prometheus  # noqa: E402
from pyroute2 import netns as pnetns  # noqa: E402

from sknf import nsutil  # noqa: E402
from sknf.lab import METRICS_PORT, Lab, bulk, run_chain, who  # noqa: E402

DASHBOARD = REPO / "manifests" / "grafana" / "sknf-dashboard.json"
OUT = REPO / "docs" / "img"
WIDTH = 1600  # pixels: Grafana's 24 grid columns across
ROW_UNITS = 36  # pixels per grid row unit (Grafana: 30 plus margins)
HEADER = 40  # pixels above the panels for the row's title


def drive(lab: Lab, seconds: float) -> None:
    """Traffic with some shape: bulk transfers of varying size between varying pods, a pod that comes
    and goes (CNI ADD/DEL), and small request/response flows."""
    rng = random.Random(7)
    pods = lab.state.pods
    n1 = lab.state.nodes[0]
    end = time.monotonic() + seconds
    extra = None
    while time.monotonic() < end:
        src, dst = rng.sample(pods, 2)
        bulk(src.netns, dst.ip, rng.choice([1, 4, 16, 32]) << 20)
        who(pods[0].netns, pods[-1].ip)
        if extra is None and rng.random() < 0.3:
            extra = f"skd-x{rng.randrange(1000)}"
            pnetns.create(extra)
            run_chain(lab.plugin_dir, "ADD", lab.conflist(n1), container_id=extra.ljust(64, "0"),
                      netns=nsutil.netns_path(extra), args=f"K8S_POD_NAMESPACE=batch;K8S_POD_NAME={extra[4:]}")
        elif extra is not None and rng.random() < 0.3:
            run_chain(lab.plugin_dir, "DEL", lab.conflist(n1), container_id=extra.ljust(64, "0"),
                      netns=nsutil.netns_path(extra))
            pnetns.remove(extra)
            extra = None
        time.sleep(rng.uniform(0.5, 3))
    if extra is not None:
        run_chain(lab.plugin_dir, "DEL", lab.conflist(n1), container_id=extra.ljust(64, "0"),
                  netns=nsutil.netns_path(extra))
        pnetns.remove(extra)


def expand(expr: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expr = expr.replace(name, value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or str(labels)


def scale(unit: str | None, values: list[float]) -> tuple[float, str]:
    """(divisor, label) that makes the largest value readable in the panel's Grafana unit."""
    top = max((abs(v) for v in values if not math.isnan(v)), default=0)
    if unit == "bps":
        for div, name in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
            if top >= div:
                return div, name
        return 1, "bit/s"
    if unit == "percentunit":
        return 0.01, "%"
    if unit == "s":
        return (1e-3, "ms") if top < 1 else (1, "s")
    return 1, {"reqps": "req/s", "pps": "packets/s"}.get(unit or "", "")


def series(prom: Prometheus, panel: dict, values: dict[str, str], start: float, end: float):
    for t in panel["targets"]:
        for s in prom.query_range(expand(t["expr"], values), start, end, step=5):
            xs = [float(ts) - end for ts, _ in s["values"]]
            ys = [float(v) for _, v in s["values"]]
            yield legend(t["legendFormat"], s["metric"]), xs, ys


def draw(ax, panel: dict, prom: Prometheus, values: dict[str, str], start: float, end: float) -> None:
    unit = panel["fieldConfig"]["defaults"].get("unit")
    data = list(series(prom, panel, values, start, end))
    if not data:
        ax.text(0.5, 0.5, "No data", ha="center", va="center", color="#8e8e8e", transform=ax.transAxes)
        ax.set_axis_off()
        return
    div, label = scale(unit, [y for _, _, ys in data for y in ys])
    if panel["type"] == "timeseries":
        for name, xs, ys in data:
            ax.plot([x / 60 for x in xs], [y / div for y in ys], linewidth=1.2, label=name)
        ax.set_xlabel("minutes before the end of the run", fontsize=7, color="#8e8e8e")
        ax.set_ylabel(label, fontsize=7, color="#8e8e8e")
        ax.legend(fontsize=6, loc="upper left", frameon=False, labelcolor="#d8d9da", ncol=2)
        ax.tick_params(labelsize=7, colors="#8e8e8e")
        ax.grid(alpha=0.15)
    elif panel["type"] == "bargauge":
        last = sorted(((ys[-1], name) for name, _, ys in data if not math.isnan(ys[-1])))
        ax.barh([n for _, n in last], [v / div for v, _ in last], color="#73bf69")
        ax.set_xlabel(label, fontsize=7, color="#8e8e8e")
        ax.tick_params(labelsize=7, colors="#8e8e8e")
    else:  # stat and gauge: the last value of each series, large, shown as the panel's textMode says
        mode = panel["options"].get("textMode", "auto")
        lines = []
        for name, _, ys in data:
            v = next((y for y in reversed(ys) if not math.isnan(y)), math.nan)
            value = f"{v / div:.3g} {label}".strip()
            if mode == "name":
                lines.append(name)
            elif mode == "value_and_name" or len(data) > 1:
                lines.append(f"{name}: {value}")
            else:
                lines.append(value)
        ax.text(0.5, 0.45, "\n".join(lines), ha="center", va="center", transform=ax.transAxes,
                fontsize=18 if len(lines) == 1 else 12, color="#73bf69", weight="bold")
        ax.set_axis_off()


def render_rows(prom: Prometheus, start: float, end: float, drill: dict[str, str]) -> list[Path]:
    dash = json.loads(DASHBOARD.read_text())
    rows: list[tuple[dict, list[dict]]] = []
    for panel in dash["panels"]:
        if panel["type"] == "row":
            rows.append((panel, []))
        else:
            rows[-1][1].append(panel)
    written = []
    for row, panels in rows:
        top = min(p["gridPos"]["y"] for p in panels)
        height = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) - top
        fig_w, fig_h = WIDTH, HEADER + height * ROW_UNITS
        fig = plt.figure(figsize=(fig_w / 100, fig_h / 100), dpi=100, facecolor="#111217")
        values = {"$__rate_interval": "15s", "$node": ".*", "$namespace": ".*", "$pod": ".*"}
        if row["title"] == "Pod drill-down":
            values.update(drill)
        for p in panels:
            g = p["gridPos"]
            # The panel's box in pixels (origin top left), then the plot area inside it.
            x, w = g["x"] * fig_w / 24, g["w"] * fig_w / 24
            y, h = HEADER + (g["y"] - top) * ROW_UNITS, g["h"] * ROW_UNITS
            left, bottom = {"timeseries": (60, 40), "bargauge": (150, 40)}.get(p["type"], (10, 10))
            ax = fig.add_axes([(x + left) / fig_w, (fig_h - y - h + bottom) / fig_h,
                               (w - left - 15) / fig_w, (h - bottom - 28) / fig_h], facecolor="#181b1f")
            fig.text((x + 8) / fig_w, (fig_h - y - 20) / fig_h, p["title"], fontsize=10, color="#d8d9da")
            draw(ax, p, prom, values, start, end)
        title = f"sknf: pod network / {row['title']}"
        if row["title"] == "Pod drill-down":
            title += f"  (pod {drill['$namespace']}/{drill['$pod']})"
        fig.text(8 / fig_w, 1 - 26 / fig_h, title, fontsize=13, color="#d8d9da")
        path = OUT / f"dashboard-{row['title'].lower().replace(' ', '-')}.png"
        fig.savefig(path, facecolor=fig.get_facecolor())
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with Lab(prefix="skd", nodes=2, pods_per_node=3, datapath="auto") as lab:
        prom = Prometheus([f"{n.underlay_ip}:{METRICS_PORT}" for n in lab.state.nodes], lab.ul)
        try:
            prom.start()
            start = time.time()
            drive(lab, args.minutes * 60)
            end = time.time()
            pod = lab.state.pods[0]
            for path in render_rows(prom, start, end, {"$namespace": "lab", "$pod": pod.name}):
                print(path.relative_to(REPO))
        finally:
            prom.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
