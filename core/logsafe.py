"""What every pneumo process does before it writes a file or a log line.

Peers choose AE titles and header values; a CR/LF in one must not start a forged log line, so
control characters are escaped in every message, and one message repeated in a flood is logged a
few times a minute, with a count. `pneumo run` writes each child's output to a log rotated by
size. Stored images, SRs, the database, the broker's files and the logs hold patient data, so
files are created private to the service user.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import threading
import time
import traceback
from collections import deque
from pathlib import Path
from typing import TextIO

PRIVATE_UMASK = 0o077  # files 0600, folders 0700
LINE_LIMIT = 64 * 1024  # a longer line (no newline in sight) is written in pieces, never held whole
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(value: object) -> str:
    """`value` with control characters as escapes (`\\r`, `\\n`, `\\x00`): one log line stays one."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), str(value))


class EscapeControlCharacters(logging.Filter):
    """A handler filter: the rendered message with its control characters escaped.

    Covers what libraries log of a peer's values too: pynetdicom logs an invalid AE title as
    received, in its message and in its exception's text. A traceback keeps its lines; only the
    exception's own text is escaped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if _CONTROL.search(message):
            record.msg, record.args = printable(message), None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = _traceback(record.exc_info[1]).rstrip("\n")
        return True


def _traceback(error: BaseException) -> str:
    chunks = []
    for chunk in traceback.TracebackException.from_exception(error).format():
        if chunk.startswith("  File "):
            chunks.append(chunk)  # our source lines
        else:
            chunks.append(printable(chunk.rstrip("\n")) + "\n")
    return "".join(chunks)


class RepeatLimit(logging.Filter):
    """At most `burst` identical records (logger, level, message) per `window_s`; the first one
    after a window that suppressed some says how many. A peer that repeats one error 100,000 times
    (pynetdicom logs each unknown PDU) must not fill the disk or bury everything else; distinct
    messages (other studies, other peers) are never held back by this."""

    def __init__(self, burst: int = 20, window_s: float = 60.0, max_keys: int = 1000) -> None:
        super().__init__()
        self.burst, self.window_s, self.max_keys = burst, window_s, max_keys
        self._windows: dict[tuple[str, int, str], list[float]] = {}  # key: [start, count, suppressed]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format: logging reports it; do not count it
            return True
        key, now = (record.name, record.levelno, message), time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window[0] >= self.window_s:
                suppressed = int(window[2]) if window is not None else 0
                self._windows.pop(key, None)
                while len(self._windows) >= self.max_keys:  # oldest windows go first
                    self._windows.pop(next(iter(self._windows)))
                self._windows[key] = [now, 1, 0]
                if suppressed:
                    record.msg, record.args = (f"{message} [and {suppressed} more identical in the "
                                               f"last {self.window_s:.0f} s, not logged]"), None
                return True
            window[1] += 1
            if window[1] <= self.burst:
                return True
            window[2] += 1
            return False


def install(handlers: list[logging.Handler] | None = None) -> None:
    """Escape control characters and limit identical repeats on these handlers (default: the
    root logger's)."""
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, EscapeControlCharacters) for f in handler.filters):
            handler.addFilter(EscapeControlCharacters())
        if not any(isinstance(f, RepeatLimit) for f in handler.filters):
            handler.addFilter(RepeatLimit())


def private_files() -> None:
    """Files this process creates from now on are 0600 and folders 0700 (and its children's)."""
    os.umask(PRIVATE_UMASK)


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """The standard size-rotating handler, its files created 0600 whatever the umask (and a file
    from before made 0600): a log line may name a study."""

    def _open(self) -> TextIO:  # type: ignore[override]  # a text file, as the base opens
        descriptor = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.fchmod(descriptor, 0o600)
        return os.fdopen(descriptor, "a", encoding=self.encoding, errors=self.errors)


class OutputLog:
    """One process's output (stdout and stderr, through a pipe) into `path`, rotated by size:
    `max_bytes` per file and `backups` older files, so nothing a process prints, a flood
    included, grows the disk past (backups + 1) * max_bytes. The last lines of the current start
    are kept in memory for the reason a child could not start."""

    def __init__(self, path: Path, max_bytes: int, backups: int, tail_lines: int = 200) -> None:
        self.path = path
        self.handler = PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups,
                                                  encoding="utf-8", errors="backslashreplace")
        self.handler.setFormatter(logging.Formatter("%(message)s"))
        self.tail: deque[str] = deque(maxlen=tail_lines)
        self.reader: threading.Thread | None = None

    def follow(self, read_end: int, name: str) -> None:
        """Copy what arrives on `read_end` into the log until every writer has closed it."""
        self.tail = tail = deque[str](maxlen=self.tail.maxlen)  # this start's lines only

        def pump() -> None:
            with open(read_end, "rb") as stream:
                while raw := stream.readline(LINE_LIMIT):
                    line = raw.decode("utf-8", "replace").rstrip("\r\n")
                    tail.append(line)
                    # A record made directly, not through the record factory: the child has
                    # already scrubbed and escaped its lines (core.phi, EscapeControlCharacters).
                    self.handler.handle(logging.LogRecord(name, logging.INFO, "", 0, line, None, None))

        self.reader = threading.Thread(target=pump, name=f"log {name}", daemon=True)
        self.reader.start()

    def drain(self, timeout_s: float = 5.0) -> list[str]:
        """The lines of the current start once its writers are gone (or `timeout_s` passed)."""
        if self.reader is not None:
            self.reader.join(timeout_s)
        return list(self.tail)
