"""`fp-outbox demo`: the whole job on one machine, with nothing to install or configure.

An embedded PostgreSQL, a local /track receiver, a sample app that commits some business
transactions and rolls others back, worker processes that deliver through a receiver outage and
a killed worker, and a verdict checked against the receiver's own count. Leaves nothing running.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

import outbox
from outbox.db import make_engine
from worker.devtools.embedded import embedded_database
from worker.devtools.sink import Sink
from worker.engine import status_counts

DEMO_TOKEN = "demo-environment-id"
# Short timeouts keep the lease (derived from them) short, so the killed worker's events come
# back within seconds.
WORKER_FLAGS = ["--connect-timeout", "1", "--read-timeout", "2", "--inline-attempts", "2",
                "--retry-base", "0.5", "--retry-cap", "2", "--poll-interval", "0.2", "--concurrency", "16"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--orders", type=int, default=3000, help="business transactions the sample app runs")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the demo gives up")


@dataclass
class AppResult:
    committed: set[str]
    rolled_back: set[str]


def run(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 when the verdict holds, 1 when it does not."""
    if args.orders < 10 or args.workers < 1:
        print("fp-outbox demo: --orders must be at least 10 and --workers at least 1", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fp-outbox-demo-") as scratch:
        say("starting an embedded PostgreSQL and a local /track receiver ...")
        with embedded_database(Path(scratch) / "pgdata", delete=True) as url, Sink(latency=0.005) as sink:
            engine = make_engine(url)
            try:
                app = sample_app(engine, args.orders)
                fleet = Fleet(url.render_as_string(hide_password=False), sink.url, Path(scratch), args.workers)
                try:
                    finished = deliver(engine, sink, fleet, len(app.committed), args.timeout)
                finally:
                    fleet.stop()
                return verdict(app, sink, engine, finished, time.monotonic() - started)
            finally:
                engine.dispose()


def sample_app(engine, orders: int) -> AppResult:
    """A shop: each order row and its event commit together; every tenth order fails and rolls back."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE demo_orders (id serial PRIMARY KEY, customer text, amount numeric)"))
    committed, rolled_back = set(), set()
    for n in range(orders):
        with Session(engine) as session:
            session.execute(text("INSERT INTO demo_orders (customer, amount) VALUES (:c, :a)"),
                            {"c": f"customer-{n % 97}", "a": 10 + n % 50})
            insert_id = outbox.enqueue(session, {"event": "Order Completed", "properties": {
                "distinct_id": f"customer-{n % 97}", "order": n, "amount": 10 + n % 50}})
            if n % 10 == 9:
                session.rollback()  # payment declined: no order, and so no event
                rolled_back.add(insert_id)
            else:
                session.commit()
                committed.add(insert_id)
    say(f"sample app: {len(committed):,} orders committed with their events, {len(rolled_back):,} rolled back")
    return AppResult(committed, rolled_back)


class Fleet:
    """The worker processes of the demo, each a real `fp-outbox-worker`."""

    def __init__(self, database_url: str, endpoint: str, scratch: Path, count: int) -> None:
        self._cmd = [sys.executable, "-m", "worker", "--database-url", database_url, "--endpoint", endpoint,
                     "--token", DEMO_TOKEN, *WORKER_FLAGS]
        self._log = open(scratch / "workers.log", "ab")
        self.processes = [self.start() for _ in range(count)]

    def start(self) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FP_OUTBOX_")}
        return subprocess.Popen(self._cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def kill_one(self) -> None:
        victim = self.processes.pop(0)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        self.processes.append(self.start())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(35)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        self._log.close()


def deliver(engine, sink: Sink, fleet: Fleet, total: int, timeout: float) -> bool:
    """Watch the workers drain the outbox, injecting an outage and a crash on the way."""
    say(f"{len(fleet.processes)} workers delivering; on the way: a 2 s receiver outage and a worker killed with SIGKILL")
    deadline = time.monotonic() + timeout
    outage_done = kill_done = False
    while time.monotonic() < deadline:
        counts = status_counts(engine)
        done = counts["delivered"] + counts["dead"]
        progress(done, total)
        if not outage_done and done >= total * 0.3:
            sink.outage(2.0, status=503)
            outage_done = True
        if not kill_done and done >= total * 0.6:
            fleet.kill_one()
            kill_done = True
        if counts["pending"] == 0 and counts["in_flight"] == 0 and kill_done:
            progress(done, total, final=True)
            return True
        time.sleep(0.2)
    progress(done, total, final=True)
    return False


def verdict(app: AppResult, sink: Sink, engine, finished: bool, seconds: float) -> int:
    arrived = {r.insert_id for r in sink.accepted()}
    counts = sink.counts()
    missing = app.committed - arrived
    leaked = app.rolled_back & {r.insert_id for r in sink.received()}
    unknown = arrived - app.committed
    db = status_counts(engine)
    ok = finished and not missing and not leaked and not unknown and db["dead"] == 0
    rows = [
        ("committed events", f"{len(app.committed):,}"),
        ("delivered (distinct $insert_id at the receiver)", f"{len(arrived & app.committed):,}"),
        ("missing", f"{len(missing):,}"),
        ("requests the receiver saw", f"{counts['requests']:,}"),
        ("  answered 503 during the outage, or reset", f"{counts['rejected']:,}"),
        ("duplicates absorbed by $insert_id", f"{counts['duplicates']:,}"),
        ("rolled back, never sent", f"{len(app.rolled_back) - len(leaked):,} of {len(app.rolled_back):,}"),
        ("dead letters", f"{db['dead']:,}"),
        ("time taken", f"{seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"  {key:<{width}}  {value:>10}")
    print()
    print("VERDICT: every committed event delivered, none of the rolled-back ones sent." if ok else
          "VERDICT: FAILED (see the counts above)")
    return 0 if ok else 1


def progress(done: int, total: int, final: bool = False) -> None:
    width = 40
    filled = int(width * min(done, total) / max(total, 1))
    line = f"  [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} settled"
    if sys.stderr.isatty():
        print("\r" + line, end="\n" if final else "", file=sys.stderr, flush=True)
    elif final:
        print(line, file=sys.stderr, flush=True)


def say(message: str) -> None:
    print(f"fp-outbox demo: {message}", file=sys.stderr, flush=True)
