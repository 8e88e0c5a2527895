"""Raw sockets on 127.0.0.1 for the tests where HTTP framing matters: a listening socket whose connections a
test's own function answers byte by byte, and a reader for one request."""

from __future__ import annotations

import socket
import threading


class RawServer:
    """One listening socket whose every connection is handled by `serve(connection)` in a daemon thread."""

    def __init__(self, serve) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/track"
        self.requests = 0  # connections accepted
        threading.Thread(target=self._accept, args=(serve,), daemon=True).start()

    def _accept(self, serve) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.requests += 1
            threading.Thread(target=serve, args=(connection,), daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_request(connection: socket.socket) -> bytes:
    """One request, head and body (by its Content-Length); b"" if the client closed the connection first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
