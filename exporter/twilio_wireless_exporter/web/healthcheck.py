"""Container health check: ``python -m twilio_wireless_exporter.web.healthcheck [ADDRESS]``.

Asks the exporter at ``ADDRESS`` (default ``127.0.0.1:10311``) for ``/-/healthy`` and exits 0 when
it is alive, else 1 (Docker's HEALTHCHECK contract), printing one line about what it found.

Alive means the exporter's event loop answered, whatever ``--web.config.file`` says:

* HTTP 200 from ``/-/healthy``;
* HTTP 401: ``basic_auth_users`` guards every endpoint, ``/-/healthy`` included, and the check has
  no password to send (the web config holds only bcrypt hashes). The 401 comes from the exporter's
  own auth layer once the request was read, so it proves as much as a 200;
* with TLS on, the same answers over HTTPS: the plain HTTP request gets no HTTP answer from a TLS
  port, so the check then speaks TLS;
* with mutual TLS (``client_auth_type: RequireAndVerifyClientCert``) the server closes the
  connection because the check has no client certificate; then the server's part of a TLS
  handshake counts: asyncio runs TLS handshakes on the event loop, so handshake bytes from the
  server prove the loop is running.

A connection that is accepted but never answered is not alive: the kernel accepts connections
into the listen backlog even while the process is stuck. Anything else (another HTTP status, a
refused connection, a timeout) is unhealthy.

Over HTTPS the certificate is not verified: the check talks to the exporter on the loopback
interface inside the container and sends nothing secret, while the certificate names the public
host and may be issued by a CA the container does not trust. Only the standard library is used,
so a check costs little more than the interpreter's start-up.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from twilio_wireless_exporter.web.address import netloc, parse_listen_address

DEFAULT_ADDRESS = "127.0.0.1:10311"
PATH = "/-/healthy"
#: HTTP statuses that prove the exporter is alive: healthy, or its auth layer asks for credentials.
ALIVE_STATUSES = frozenset({200, 401})
#: Seconds per attempt. Only a quick failure leads to the next attempt (HTTP, HTTPS, TLS
#: handshake), so at most one attempt can time out: well within Docker's 5 s timeout.
DEFAULT_TIMEOUT = 2.0
USER_AGENT = "twilio-wireless-exporter-healthcheck"


@dataclass(frozen=True, slots=True)
class Result:
    alive: bool
    detail: str
    #: The plain HTTP attempt got bytes that are not HTTP, or the connection closed or reset:
    #: what a TLS port does to a plain request, so HTTPS is worth a try.
    not_http: bool = False


def parse_address(address: str) -> tuple[str, int]:
    """An address as ``--web.listen-address`` takes it (``host:port``, ``[v6]:port``, ``:port``)
    to the ``(host, port)`` to ask: a wildcard host means loopback; port 0 is refused."""
    try:
        host, port = parse_listen_address(address)
    except argparse.ArgumentTypeError:
        port = 0
    if port == 0:
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    if host in (None, "0.0.0.0"):  # a wildcard listen address: ask on loopback
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


def _unverified_tls() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # see the module docstring
    return context


def handshake_answered(host: str, port: int, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether the server takes part in a TLS handshake: it completes, or the server sends TLS
    records before it closes the connection or rejects the (certificate-less) client."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = _unverified_tls().wrap_bio(incoming, outgoing)
    received = False
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            while True:
                try:
                    tls.do_handshake()
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    data = sock.recv(65536)
                    if not data:
                        return received
                    received = True
                    incoming.write(data)
                else:
                    return True
    except OSError:  # ssl.SSLError included: a TLS alert, or the connection dropped
        return received


def probe(host: str, port: int, *, tls: bool, timeout: float = DEFAULT_TIMEOUT) -> Result:
    """One ``GET /-/healthy`` over HTTP or HTTPS."""
    url = f"{'https' if tls else 'http'}://{netloc(host, port)}{PATH}"
    conn: http.client.HTTPConnection
    if tls:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=_unverified_tls())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", PATH, headers={"User-Agent": USER_AGENT, "Connection": "close"})
        status = conn.getresponse().status
    except TimeoutError:
        return Result(False, f"{url}: no answer within {timeout:g}s")
    except (http.client.HTTPException, ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return Result(False, f"{url}: {type(exc).__name__}: {exc}", not_http=True)
    except OSError as exc:  # refused, unreachable: HTTPS would meet the same
        return Result(False, f"{url}: {type(exc).__name__}: {exc}")
    finally:
        conn.close()
    return Result(status in ALIVE_STATUSES, f"{url}: HTTP {status}")


def check(address: str = DEFAULT_ADDRESS, *, timeout: float = DEFAULT_TIMEOUT) -> Result:
    """Probe over HTTP and, when the port does not speak plain HTTP, over HTTPS."""
    host, port = parse_address(address)
    plain = probe(host, port, tls=False, timeout=timeout)
    if not plain.not_http:
        return plain
    secure = probe(host, port, tls=True, timeout=timeout)
    if secure.alive or not secure.not_http:
        return secure if secure.alive else Result(False, f"{plain.detail}; {secure.detail}")
    # TLS, but no HTTP answer: mutual TLS turns away a client without a certificate.
    if handshake_answered(host, port, timeout=timeout):
        return Result(True, f"{secure.detail}, but the TLS handshake was answered (mutual TLS?)")
    return Result(False, f"{plain.detail}; {secure.detail}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m twilio_wireless_exporter.web.healthcheck",
        description="Exit 0 when the exporter at ADDRESS answers /-/healthy over HTTP or HTTPS"
        " (200, or 401 with basic auth; with mutual TLS, its TLS handshake), else 1.",
    )
    parser.add_argument(
        "address",
        nargs="?",
        default=DEFAULT_ADDRESS,
        help=f"the exporter's host:port, as in --web.listen-address (default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds per attempt (default {DEFAULT_TIMEOUT:g})",
    )
    args = parser.parse_args(argv)
    try:
        result = check(args.address, timeout=args.timeout)
    except ValueError as exc:
        parser.error(str(exc))
    print(("healthy: " if result.alive else "unhealthy: ") + result.detail)
    return 0 if result.alive else 1


if __name__ == "__main__":
    sys.exit(main())
