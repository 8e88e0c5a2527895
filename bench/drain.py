"""`python -m bench drain`: what one worker costs per delivered event, against bare HTTP senders in the same run.

Every sender posts `--events` events with `--concurrency` threads to one fast receiver (worker.devtools.
fast_receiver) in a process of its own that answers at once. CPU is the whole machine's (from /proc/stat)
less the receiver's and this benchmark's own (from /proc/PID/stat), so the worker's PostgreSQL backends are
part of its price. Each figure is taken twice: over the whole run (start-up and tail included) and over the
steady part, from 10 % to 90 % of the events received (sampled every 50 ms).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import fresh_backlog
from worker.devtools.fast_receiver import ReceiverProcess, process_cpu_seconds

BARE_SENDERS = ("session", "adapter", "urllib3", "http.client")
SAMPLE_EVERY = 0.05
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    machine_busy: float  # CPU seconds of every core, from /proc/stat
    excluded: float  # CPU seconds of the receiver and of this process
    received: int
    attributed: float  # CPU seconds of the sender's process and of its database's backends alone


class Attribution:
    """The sender's own CPU plus that of the PostgreSQL backends serving the benchmark's database (the last
    reading of each, since backends come and go): unlike the machine's, untouched by other work on it."""

    def __init__(self, pid: int, backends) -> None:
        self._pid = pid
        self._backends = backends  # () -> pids of the backends serving the sender, now
        self._last: dict[int, float] = {}

    def read(self) -> float:
        for pid in [self._pid, *self._backends()]:
            self._last[pid] = max(self._last.get(pid, 0.0), process_cpu_seconds(pid))
        return sum(self._last.values())


def machine_busy_seconds() -> float:
    """Busy CPU seconds of all cores together since boot (everything but idle and iowait)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def _sample(receiver: ReceiverProcess, attribution: Attribution | None = None) -> Sample:
    received = receiver.stats()["requests"]
    own = sum(os.times()[:2])
    return Sample(time.monotonic(), machine_busy_seconds(), receiver.cpu_seconds() + own, received,
                  attribution.read() if attribution else 0.0)


def measure(receiver: ReceiverProcess, command: list[str], events: int, backends=lambda: []) -> dict:
    """Run `command` to completion while sampling; events/s and CPU µs per event, whole run and steady."""
    receiver.reset()
    samples = [_sample(receiver)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    attribution = Attribution(proc.pid, backends)
    while not (ended := os.wait4(proc.pid, os.WNOHANG))[0]:  # wait4: the sender's own CPU, apart
        time.sleep(SAMPLE_EVERY)
        samples.append(_sample(receiver, attribution))
    samples.append(_sample(receiver))
    proc.returncode = os.waitstatus_to_exitcode(ended[1])
    error = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0 or samples[-1].received < events:
        raise RuntimeError(f"{command[:4]} exited {proc.returncode} after {samples[-1].received} of {events} "
                           f"events: {error[-2000:]}")
    first = next(s for s in samples[1:] if s.received >= events * 0.1)
    last = next(s for s in samples[1:-1] if s.received >= events * 0.9)
    own = ended[2].ru_utime + ended[2].ru_stime
    steady = last.received - first.received
    return {**_between(samples[0], samples[-1], "whole"), **_between(first, last, "steady"),
            "steady_attributed_cpu_us_per_event": round((last.attributed - first.attributed) / steady * 1e6),
            "whole_process_cpu_us_per_event": round(own / events * 1e6)}


def _between(start: Sample, end: Sample, label: str) -> dict:
    events = end.received - start.received
    cpu = (end.machine_busy - start.machine_busy) - (end.excluded - start.excluded)
    return {f"{label}_events_per_s": round(events / (end.at - start.at)),
            f"{label}_cpu_us_per_event": round(cpu / events * 1e6) if events else None}


def worker_command(url: str, receiver: ReceiverProcess, concurrency: int) -> list[str]:
    return [sys.executable, "-m", "worker", "--database-url", url, "--endpoint", receiver.url,
            "--token", "bench-token", "--drain", "--concurrency", str(concurrency), "--retain-delivered", "off"]


def bench_drain(engine, url: str, args) -> dict:
    """The worker and each bare sender, `args.rounds` times, interleaved; the median of each figure."""
    runs: dict[str, list[dict]] = collections.defaultdict(list)
    with ReceiverProcess() as receiver:
        for _ in range(args.rounds):
            fresh_backlog(engine, args.events)
            time.sleep(1.0)  # let the enqueue's commits and their wake-ups settle
            runs["worker"].append(measure(receiver, worker_command(url, receiver, args.concurrency), args.events,
                                          lambda: _backends(engine)))
            _report("worker", runs["worker"][-1])
            for kind in BARE_SENDERS:
                command = [sys.executable, "-m", "bench.senders", kind, receiver.url, str(args.events),
                           str(args.concurrency)]
                runs[kind].append(measure(receiver, command, args.events))
                _report(kind, runs[kind][-1])
        if args.profile:
            figures = {"profile": profile_worker(worker_command(url, receiver, args.concurrency), args.profile,
                                                 lambda: fresh_backlog(engine, args.events))}
        else:
            figures = {}
    table = {name: {key: sorted(r[key] for r in results)[len(results) // 2] for key in results[0]}
             for name, results in runs.items()}
    base = table["urllib3"]
    for key in ("whole_cpu_us_per_event", "steady_cpu_us_per_event", "steady_attributed_cpu_us_per_event"):
        table["worker"][key.replace("cpu_us_per_event", "cpu_vs_urllib3")] = round(table["worker"][key] / base[key], 3)
    return {"events": args.events, "concurrency": args.concurrency, "rounds": args.rounds, **table, **figures}


def _backends(engine) -> list[int]:
    from sqlalchemy import text

    with engine.connect() as conn:
        return list(conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                                      " AND pid <> pg_backend_pid()")).scalars())


def _report(name: str, figures: dict) -> None:
    print(f"  {name:<12} steady {figures['steady_events_per_s']:>6}/s {figures['steady_cpu_us_per_event']:>5} µs/event"
          f" (sender and its backends {figures['steady_attributed_cpu_us_per_event']:>5})"
          f"   whole {figures['whole_events_per_s']:>6}/s {figures['whole_cpu_us_per_event']:>5} µs/event"
          f" (its own process {figures['whole_process_cpu_us_per_event']:>5})",
          file=sys.stderr)


def profile_worker(command: list[str], out: str, prepare) -> str:
    """Drain under py-spy, twice (collapsed stacks to OUT.txt, a flame graph to OUT.svg); print the top frames."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    for fmt, suffix in (("raw", ".txt"), ("flamegraph", ".svg")):
        prepare()
        # --gil: only the thread holding the GIL, i.e. where the worker's Python time goes
        subprocess.run([spy, "record", "--gil", "--rate", "250", "--format", fmt, "-o", out + suffix, "--",
                        *command], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(summarise_profile(Path(out + ".txt")), file=sys.stderr)
    return out + ".txt"


def summarise_profile(collapsed: Path, top: int = 25) -> str:
    """Top functions by inclusive and by own share of the busy samples of a py-spy raw (collapsed) profile."""
    inclusive, own, total = collections.Counter(), collections.Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames or _idle(frames[-1]):
            continue
        total += int(count)
        own[_short(frames[-1])] += int(count)
        for frame in {_short(f) for f in frames}:
            inclusive[frame] += int(count)
    lines = [f"busy samples: {total}", "inclusive:"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    lines += ["own:"] + [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)


def _short(frame: str) -> str:
    """`send (/x/y/worker/engine/sender.py:57)` -> `send (engine/sender.py)`."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(path.split('/')[-2:])})"


def _idle(frame: str) -> bool:
    return any(word in frame for word in ("wait (threading", "_wait_for_tstate_lock", "select (selectors", "get (queue"))
