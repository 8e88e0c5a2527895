"""`fp-outbox status --watch` as a person sees it: run under tmux in an 80-column terminal against a real database
with a real worker, the screen read with capture-pane; it refreshes every second, fits 80 columns, and q or
Ctrl-C ends it cleanly with the terminal restored. The docs show the view as this test captured it (set
FP_OUTBOX_WATCH_CAPTURE=PATH to write the capture there), and a test holds their shape to the current layout."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

import outbox
from tests import inprocess, storage
from tests.conftest import REPO, url_string, wait_until
from worker.admin.report import figures
from worker.admin.watch import WIDTH, Figures, frame
from worker.engine import Worker

REQUIRED = os.environ.get("FP_OUTBOX_REQUIRE_TMUX") == "1"
DOCS = REPO / "docs" / "operations.md"
MARKER = "<!-- watch-view -->"


class Tmux:
    """A tmux server of this test's own (its own socket), running one command in an 80x24 window."""

    def __init__(self, command: str) -> None:
        self.socket = f"fpo-watch-{uuid.uuid4().hex[:8]}"
        self._tmux("new-session", "-d", "-s", "watch", "-x", str(WIDTH), "-y", "24", command)

    def _tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, timeout=10)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "watch")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "watch", *keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def tmux() -> Iterator:
    if shutil.which("tmux") is None:
        reason = "tmux is not installed (Debian: apt-get install tmux)"
        if REQUIRED:
            pytest.fail(f"{reason}, and FP_OUTBOX_REQUIRE_TMUX=1 says it must run here", pytrace=False)
        pytest.skip(reason)
    started: list[Tmux] = []

    def start(command: str) -> Tmux:
        started.append(Tmux(command))
        return started[-1]

    yield start
    for server in started:
        server.close()


def _fp_outbox() -> str:
    script = Path(sys.executable).with_name("fp-outbox")
    return str(script) if script.exists() else f"{sys.executable} -c 'import sys; from worker.admin import main; sys.exit(main())'"


def _watching(tmux, db_url) -> Tmux:
    # After the view: its exit status, and whether the terminal is back in canonical mode (Enter ends a line).
    command = (f"{_fp_outbox()} status --watch --database-url '{url_string(db_url)}'; echo EXIT=$?; "
               "stty -a | grep -o -- '-*icanon' | sed 's/^/TERMINAL=/'; sleep 60")
    return tmux(command)


@pytest.fixture
def busy(clean, db_url, sink):
    """Delivered and dead events, and a worker that stays connected."""
    sink.set_faults(reject_events={"Refused": 400})
    with Session(clean) as session:
        outbox.enqueue_many(session, [{"event": name, "properties": {"distinct_id": str(n)}}
                                      for n in range(12) for name in ("Purchase",) * 3 + ("Refused",)])
        session.commit()
    worker = Worker(inprocess.settings(db_url, sink.url))
    runner = inprocess.start(worker)
    assert wait_until(lambda: len(sink.received()) == 48, 30)
    yield clean
    worker.stop()
    runner.join(30)
    worker.engine.dispose()


def test_the_live_view_in_an_80_column_terminal(busy, db_url, tmux, tmp_path):
    screen = _watching(tmux, db_url)
    assert wait_until(lambda: "36" in screen.screen() and "1 connected" in screen.screen(), 15), screen.screen()
    first = screen.screen()
    lines = first.rstrip("\n").splitlines()
    assert all(len(line) <= WIDTH for line in lines)
    assert lines[0].startswith("fp-outbox status --watch") and lines[0].endswith("q: quit")
    assert re.search(r"^states +pending +0 +in flight +0 +dead +12$", first, re.M), first
    assert re.search(r"^ +delivered +36$", first, re.M), first
    assert re.search(r"^workers +1 connected$", first, re.M), first
    for label in ("rates", "lag", "horizon"):
        assert re.search(rf"^{label} ", first, re.M), first
    capture = tmp_path / "watch.txt"
    capture.write_text(first.rstrip("\n") + "\n")
    if os.environ.get("FP_OUTBOX_WATCH_CAPTURE"):
        Path(os.environ["FP_OUTBOX_WATCH_CAPTURE"]).write_text(capture.read_text())
    for id_ in (10**9, 10**9 + 1, 10**9 + 2):  # three more die while we watch: the next second's view shows them
        storage.dead_letter(busy, id_)
    assert wait_until(lambda: re.search(r"dead +15$", screen.screen(), re.M), 5), screen.screen()
    started = time.monotonic()
    screen.keys("q")
    assert wait_until(lambda: "EXIT=0" in screen.screen(), 5), screen.screen()
    assert time.monotonic() - started < 3
    assert wait_until(lambda: "TERMINAL=" in screen.screen(), 5), screen.screen()
    assert "TERMINAL=icanon" in screen.screen(), screen.screen()  # cbreak undone


def test_ctrl_c_ends_it_cleanly(clean, db_url, tmux):
    screen = _watching(tmux, db_url)
    assert wait_until(lambda: "q: quit" in screen.screen(), 15), screen.screen()
    screen.keys("C-c")
    assert wait_until(lambda: "EXIT=0" in screen.screen() and "TERMINAL=" in screen.screen(), 5), screen.screen()
    assert "Traceback" not in screen.screen() and "TERMINAL=icanon" in screen.screen()


def test_watch_and_json_together_are_refused(clean, db_url, capsys):
    from worker.admin import main

    assert main(["status", "--watch", "--json", "--database-url", url_string(db_url)]) == 2
    assert "use one of them" in capsys.readouterr().err


def test_the_whole_table_is_read_only_as_often_as_it_is_cheap(clean):
    now = [100.0]
    source = Figures(clean, clock=lambda: now[0])
    source.refresh()
    assert source.full_read_at == 100.0
    source.full_took = 0.5  # a table that takes half a second to count
    source._next_full = source.full_read_at + 20 * source.full_took
    now[0] = 105.0
    source.refresh()
    assert source.full_read_at == 100.0  # only the cheap figures
    now[0] = 110.0
    source.refresh()
    assert source.full_read_at == 110.0


def _shape(lines: list[str]) -> list[tuple[str, ...]]:
    """What a layout is made of, whatever the figures: each line's label and cell names (digits and values
    left out), the header's start and the footer's."""
    body = []
    for line in lines[2:-1]:
        names = [line[start:start + 9].strip() for start in (10, 33, 56)]
        body.append((line[:10].strip(), *(n if re.fullmatch(r"[a-z][a-z ]*", n) else "" for n in names)))
    return [(lines[0][:24],), *body, (lines[-1][:20],)]


def _documented() -> list[str]:
    found = re.search(rf"{MARKER}\n```text\n(.*?)```", DOCS.read_text(), re.S)
    assert found, f"{DOCS.relative_to(REPO)} has no ```text block after {MARKER}"
    return found.group(1).rstrip("\n").splitlines()


def test_the_docs_show_the_current_layout(clean):
    current = frame(figures(clean), Figures(clean), "db on host:5432")
    documented = _documented()
    assert _shape(documented) == _shape(current), "the watch view changed: paste a new capture into the docs " \
        "(FP_OUTBOX_WATCH_CAPTURE=/tmp/watch.txt pytest tests/test_watch.py -k 80_column)"
    assert all(len(line) <= WIDTH for line in documented)
