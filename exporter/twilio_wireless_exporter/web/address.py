"""Listen addresses (``HOST:PORT``) as the command line and the health check read and write them.

Standard library only: the container health check imports it on every run.
"""

from __future__ import annotations

import argparse


def parse_listen_address(value: str) -> tuple[str | None, int]:
    """``HOST:PORT``, ``:PORT`` (all interfaces) or ``[IPv6]:PORT``."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: port must be a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r}: port must be between 0 and 65535")
    host = host.strip("[]")
    return (host or None), port


def netloc(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
