"""The sd_notify client against a real AF_UNIX datagram socket, the way systemd listens for it."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.engine.notify import Notifier


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket at a short path (AF_UNIX paths are limited to 107 bytes)."""
    folder = Path(tempfile.mkdtemp(prefix="fpn-", dir="/tmp"))
    path = str(folder / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(2)
    yield sock, path
    sock.close()
    os.unlink(path)
    folder.rmdir()


def _drain(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting now, without blocking."""
    got = []
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(4096))
    except BlockingIOError:
        return got
    finally:
        sock.settimeout(2)


def test_ready_status_stopping_arrive_as_datagrams(listener):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    notifier.ready()
    notifier.status("delivering: 12 in flight\n3 retrying")
    notifier.stopping()
    assert [sock.recv(4096) for _ in range(3)] == [b"READY=1", b"STATUS=delivering: 12 in flight 3 retrying",
                                                   b"STOPPING=1"]
    notifier.close()


def test_abstract_socket_names_start_with_at():
    name = f"fp-outbox-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"


def test_watchdog_is_sent_at_most_every_half_interval(listener):
    sock, path = listener
    now = [100.0]
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=lambda: now[0])
    assert notifier.watchdog_interval == 1.0
    sent_at = []
    for moment in (100.0, 100.4, 100.99, 101.0, 101.5, 102.2, 102.3):
        now[0] = moment
        notifier.watchdog()
        if _drain(sock) == [b"WATCHDOG=1"]:
            sent_at.append(moment)
    assert sent_at == [100.0, 101.0, 102.2]


@pytest.mark.parametrize("env", [
    {},                                              # no watchdog configured
    {"WATCHDOG_USEC": "0"},
    {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"},  # meant for another process
])
def test_watchdog_is_off_unless_meant_for_this_process(listener, env):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, **env})
    notifier.watchdog()
    assert notifier.watchdog_interval is None and _drain(sock) == []


def test_watchdog_for_this_pid(listener):
    sock, path = listener
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
    notifier.watchdog()
    assert notifier.watchdog_interval == 15.0 and sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "relative/path"}])
def test_without_a_manager_every_call_is_a_no_op(env):
    notifier = Notifier({**env, "WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready()
    notifier.watchdog()
    notifier.status("x")
    notifier.stopping()
    notifier.close()


def test_a_vanished_manager_never_raises(tmp_path):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    notifier.ready()  # nothing listens there: ignored
    notifier.stopping()


def test_reads_notify_socket_from_the_environment(listener, monkeypatch):
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    Notifier().ready()
    assert sock.recv(4096) == b"READY=1"


def test_the_watchdog_is_fed_through_a_long_429_pause_and_idle_polls(listener, clean, db_url, sink, workers):
    """WatchdogSec=2 s: the worker must say WATCHDOG=1 at least every 2 s from READY=1 to its exit, through
    the global pause after a 429 with Retry-After: 4, long idle polls and the shutdown."""
    from sqlalchemy.orm import Session

    import outbox
    from tests.conftest import status_of, wait_until

    sock, path = listener
    with Session(clean) as session:
        outbox.enqueue_many(session, [{"event": "E", "properties": {"distinct_id": str(i)}} for i in range(20)])
        session.commit()
    sink.answer_next(429, retry_after="4")
    heard: list[tuple[float, bytes]] = []
    done = threading.Event()

    def hear() -> None:
        sock.settimeout(0.2)
        while not done.is_set():
            try:
                heard.append((time.monotonic(), sock.recv(4096)))
            except TimeoutError:
                pass

    thread = threading.Thread(target=hear, daemon=True)
    thread.start()
    # The lease is 9 s with these timeouts, so a 4 s pause is waited out holding the claimed rows.
    worker = workers(db_url, sink.url, "--connect-timeout", "0.5", "--read-timeout", "1", "--inline-attempts", "2",
                     "--concurrency", "4", "--poll-interval", "5", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    try:
        assert wait_until(lambda: status_of(clean) == {"delivered": 20}, 40), worker.output()
        time.sleep(6)  # idle: one poll of 5 s
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.output()
    finally:
        done.set()
        thread.join(5)
    limited = [r.arrived_at for r in sink.received() if r.status == 429]
    after = [r.arrived_at for r in sink.received() if limited and r.arrived_at > limited[0] + 0.5]
    assert limited and min(after) - limited[0] > 3.5  # the pause really happened, with rows claimed
    ready = next(at for at, message in heard if message == b"READY=1")
    beats = [ready] + [at for at, message in heard if message == b"WATCHDOG=1" and at > ready] + [time.monotonic()]
    gaps = [later - earlier for earlier, later in zip(beats, beats[1:])]
    assert max(gaps) < 2.0, f"{max(gaps):.2f} s without WATCHDOG=1"
