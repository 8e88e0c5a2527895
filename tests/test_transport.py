"""The hot path's transport keeps what requests does: TLS verified against certifi or REQUESTS_CA_BUNDLE,
proxies (and NO_PROXY) from the environment, read once, and no redirect followed."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time

import pytest

from tests.rawhttp import RawServer, read_request, self_signed
from worker.devtools.fast_receiver import ReceiverProcess
from worker.engine.policy import DeadlineExceeded, classify_exception
from worker.engine.transport import Transport

BODY = b'{"event": "E", "properties": {"distinct_id": "u", "token": "t", "time": 1.7e9}}'


def _transport(endpoint: str) -> Transport:
    return Transport(endpoint, 2.0, 5.0, 2, "fp-outbox-test")


def _post(transport: Transport):
    return transport.post(BODY, time.monotonic() + 10)


class _Answer200(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        status, extra = (302, {"Location": "/elsewhere"}) if self.path == "/moved" else (200, {})
        self.send_response(status)
        for name, value in {"Content-Length": "2", **extra}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server on 127.0.0.1 with a self-signed certificate; yields (url, the certificate's path)."""
    cert, key = self_signed(tmp_path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer200)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}/track", cert
    server.shutdown()
    server.server_close()


def test_tls_is_verified_against_certifi_by_default(tls_server, monkeypatch):
    url, _ = tls_server
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(Exception) as refused:
        _post(_transport(url))
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert classify_exception(refused.value).reason.startswith("connection error")


@pytest.mark.parametrize("variable", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"])
def test_a_ca_bundle_from_the_environment_is_trusted_as_requests_would(tls_server, monkeypatch, variable):
    url, cert = tls_server
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.setenv(variable, str(cert))
    transport = _transport(url)
    assert [_post(transport).status for _ in range(3)] == [200, 200, 200]  # one kept-alive TLS connection


def test_a_redirect_is_an_answer_not_followed(tls_server, monkeypatch):
    url, cert = tls_server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    assert _post(_transport(url.replace("/track", "/moved"))).status == 302


def test_an_http_proxy_from_the_environment_is_used_and_read_once(monkeypatch):
    with ReceiverProcess() as proxy:
        nowhere = "http://127.0.0.2:9/track"  # nothing listens there: only the proxy can answer
        monkeypatch.setenv("HTTP_PROXY", proxy.url.removesuffix("/track"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        transport = _transport(nowhere)
        monkeypatch.delenv("HTTP_PROXY")  # read once, at start: a change later does not matter
        assert _post(transport).status == 200 and proxy.stats()["requests"] == 1
        monkeypatch.setenv("HTTP_PROXY", proxy.url.removesuffix("/track"))
        monkeypatch.setenv("NO_PROXY", "127.0.0.2")
        with pytest.raises(Exception) as direct:
            _post(_transport(nowhere))
        assert classify_exception(direct.value).reason.startswith("connection error")
        assert proxy.stats()["requests"] == 1


def test_the_reapers_cut_is_a_deadline_not_a_connection_error():
    with ReceiverProcess(mode="hang") as hanging:
        transport = Transport(hanging.url, 1.0, 30.0, 1, "t")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            transport.post(BODY, time.monotonic() + 0.5)
        assert time.monotonic() - started < 5


def _trickling(head: bytes, every: float = 0.2, for_s: float = 12.0):
    """Answers every request with `head`, then one byte of body every `every` seconds for `for_s` seconds."""
    def serve(connection: socket.socket) -> None:
        with connection:
            if not read_request(connection):
                return
            connection.sendall(head)
            ends = time.monotonic() + for_s
            try:
                while time.monotonic() < ends:
                    time.sleep(every)
                    connection.sendall(b"x")
            except OSError:
                return  # the client cut it: what the deadline is for
    return serve


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 200\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nContent-Length: 200\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n",  # no length: the body ends when the connection does
], ids=["connection-close", "http-1.0", "no-length"])
def test_the_total_deadline_holds_whatever_the_answers_framing(head):
    """http.client hands the socket of an answer that closes the connection to the answer itself (the connection's
    own `sock` becomes None): the reaper must still cut it at the deadline. The status came in time, so it
    stands; the body is marked cut short."""
    with RawServer(_trickling(head)) as server:
        transport = Transport(server.url, 1.0, 5.0, 1, "t")  # a read timeout per recv that never fires
        started = time.monotonic()
        answer = transport.post(BODY, time.monotonic() + 1.5)
        took = time.monotonic() - started
    assert took < 1.5 + 1.0, f"held {took:.1f} s against a 1.5 s deadline"
    assert answer.status == 200 and answer.truncated and answer.head.startswith(b"x")
