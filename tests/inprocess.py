"""Workers run inside the test process (on threads), for tests that look at what a worker does from the
inside: the statements it sends, its grants of the shared rate budget, its claims. Real database, real
receiver; only the process boundary is gone."""

from __future__ import annotations

import threading

from sqlalchemy.engine import URL

from tests.conftest import TOKEN, url_string
from worker.engine import Settings, Worker, build_parser, from_args

# Short timeouts make the derived lease short; quick retries and polls keep the tests fast.
FAST = ["--connect-timeout", "0.5", "--read-timeout", "1", "--inline-attempts", "2", "--retry-base", "0.2",
        "--retry-cap", "1", "--poll-interval", "0.2"]


def settings(db_url: URL, endpoint: str, *args: str, token: str | None = TOKEN) -> Settings:
    """The worker's settings from these flags, after FAST (so a flag given here wins); no environment."""
    argv = ["--database-url", url_string(db_url), "--endpoint", endpoint, *FAST, *args]
    return from_args(build_parser().parse_args(argv + (["--token", token] if token else [])), environ={})


def start(worker: Worker) -> threading.Thread:
    """Run `worker` on a daemon thread; stop it with worker.stop() and join the thread."""
    runner = threading.Thread(target=worker.run, daemon=True, name="test-worker")
    runner.start()
    return runner


def drain(worker: Worker, timeout: float = 60) -> None:
    """Run a worker made with --drain until it has drained (at most `timeout` seconds), then close its pool."""
    runner = start(worker)
    runner.join(timeout)
    assert not runner.is_alive(), "the worker did not drain in time"
    worker.engine.dispose()
