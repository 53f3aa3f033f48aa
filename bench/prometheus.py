"""A real Prometheus server (Debian's ``prometheus`` binary) scraping Pipeswitch, for the bench
and the deployment tests.

The Grafana dashboard and the Compose stack only help an operator if their PromQL runs on the
real engine against what ``/metrics`` exports. This starts ``prometheus`` on a loopback port with
a throw-away TSDB and one scrape job, and answers instant and range queries over its HTTP API
(``/api/v1/query``, ``/api/v1/query_range``), so the dashboard PNG is drawn from Prometheus's own
answers and a test can check every panel's expression.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

Labels = frozenset[tuple[str, str]]

PROMETHEUS = "prometheus"
PROMTOOL = "promtool"


class PrometheusError(RuntimeError):
    """Prometheus refused a query or did not start."""


def available() -> bool:
    """Whether the ``prometheus`` binary is on PATH (CI installs Debian's package)."""
    return shutil.which(PROMETHEUS) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RealPrometheus:
    """``async with RealPrometheus(["127.0.0.1:8080"]) as prom: await prom.query(...)``."""

    def __init__(self, targets: list[str], *, scrape_interval_s: float = 1.0) -> None:
        self.targets = targets
        self.scrape_interval_s = scrape_interval_s
        self.port = 0
        self.base = ""
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> RealPrometheus:
        self._dir = tempfile.TemporaryDirectory(prefix="pipeswitch-prom-")
        root = Path(self._dir.name)
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        targets = ", ".join(f'"{t}"' for t in self.targets)
        (root / "prometheus.yml").write_text(
            f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
            "scrape_configs:\n  - job_name: pipeswitch\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: [{targets}]\n"
        )
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._log = open(root / "prometheus.log", "wb")  # noqa: SIM115, ASYNC230 - a local log file, closed in __aexit__
        self._proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={root / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._http = aiohttp.ClientSession()
        deadline = time.monotonic() + 30.0
        while True:
            if self._proc.poll() is not None:
                raise PrometheusError(f"prometheus exited {self._proc.returncode}: {self.log()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with self._http.get(f"{self.base}/-/ready") as r:
                    if r.status == 200:
                        return self
            if time.monotonic() > deadline:
                raise PrometheusError(f"prometheus not ready in 30 s: {self.log()}")
            await asyncio.sleep(0.2)

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                await asyncio.to_thread(self._proc.wait, 10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait)
        self._log.close()
        if self._dir is not None:
            self._dir.cleanup()

    def log(self) -> str:
        """The tail of Prometheus's own log (for error messages)."""
        if self._dir is None:
            return ""
        path = Path(self._dir.name) / "prometheus.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    async def _api(self, path: str, params: dict[str, str]) -> Any:
        assert self._http is not None
        async with self._http.get(f"{self.base}/api/v1/{path}", params=params) as r:
            body = await r.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{params.get('query', path)}: {body.get('error', body)}")
        return body["data"]

    async def query(self, expr: str) -> dict[Labels, float]:
        """Instant query: label set -> value (a vector or a scalar)."""
        data = await self._api("query", {"query": expr})
        if data["resultType"] == "scalar":
            return {frozenset(): float(data["result"][1])}
        return {frozenset(s["metric"].items()): float(s["value"][1]) for s in data["result"]}

    async def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> dict[Labels, list[tuple[float, float]]]:
        """Range query: label set -> [(unix time, value)] (NaN points dropped)."""
        data = await self._api(
            "query_range",
            {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"},
        )
        out: dict[Labels, list[tuple[float, float]]] = {}
        for s in data["result"]:
            pts = [(float(t), float(v)) for t, v in s["values"] if v not in ("NaN", "+Inf", "-Inf")]
            out[frozenset(s["metric"].items())] = pts
        return out

    async def scrapes_of(self, job: str = "pipeswitch") -> float:
        """How many samples of ``up`` Prometheus holds for the job (scrapes so far)."""
        got = await self.query(f'count_over_time(up{{job="{job}"}}[1h])')
        return sum(got.values())

    async def target_health(self) -> list[dict[str, Any]]:
        """``/api/v1/targets``' active targets (health, last error)."""
        data = await self._api("targets", {})
        return list(data["activeTargets"])


def promtool_check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``promtool check config PATH`` (syntax and semantics of a Prometheus config)."""
    return subprocess.run(
        [PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
