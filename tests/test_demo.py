"""`fp-outbox demo` as a new user runs it: an embedded PostgreSQL, workers, faults and a true verdict,
leaving nothing running."""

from __future__ import annotations

import subprocess
import sys

import pytest

pgserver = pytest.importorskip("pgserver")


def _postgres_processes() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()[1:] if "pgserver" in line and "postgres" in line}


def _worker_processes() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, check=True).stdout
    return {int(line.split()[0]) for line in out.splitlines()[1:] if "-m worker" in line and "demo-environment-id" in line}


def test_demo_verdict_holds_and_nothing_is_left_running(tmp_path):
    before = _postgres_processes()
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from worker.admin import main; sys.exit(main())", "demo",
         "--orders", "400", "--workers", "2"],
        capture_output=True, text=True, timeout=240, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "VERDICT: every committed event delivered" in result.stdout
    assert "committed events" in result.stdout and "360" in result.stdout
    assert _postgres_processes() <= before
    assert not _worker_processes()
