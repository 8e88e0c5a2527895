"""Raw sockets on 127.0.0.1 for the tests where HTTP framing matters: a listening socket whose connections a
test's own function answers byte by byte, and a reader for one request."""

from __future__ import annotations

import socket
import threading
import time


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


def self_signed(folder) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key, written into `folder`: (cert path, key path)."""
    import subprocess

    cert, key = f"{folder}/cert.pem", f"{folder}/key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class TLSServer:
    """An HTTPS endpoint on raw sockets: each connection's TLS handshake starts `delay()` seconds after the
    connection is accepted; each request is answered `answer`. `cert` is the certificate to trust. It records
    when each connection came and when each request arrived (time.monotonic())."""

    def __init__(self, folder, delay, answer: bytes) -> None:
        import ssl

        self.cert, key = self_signed(folder)
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.load_cert_chain(self.cert, key)
        self._delay, self._answer = delay, answer
        self.connected: list[float] = []
        self.arrived: list[float] = []
        self._server = RawServer(self._serve)
        self.url = f"https://127.0.0.1:{self._server.port}/track"

    def _serve(self, connection: socket.socket) -> None:
        self.connected.append(time.monotonic())
        time.sleep(self._delay())
        try:
            with self._context.wrap_socket(connection, server_side=True) as tls:
                while read_request(tls):
                    self.arrived.append(time.monotonic())
                    tls.sendall(self._answer)
                    if b"Connection: close" in self._answer:
                        return
        except OSError:  # ssl.SSLError too: the client gave up (its connect timeout, or its process ended)
            return

    def close(self) -> None:
        self._server.close()

    def __enter__(self) -> TLSServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
