"""A real Prometheus for the tests (Debian's `prometheus` package, with promtool): our own process on a free
port, a temporary configuration and storage, never the packaged service. Without the binaries the tests that
need them skip, saying so; with FP_OUTBOX_REQUIRE_PROMETHEUS=1 (set by .ci/run) they fail instead."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

REQUIRED = os.environ.get("FP_OUTBOX_REQUIRE_PROMETHEUS") == "1"
RULES = REPO / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = REPO / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "fp-outbox.json"
JOB = "fp-outbox"


def binary(name: str) -> str:
    """The path of `prometheus` or `promtool`; skips (or fails, where required) without it."""
    found = shutil.which(name)
    if found is None:
        reason = f"{name} is not installed (Debian: apt-get install prometheus)"
        if REQUIRED:
            pytest.fail(f"{reason}, and FP_OUTBOX_REQUIRE_PROMETHEUS=1 says it must run here", pytrace=False)
        pytest.skip(reason)
    return found


class Prometheus:
    """A running Prometheus; query() runs PromQL through its HTTP API."""

    def __init__(self, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    def api(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as answer:
                return json.load(answer)
        except urllib.error.HTTPError as exc:  # a query that does not parse: 400 with the error as JSON
            return json.load(exc)

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def value(self, expr: str) -> float | None:
        """The single value of `expr` now, or None when it returns nothing."""
        result = self.query(expr).get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if result else None


@contextmanager
def running(folder: Path, targets: list[str], scrape_interval: str = "1s") -> Iterator[Prometheus]:
    """Prometheus scraping `targets` (host:port) as job "fp-outbox", with alerts.yml loaded."""
    executable = binary("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
    }))
    port = free_port()
    log = folder / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([executable, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"], stdout=out, stderr=subprocess.STDOUT)
    server = Prometheus(port, log)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if server.api("status/buildinfo").get("status") == "success":
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise AssertionError(f"prometheus did not start: {log.read_text()[-2000:]}")
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
