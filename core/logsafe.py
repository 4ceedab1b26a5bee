"""What every pneumo process does before it writes a file or a log line.

Peers choose AE titles and header values; a CR/LF in one must not start a forged log line, so
control characters are escaped in every message. Stored images, SRs, the database, the broker's
files and the logs hold patient data, so files are created private to the service user.
"""

from __future__ import annotations

import logging
import os
import re
import traceback

PRIVATE_UMASK = 0o077  # files 0600, folders 0700
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


def install(handlers: list[logging.Handler] | None = None) -> None:
    """Escape control characters on these handlers (default: the root logger's)."""
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, EscapeControlCharacters) for f in handler.filters):
            handler.addFilter(EscapeControlCharacters())


def private_files() -> None:
    """Files this process creates from now on are 0600 and folders 0700 (and its children's)."""
    os.umask(PRIVATE_UMASK)
