"""Child processes that bind port 0 and say where they listen.

No test picks a free port and hands it to a child to bind later (another process may take it in
between). The exporter and the simulator are started on ``127.0.0.1:0`` and log the address they
actually bound (``listening on http://127.0.0.1:PORT/``, in the text and the JSON log format
alike); the helpers here read the log until that line and return the URL. Every line read is
kept, so a test can still assert on the whole log afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import selectors
import subprocess
import time
from pathlib import Path
from typing import Any

# The exporter: "listening on http://127.0.0.1:PORT/"; the simulator: "... listening on
# http://127.0.0.1:PORT". The URL ends at a slash, a space or a JSON string's quote.
LISTENING = re.compile(r"listening on (?P<url>https?://[^\s\"/]+)")


def listen_url(line: str) -> str | None:
    """The base URL (no trailing slash) a "listening on" log line names, else None."""
    match = LISTENING.search(line)
    return match["url"] if match else None


class PipeLog:
    """The lines a child writes to one pipe (``proc.stderr`` by default), read with a deadline.

    Reads the pipe's file descriptor directly, so a later ``proc.communicate()`` returns exactly
    the rest of the output.
    """

    def __init__(self, proc: subprocess.Popen[bytes] | subprocess.Popen[str], stdout: bool = False):
        stream = proc.stdout if stdout else proc.stderr
        assert stream is not None, "start the process with that stream piped"
        self.proc = proc
        self.fd = stream.fileno()
        self.lines: list[str] = []
        self._partial = b""

    def wait_for(self, pattern: re.Pattern[str], within: float = 30.0) -> re.Match[str]:
        """Read lines until one matches ``pattern``; fails with the log when the child exits or
        the deadline passes first."""
        for line in self.lines:
            if match := pattern.search(line):
                return match
        deadline = time.monotonic() + within
        with selectors.DefaultSelector() as selector:
            selector.register(self.fd, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(left):
                    continue
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                *complete, self._partial = (self._partial + chunk).split(b"\n")
                for raw in complete:
                    line = raw.decode(errors="replace")
                    self.lines.append(line)
                    if match := pattern.search(line):
                        return match
        log = "\n".join(self.lines) + self._partial.decode(errors="replace")
        raise AssertionError(
            f"no log line matching {pattern.pattern!r} (exit {self.proc.poll()}):\n{log}"
        )

    def wait_for_url(self, within: float = 30.0) -> str:
        """The base URL from the child's "listening on" line."""
        return self.wait_for(LISTENING, within)["url"]


async def read_listen_url(
    stream: asyncio.StreamReader, lines: list[str], within: float = 30.0
) -> str:
    """Read an asyncio child's log into ``lines`` until its "listening on" line; its URL."""

    async def read() -> str:
        while raw := await stream.readline():
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            if url := listen_url(line):
                return url
        raise AssertionError("the process exited before listening:\n" + "\n".join(lines))

    try:
        return await asyncio.wait_for(read(), within)
    except TimeoutError:
        raise AssertionError(f"not listening within {within}s:\n" + "\n".join(lines)) from None


def wait_for_log_line(
    path: Path,
    pattern: re.Pattern[str],
    proc: subprocess.Popen[bytes] | subprocess.Popen[str],
    within: float = 30.0,
) -> re.Match[str]:
    """Poll a child's log file until a line matches ``pattern`` (for children that log to a file,
    such as the end-to-end stack); fails with the log when the child exits first."""
    deadline = time.monotonic() + within
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if match := pattern.search(text):
            return match
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(
                f"no line matching {pattern.pattern!r} in {path.name} (exit {proc.poll()}):\n{text}"
            )
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL after a grace period; reaps the child either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()
