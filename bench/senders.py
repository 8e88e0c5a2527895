"""Bare HTTP senders for `python -m bench drain`, each posting the same bodies from memory with the same number
of threads, so the worker's price can be read against them: the cost of durability, isolated.

    python -m bench.senders {session,adapter,urllib3,http.client} URL EVENTS THREADS
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
from urllib.parse import urlsplit

HEADERS = {"Content-Type": "application/json", "User-Agent": "bench"}


def bodies(events: int) -> list[bytes]:
    """What the worker sends for the backlog bench.drain builds: same properties, token, time, $insert_id."""
    return [json.dumps({"event": "Purchase", "properties": {
        "distinct_id": f"user-{i % 1000}", "price": 500, "sku": f"sku-{i}", "token": "bench-token",
        "time": 1.7e9, "$insert_id": f"bare-{i}"}}, separators=(",", ":")).encode() for i in range(events)]


def session_sender(url: str):
    import requests

    session = requests.Session()
    return lambda body: session.post(url, data=body, headers=HEADERS, timeout=(3.05, 10)).raise_for_status()


def adapter_sender(url: str):
    import requests
    from requests.adapters import HTTPAdapter

    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=1, max_retries=0)
    template = requests.Request("POST", url, headers=HEADERS).prepare()

    def send(body: bytes) -> None:
        request = template.copy()
        request.prepare_body(data=body, files=None)
        adapter.send(request, timeout=(3.05, 10)).raise_for_status()
    return send


def urllib3_sender(url: str, pool):
    def send(body: bytes) -> None:
        answer = pool.urlopen("POST", urlsplit(url).path, body=body, headers=HEADERS, retries=False, redirect=False)
        if answer.status != 200:
            raise RuntimeError(answer.status)
    return send


def http_client_sender(url: str):
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)

    def send(body: bytes) -> None:
        connection.request("POST", parts.path, body=body, headers=HEADERS)
        answer = connection.getresponse()
        answer.read()
        if answer.status != 200:
            raise RuntimeError(answer.status)
    return send


def main(argv: list[str]) -> int:
    kind, url, events, threads = argv[0], argv[1], int(argv[2]), int(argv[3])
    work = iter(bodies(events))
    lock = threading.Lock()
    shared = None
    if kind == "urllib3":
        import urllib3

        parts = urlsplit(url)
        shared = urllib3.HTTPConnectionPool(parts.hostname, parts.port, maxsize=threads, block=True,
                                            timeout=urllib3.Timeout(connect=3.05, read=10))
    makers = {"session": session_sender, "adapter": adapter_sender, "http.client": http_client_sender,
              "urllib3": lambda u: urllib3_sender(u, shared)}

    def run() -> None:
        send = makers[kind](url)
        while True:
            with lock:
                body = next(work, None)
            if body is None:
                return
            send(body)

    running = [threading.Thread(target=run) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
