"""A fast /track receiver for benchmarks: an asyncio Protocol speaking just enough HTTP/1.1 keep-alive to
answer every POST 200 at once, counting requests and distinct `$insert_id`s cheaply, in a process of its own
so that a benchmark can leave its CPU out of the sender's bill. (The Sink, a ThreadingHTTPServer, answers
about 2,000 requests/s on two cores; this one answers several times that on one.)

    python -m worker.devtools.fast_receiver [--port 0] [--mode ok|hang|trickle]

prints `listening http://127.0.0.1:PORT/track` once bound. `GET /_stats` answers
`{"requests": N, "distinct_insert_ids": M, "pid": P}`; `GET /_times` the arrival time (time.time()) of each
request, in order; `GET /_reset` zeroes the counts. `--mode hang` reads
every request and never answers it (a stuck endpoint); `--mode trickle` answers 200 one byte per second
(a read timeout applied per recv never fires). Not a conformant HTTP server: chunked bodies are refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n{\"status\": 1}"
TRICKLED = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
INSERT_ID = re.compile(rb'"\$insert_id"\s*:\s*"((?:[^"\\]|\\.)*)"')
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
HEAD_LIMIT = 64 * 1024  # a request head larger than this is not a client of ours


class Counts:
    """What arrived, shared by every connection (one thread: the event loop)."""

    def __init__(self) -> None:
        self.requests = 0
        self.insert_ids: set[bytes] = set()
        self.times: list[float] = []

    def page(self, path: bytes) -> bytes:
        if path == b"/_times":
            return json.dumps(self.times).encode()
        return json.dumps({"requests": self.requests, "distinct_insert_ids": len(self.insert_ids),
                           "pid": os.getpid()}).encode()


class TrackProtocol(asyncio.Protocol):
    """One keep-alive connection: split the byte stream into requests, answer each in order."""

    def __init__(self, counts: Counts, mode: str) -> None:
        self._counts = counts
        self._mode = mode
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buffer = self._buffer + data if self._buffer else data
        while self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > HEAD_LIMIT:
                    self._transport.close()
                return
            match = CONTENT_LENGTH.search(self._buffer, 0, end + 2)
            total = end + 4 + (int(match.group(1)) if match else 0)
            if len(self._buffer) < total:
                return
            head, body, self._buffer = self._buffer[:end], self._buffer[end + 4:total], self._buffer[total:]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        if head.startswith(b"GET "):
            if head.startswith(b"GET /_reset "):
                self._counts.__init__()
            page = self._counts.page(head.split(b" ", 2)[1])
            self._transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                  % (len(page), page))
            return
        self._counts.requests += 1
        self._counts.times.append(time.time())
        found = INSERT_ID.search(body)
        if found:
            self._counts.insert_ids.add(found.group(1))
        if self._mode == "ok":
            self._transport.write(OK)
        elif self._mode == "trickle":
            asyncio.get_running_loop().create_task(self._trickle(self._transport))
        # "hang": read it, count it, never answer

    @staticmethod
    async def _trickle(transport: asyncio.Transport) -> None:
        for byte in TRICKLED:
            if transport.is_closing():
                return
            transport.write(bytes([byte]))
            await asyncio.sleep(1.0)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def serve(host: str, port: int, mode: str) -> None:
    """Serve until SIGTERM or SIGINT; print the URL once bound."""
    loop = asyncio.get_running_loop()
    counts = Counts()
    server = await loop.create_server(lambda: TrackProtocol(counts, mode), host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"listening http://{host}:{bound}/track", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one process (all its threads), from /proc/PID/stat; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ReceiverProcess:
    """The receiver in a child process (`with ReceiverProcess() as receiver: receiver.url ...`)."""

    def __init__(self, mode: str = "ok", start_timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.devtools.fast_receiver", "--mode", mode],
                                     stdout=subprocess.PIPE, text=True)
        line = _first_line(self.proc, start_timeout)
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"the fast receiver did not start: {line!r}")
        self.url = line.split()[1]
        self._base = self.url.removesuffix("/track")

    def stats(self) -> dict[str, int]:
        """Requests and distinct $insert_ids since the start or the last reset()."""
        with urllib.request.urlopen(f"{self._base}/_stats", timeout=10) as answer:
            return json.loads(answer.read())

    def arrivals(self) -> list[float]:
        """The time.time() each request arrived at, in order."""
        with urllib.request.urlopen(f"{self._base}/_times", timeout=30) as answer:
            return json.loads(answer.read())

    def reset(self) -> None:
        urllib.request.urlopen(f"{self._base}/_reset", timeout=10).read()

    def cpu_seconds(self) -> float:
        """User plus system CPU the receiver has used (Linux)."""
        return process_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> ReceiverProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The child's first line of output, or "" if it printed none within `timeout` seconds."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return proc.stdout.readline().strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.devtools.fast_receiver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--mode", choices=("ok", "hang", "trickle"), default="ok")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
