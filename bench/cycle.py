"""python -m bench cycle: the claim -> settle cycle alone, against pgqueuer.

Ours: one worker, in process, HTTP replaced by a transport that answers 200 at once, claims of up to 100
(--concurrency 100). Theirs: pgqueuer in its own benchmark's configuration (tools/benchmark.py, drain
strategy): the asyncpg driver, one connection and one PgQueuer per consumer, all consumers on one uvloop
event loop, a no-op entrypoint; here with 1 and with 5 consumers, batches of 100. Both drain the same number
of jobs on the same database, one after the other.
"""

from __future__ import annotations

import asyncio
import time

from bench.common import InstantTransport, fresh_backlog

CONSUMERS = (1, 5)
BATCH = 100


def bench_cycle(engine, url: str, args) -> dict:
    """Events/s of our cycle and of pgqueuer with 1 and 5 consumers; ours against the best of theirs."""
    from worker.engine import Worker, build_parser, from_args

    fresh_backlog(engine, args.events, per_transaction=5000)
    settings = from_args(build_parser().parse_args(
        ["--database-url", url, "--drain", "--rate-limit", "1000000", "--concurrency", str(BATCH)]), environ={})
    worker = Worker(settings, sender=InstantTransport())
    started = time.perf_counter()
    worker.run()
    ours = args.events / (time.perf_counter() - started)
    worker.engine.dispose()
    print(f"  fp-outbox, 1 worker: {ours:,.0f} events/s", flush=True)
    dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    figures = {"events": args.events, "batch": BATCH, "fp_outbox": "1 worker, in process, claims of up to 100",
               "fp_outbox_events_per_s": round(ours),
               "pgqueuer": f"pgqueuer {_version()}, asyncpg driver, {_loop_name()} loop, no-op entrypoint, drain"}
    for consumers in CONSUMERS:
        theirs = _run_loop(_pgqueuer_drain(dsn, args.events, consumers))
        print(f"  pgqueuer, {consumers} consumer(s): {theirs:,.0f} jobs/s", flush=True)
        figures[f"pgqueuer_{consumers}_consumers_jobs_per_s"] = round(theirs)
    best = max(figures[f"pgqueuer_{c}_consumers_jobs_per_s"] for c in CONSUMERS)
    figures["fp_outbox_vs_best_pgqueuer"] = round(ours / best, 3)
    return figures


async def _pgqueuer_drain(dsn: str, jobs: int, consumers: int) -> float:
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    setup = await asyncpg.connect(dsn=dsn)
    queries = Queries(AsyncpgDriver(setup))
    if not await queries.schema_is_installed():
        await queries.install()
    await queries.clear_queue()
    await queries.clear_statistics_log()
    for start in range(0, jobs, 5000):
        count = min(jobs, start + 5000) - start
        await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
    connections = [await asyncpg.connect(dsn=dsn) for _ in range(consumers)]
    pgqs = [PgQueuer(AsyncpgDriver(connection)) for connection in connections]
    for pgq in pgqs:
        @pgq.entrypoint("noop")
        async def noop(job) -> None:
            return None

    started = time.perf_counter()
    await asyncio.gather(*(pgq.run(batch_size=BATCH, mode=QueueExecutionMode.drain) for pgq in pgqs))
    elapsed = time.perf_counter() - started
    for connection in [*connections, setup]:
        await connection.close()
    return jobs / elapsed


def _run_loop(coroutine):
    try:
        import uvloop
    except ImportError:  # pgqueuer's benchmark uses uvloop; plain asyncio otherwise
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _version() -> str:
    from importlib.metadata import version

    return version("pgqueuer")
