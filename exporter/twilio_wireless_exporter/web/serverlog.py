"""aiohttp's server log, made proportionate: a malformed request is the client's problem.

aiohttp logs every request it cannot parse ("Error handling request from ...") at ERROR with a
full traceback, so anyone who can reach the port can fill the log with tracebacks. The filter
installed by :func:`quiet_bad_requests` turns each such record into one debug line (dropped
unless ``--log.level debug``) and counts it as ``reason="bad_request"``. Errors raised by our own
handlers keep their ERROR line and traceback: those are bugs worth seeing.

asyncio logs each failed ``accept()`` for want of file descriptors ("out of system resource",
with a traceback), retrying every second; :func:`throttle_accept_errors` lets one such line
through per interval, without the traceback. (The connection limit keeps the server from getting
there; something else in the process may still use the descriptors up.)
"""

from __future__ import annotations

import logging
from typing import Final

from aiohttp.http_exceptions import HttpProcessingError

from twilio_wireless_exporter.web.connections import Rejections
from twilio_wireless_exporter.web.ratelog import DEFAULT_INTERVAL, RateLimitedLog

SERVER_LOGGER: Final = "aiohttp.server"
ASYNCIO_LOGGER: Final = "asyncio"
_ACCEPT_FAILED: Final = "socket.accept() out of system resource"


class BadRequestFilter(logging.Filter):
    """Rewrites aiohttp's records of unparsable requests to one debug line, and counts them."""

    def __init__(self, rejections: Rejections | None = None) -> None:
        super().__init__()
        self.rejections = rejections

    def filter(self, record: logging.LogRecord) -> bool:
        threshold = logging.getLogger().getEffectiveLevel()
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return record.levelno >= threshold
        if self.rejections is not None:
            self.rejections.reject("bad_request")
        if threshold > logging.DEBUG:
            return False
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "bad HTTP request from %s: %s"
        record.args = (remote, _describe(exc))
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return True


def _describe(exc: HttpProcessingError) -> str:
    text = str(exc.message or type(exc).__name__)
    return " ".join(text.split())[:200]  # one line, and short: it is the client's text


def quiet_bad_requests(rejections: Rejections | None = None) -> BadRequestFilter:
    """Install the filter on aiohttp's server logger (replacing one installed before).

    The logger is opened to debug so that the filter also sees (and counts) what aiohttp logs
    at debug; the filter itself drops whatever is below the root logger's level.
    """
    logger = logging.getLogger(SERVER_LOGGER)
    for old in [f for f in logger.filters if isinstance(f, BadRequestFilter)]:
        logger.removeFilter(old)
    installed = BadRequestFilter(rejections)
    logger.addFilter(installed)
    logger.setLevel(logging.DEBUG)
    return installed


class AcceptErrorFilter(logging.Filter):
    """One line per interval for asyncio's failed accepts, without the traceback."""

    def __init__(self, interval: float = DEFAULT_INTERVAL) -> None:
        super().__init__()
        self._log = RateLimitedLog(logging.getLogger("twilio_wireless_exporter.web"), interval)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(_ACCEPT_FAILED):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "no resources"
        self._log.log(
            "accept", logging.ERROR, "cannot accept connections: %s (retrying every second)", reason
        )
        return False


def throttle_accept_errors(interval: float = DEFAULT_INTERVAL) -> AcceptErrorFilter:
    """Install :class:`AcceptErrorFilter` on asyncio's logger (replacing one installed before)."""
    logger = logging.getLogger(ASYNCIO_LOGGER)
    for old in [f for f in logger.filters if isinstance(f, AcceptErrorFilter)]:
        logger.removeFilter(old)
    installed = AcceptErrorFilter(interval)
    logger.addFilter(installed)
    return installed
