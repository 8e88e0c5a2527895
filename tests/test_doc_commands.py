"""Every command the docs show is run, as the role SQL already is (tests/test_roles.py): each fenced bash, shell
or console block of README.md and docs/*.md. Bash blocks run as scripts with bash -e, against a real database
and receiver, with the docs' placeholders (hosts, paths under /etc and /opt, the token) put in place of here;
commands that run forever (the worker) are stopped with SIGTERM once they have delivered. Console blocks run
each `$ command` and compare its output with the one shown. A command that cannot run here (systemctl, an
index this machine lacks) is listed below with the reason, or with the test that runs it; a command the docs
gain is run like the others, so one that cannot run here fails until it is listed."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from tests.conftest import REPO, TOKEN, url_string, wait_until

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^( *)```(bash|shell|sh|console)\n(.*?)^\1```", re.S | re.M)
BIN = Path(sys.executable).parent

# Commands that other tests run, and which.
ELSEWHERE = {
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[embedded]' && .venv/bin/fp-outbox demo":
        "tests/test_demo.py::test_demo_verdict_holds_and_nothing_is_left_running",
    "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/python -m pytest":
        ".ci/run (it runs this very line, read from the README)",
    "alembic upgrade head": "tests/test_schema.py::test_own_version_table_beside_an_applications_alembic "
                            "(an application's own history beside the outbox's; none exists here)",
}
# Commands that cannot run here, and why.
NOT_HERE = {
    "pip install fp-outbox": "fp-outbox is not on an index this machine reaches; tests/test_install.py installs "
                             "its wheel into a fresh virtual environment",
    "pip install 'fp-outbox[async]'": "the same",
    "pip install 'fp-outbox[embedded]'": "the same",
    "pip install 'fp-outbox[otel]'": "the same",
    "python3 -m venv /opt/fp-outbox/venv && /opt/fp-outbox/venv/bin/pip install fp-outbox": "the same",
    "systemctl daemon-reload && systemctl enable --now fp-outbox-worker": "this machine does not run systemd; "
        "tests/test_systemd.py verifies the units and runs the worker under their sandbox settings",
    "systemctl status fp-outbox-worker": "the same",
    "systemctl daemon-reload && systemctl enable --now fp-outbox-worker@1 fp-outbox-worker@2": "the same",
    "systemctl status 'fp-outbox-worker@*'": "the same",
}


def _commands(script: str) -> list[str]:
    """The block's commands: lines joined while a quote or a here-document is open; comments dropped."""
    commands, current, heredoc = [], [], None
    for line in script.splitlines():
        if heredoc:
            current.append(line)
            if line.strip() == heredoc:
                heredoc = None
                commands.append("\n".join(current))
                current = []
            continue
        current.append(line if current else _uncommented(line))
        joined = "\n".join(current)
        if found := re.search(r"<<'?(\w+)'?", joined):
            heredoc = found.group(1)
        elif not (joined.count("'") % 2 or joined.rstrip().endswith("\\")):
            if joined.strip():
                commands.append(joined.strip())
            current = []
    return commands


def _uncommented(line: str) -> str:
    """The line without a trailing `# comment` (one outside quotes)."""
    for found in re.finditer(r"\s+#\s", line):
        if line[: found.start()].count("'") % 2 == 0 and line[: found.start()].count('"') % 2 == 0:
            return line[: found.start()].rstrip()
    return line


def blocks() -> list[tuple[str, str, str]]:
    """(where, kind, text) of every fenced shell or console block."""
    found = []
    for page in PAGES:
        content = page.read_text()
        for match in BLOCK.finditer(content):
            line = content[: match.start()].count("\n") + 1
            body = "\n".join(row[len(match.group(1)):] for row in match.group(3).splitlines())
            found.append((f"{page.relative_to(REPO)}:{line}", match.group(2), body))
    return found


def _placeholders(tmp_path: Path, db: str) -> dict[str, str]:
    return {
        "postgresql://app@db.internal/app": db, "postgresql://fp_outbox:secret@db.internal:5432/app": db,
        "your-freshpaint-environment-id": TOKEN, "/opt/fp-outbox/venv/bin/": f"{BIN}/",
        "/etc/systemd/system": str(tmp_path / "systemd"), "/etc/fp-outbox": str(tmp_path / "etc"),
        "/tmp/fp-notify": str(tmp_path / "notify.sock"),
    }


def _script(body: str, placeholders: dict[str, str]) -> tuple[str, list[str]]:
    """The block as a script of what runs here, and the commands it left out."""
    kept, left_out = [], []
    for command in _commands(body):
        if command in NOT_HERE or command in ELSEWHERE:
            left_out.append(command)
            continue
        for placeholder, here in placeholders.items():
            command = command.replace(placeholder, here)
        kept.append(command)
    return "\n".join(kept), left_out


BASH = [(where, body) for where, kind, body in blocks() if kind != "console"]
CONSOLE = [(where, body) for where, kind, body in blocks() if kind == "console"]


@pytest.fixture
def env(db_url, sink, tmp_path) -> dict[str, str]:
    (tmp_path / "systemd").mkdir()
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("FP_OUTBOX_", "NOTIFY_SOCKET"))},
            "PATH": f"{BIN}:{os.environ['PATH']}", "FP_OUTBOX_DATABASE_URL": url_string(db_url),
            "FP_OUTBOX_ENDPOINT": sink.url, "FP_OUTBOX_TOKEN": TOKEN, "FP_OUTBOX_POLL_INTERVAL": "0.2"}


@pytest.mark.parametrize("where, body", BASH, ids=[where for where, _ in BASH])
def test_every_shell_block_runs(where, body, clean, db_url, sink, env, tmp_path):
    script, left_out = _script(body, _placeholders(tmp_path, url_string(db_url)))
    if not script:
        assert left_out
        return
    _seed_two_dead_purchases(clean)  # something for the runbook's commands to find
    with Session(clean) as session:  # and something for a worker to deliver
        insert_id = outbox.enqueue(session, {"event": "Docs", "properties": {"distinct_id": "1"}})
        session.commit()
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    runs_a_worker = re.search(r"(^|\s)fp-outbox-worker(\s|$)", script)
    try:
        if runs_a_worker:  # it runs until stopped: stop it once it delivered
            delivered = wait_until(lambda: any(r.insert_id == insert_id for r in sink.accepted()), 30)
            time.sleep(0.5)  # a watchdog or two for the notify listener
            os.killpg(proc.pid, signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:  # nothing the block started outlives the test, whatever happened
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
    assert not runs_a_worker or delivered, f"{where}: the worker delivered nothing:\n{output}"
    assert "Traceback" not in output and "not a valid identifier" not in output, f"{where}:\n{output}"
    if "NOTIFY_SOCKET" in script:
        assert "READY=1" in output, output
    elif runs_a_worker:
        assert "worker stopped" in output, output
    else:
        assert proc.returncode == 0, f"{where} exited {proc.returncode}:\n{script}\n{output}"


def test_the_lists_name_only_commands_the_docs_show():
    shown = {command for _, body in BASH for command in _commands(body)}
    stale = (set(ELSEWHERE) | set(NOT_HERE)) - shown
    assert not stale, f"listed but no longer in the docs: {stale}"
    for reference in ELSEWHERE.values():
        path, _, name = reference.split(" ")[0].partition("::")
        if name:
            assert f"def {name}(" in (REPO / path).read_text(), reference


# -- console blocks: each `$ command` is run and its output compared with the one shown -------------------------

def _seed_two_dead_purchases(engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO fp_outbox_dead_letters (id, insert_id, event_name, payload, created_at, attempts, last_status,"
            " last_error, dead_at) SELECT 100 + g, 'p' || g, 'Purchase', '{}', now(), 1, 400,"
            " 'HTTP 400: {\"error\": \"properties.price must be a number\"}', now() FROM generate_series(1, 2) g"))


def _run(command: str, env: dict[str, str], answer: str | None) -> str:
    """Run `command` through bash, at a terminal (a pty) when the docs show an answer typed at its prompt."""
    if answer is None:
        out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(["bash", "-c", command], env=env, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    seen, deadline = b"", time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        if select.select([primary], [], [], 0.1)[0]:
            try:
                seen += os.read(primary, 4096)
            except OSError:
                break
            if seen.rstrip().endswith(b"[y/N]"):
                os.write(primary, answer.encode() + b"\n")
    proc.wait(30)
    os.close(primary)
    return seen.decode().replace("\r\n", "\n")


def _labels(lines: list[str]) -> list[str]:
    return [re.split(r"\s{2,}", line.strip())[0] for line in lines if line.strip()]


def _compare(command: str, shown: list[str], got: list[str]) -> None:
    """Exact where the figures are the seeded ones; the shape (labels, keys, headers) where they are illustrative."""
    if command.startswith("fp-outbox status --json"):
        assert set(json.loads(got[0])) == set(json.loads(shown[0])), (shown, got)
    elif command.startswith("fp-outbox status"):
        assert _labels(got) == _labels(shown), (shown, got)
    elif command.startswith("fp-outbox dead"):
        assert got[0].split() == shown[0].split() and got[-2:] == shown[-2:], (shown, got)
        assert len(got) == len(shown), (shown, got)
    else:
        assert got == shown, (shown, got)


@pytest.mark.parametrize("where, body", CONSOLE, ids=[where for where, _ in CONSOLE])
def test_every_console_block_shows_what_the_commands_print(where, body, clean, env):
    _seed_two_dead_purchases(clean)
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    assert steps, where
    for command, shown in steps:
        answer = None
        if shown and (prompt := re.search(r"\[y/N\] (\w+)$", shown[0])):
            answer = prompt.group(1)
        got = _run(command, env, answer).rstrip("\n").splitlines()
        _compare(command, shown, got)
