"""A real Prometheus (Debian's `prometheus` package, started here) scrapes a
real gateway whose breaker is held open, evaluates the shipped alert rules
(a copy with short `for:` durations), and TokenrelayBreakerOpen reaches
`firing` in its HTTP API. The wait is bounded and polls the API; nothing
asserts how long it took."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from redisproc import free_port
from serverkit import RelayFactory, eventually, run_to_end, start_request

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
FIRING_WITHIN_S = 120.0  # a hang guard: scrapes and evaluations run every second


class Prometheus:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    async def get(self, path: str) -> Any:
        async with httpx.AsyncClient(base_url=self.url) as client:
            response = await client.get(path)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]

    def problem(self) -> str:
        return f"(prometheus exit code {self.process.poll()}; its log:\n{self.log.read_text()})"


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    binary = shutil.which("prometheus")
    assert binary is not None, (
        "the Prometheus server is needed: `make test` installs Debian's prometheus package"
    )
    started: list[Prometheus] = []

    def start(metrics_port: int) -> Prometheus:
        # The shipped rules with every `for:` cut to 2 s, so the test does not
        # wait five minutes; the expressions are the shipped ones.
        rules = tmp_path / "rules.yml"
        rules.write_text(re.sub(r"for: \w+", "for: 2s", RULES.read_text()))
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {rules}\n"
            "scrape_configs:\n  - job_name: tokenrelay\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{metrics_port}']\n"
        )
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as output:
            process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        server = Prometheus(f"http://127.0.0.1:{port}", process, log)
        started.append(server)
        return server

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


async def test_a_real_prometheus_fires_the_breaker_alert_for_a_breaker_held_open(
    relay_factory: RelayFactory, prometheus_for: Any
) -> None:
    relay = await relay_factory(
        metrics_port=0, breaker_failure_threshold=1, breaker_cooldown_s=3600, max_retries=0
    )
    async with grpc.aio.insecure_channel(relay.address) as channel:
        events = await run_to_end(channel, start_request(metadata={"sim.faults": "http:500"}))
    assert events[-1].end.error.code == "HTTP_500"
    # One failure with threshold 1 and an hour's cool-down: the breaker of
    # sim/sim is open for the rest of the test.
    assert str(relay.hub.recovery.health.breakers()[("sim", "sim")].state) == "open"
    assert relay.metrics_port is not None
    prometheus = prometheus_for(relay.metrics_port)

    alerts: list[dict[str, Any]] = []

    async def firing_breaker() -> bool:
        nonlocal alerts
        if prometheus.process.poll() is not None:
            raise AssertionError(f"prometheus exited {prometheus.problem()}")
        try:
            alerts = (await prometheus.get("/api/v1/alerts"))["alerts"]
        except httpx.TransportError:
            alerts = []  # not listening yet
        except httpx.HTTPStatusError as error:
            # Prometheus answers 503 until its storage is ready (it
            # listens before that); on a loaded machine that is seen.
            if error.response.status_code != 503:
                raise
            alerts = []
        return any(
            a["labels"]["alertname"] == "TokenrelayBreakerOpen" and a["state"] == "firing"
            for a in alerts
        )

    try:
        await eventually(firing_breaker, within_s=FIRING_WITHIN_S, poll_s=0.2)
    except TimeoutError:
        raise AssertionError(
            f"no firing breaker alert; alerts: {alerts} {prometheus.problem()}"
        ) from None

    firing = {a["labels"]["alertname"]: a for a in alerts if a["state"] == "firing"}
    breaker = firing["TokenrelayBreakerOpen"]["labels"]
    assert (breaker["provider"], breaker["upstream_model"], breaker["job"]) == (
        "sim",
        "sim",
        "tokenrelay",
    )
    assert breaker["instance"] == f"127.0.0.1:{relay.metrics_port}"
    # The only chain entry of `sim` is that breaker: no provider is left for it.
    no_provider = {
        a["labels"].get("model")
        for a in alerts
        if a["labels"]["alertname"] == "TokenrelayNoProviderAvailable"
    }
    assert no_provider == {"sim"}
    # Prometheus scraped the gateway itself, not a stale copy.
    targets = (await prometheus.get("/api/v1/targets"))["activeTargets"]
    assert [t["health"] for t in targets] == ["up"]
    # Nothing else is wrong with this gateway.
    assert "TokenrelayStoreUnavailable" not in firing and "TokenrelayTakeovers" not in firing
