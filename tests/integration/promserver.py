"""A real Prometheus (Debian's /usr/bin/prometheus) for tests and the docs' pictures.

It runs in a network namespace of the caller's choosing (the lab's underlay namespace reaches every
node's metrics address), listens on that namespace's 127.0.0.1, and keeps its TSDB in a temp dir. The
HTTP client opens each socket inside the namespace (setns is per thread), so nothing of it touches
the root namespace's network. stop() kills it by PID and removes the temp dir.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from sknf import netlink, nsutil

PROMETHEUS = "/usr/bin/prometheus"
PORT = 9090


class PrometheusError(RuntimeError):
    pass


class Prometheus:
    def __init__(self, targets: list[str], netns: str, scrape_interval: str = "1s") -> None:
        self.netns = netns
        self.dir = Path(tempfile.mkdtemp(prefix="skd-prom-"))
        config = {"global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                             "evaluation_interval": scrape_interval},
                  "scrape_configs": [{"job_name": "sknf", "static_configs": [{"targets": targets}]}]}
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Prometheus:
        with netlink.route(nsutil.netns_path(self.netns)) as ipr:  # Prometheus listens on 127.0.0.1
            ipr.link("set", index=netlink.link_index(ipr, "lo"), state="up")
        log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{PORT}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=nsutil.preexec_enter(self.netns),
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited: {self.log()}")
            try:
                if self._get("/-/ready")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready after {timeout}s: {self.log()}")

    def log(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- HTTP API ----------------------------------------------------------------------------
    def _get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
        with nsutil.entered(self.netns):
            conn.connect()  # the socket stays in the namespace it was created in
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def api(self, endpoint: str, **params: Any) -> Any:
        """GET /api/v1/<endpoint>; returns `data`, raises PrometheusError with Prometheus's own message."""
        status, body = self._get(f"/api/v1/{endpoint}?{urllib.parse.urlencode(params)}")
        doc = json.loads(body)
        if status != 200 or doc.get("status") != "success":
            raise PrometheusError(f"{endpoint} {params}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": at}
        return self.api("query", **params)["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def wait_scraped(self, after: float, timeout: float = 30) -> None:
        """Block until every target has been scraped successfully at or after unix time `after`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = self.api("targets")["activeTargets"]
            if targets and all(t["health"] == "up" and _ts(t["lastScrape"]) >= after for t in targets):
                return
            time.sleep(0.2)
        raise PrometheusError(f"targets not scraped since {after}: {self.api('targets')['activeTargets']}")


def _ts(rfc3339: str) -> float:
    """Prometheus's lastScrape (RFC 3339, nanoseconds) as unix time; 3.11's fromisoformat reads it."""
    return datetime.fromisoformat(rfc3339).timestamp()
