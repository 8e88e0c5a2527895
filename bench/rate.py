"""`python -m bench rate`: several workers under one --rate-limit, against the fast receiver in a process of its
own: the rate achieved in the steady part and the busiest one-second window (which must never exceed the limit)."""

from __future__ import annotations

import os
import subprocess
import sys

from bench.common import busiest_window, fresh_backlog
from bench.drain import machine_busy_seconds
from worker.devtools.fast_receiver import ReceiverProcess


def bench_rate(engine, url: str, args) -> dict:
    """Drain a backlog with `args.workers` workers sharing `args.rate_limit`."""
    fresh_backlog(engine, args.events)
    with ReceiverProcess() as receiver:
        cmd = [sys.executable, "-m", "worker", "--database-url", url, "--endpoint", receiver.url, "--token",
               "bench-token", "--drain", "--rate-limit", str(args.rate_limit), "--retain-delivered", "off"]
        busy_before = machine_busy_seconds()
        procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(args.workers)]
        for proc in procs:
            assert proc.wait(1800) == 0
        busy = machine_busy_seconds() - busy_before
        times = receiver.arrivals()
    most = busiest_window(times)
    steady = [t for t in times if times[0] + 1 <= t <= times[-1] - 1]  # without ramp-up and tail
    achieved = len(steady) / (steady[-1] - steady[0]) if len(steady) > 1 else 0.0
    return {"workers": args.workers, "rate_limit": args.rate_limit, "requests": len(times),
            "achieved_per_s": round(achieved), "achieved_vs_limit": round(achieved / args.rate_limit, 3),
            "busiest_one_second_window": most,
            "machine_cpu_busy_pct": round(100 * busy / (os.cpu_count() * (times[-1] - times[0])), 1) if len(times) > 1 else None}
