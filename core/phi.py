"""Keep patient data out of logs: header values reach them only through libraries' messages.

pydicom and highdicom quote the offending value in their warnings and exceptions ("Invalid value
for VR DA: '01/02/1970'", 'The string "DOE" is unlikely to represent the intended person name',
"Unable to convert '...' to 'DA' object"), and Celery logs a failed task's exception text. Our
own modules log UIDs, states and reasons, never header values. So every log record from another
library's logger (Python warnings included, through `logging.captureWarnings`) and every logged
traceback has what it quotes withheld, in whichever handler or file it ends up.
"""

from __future__ import annotations

import logging
import re
from typing import Any

WITHHELD = "<withheld>"
OWN_LOGGERS = ("core", "worker", "dicom_node", "training")
# From the first quote to the last (a value may itself hold a quote: O'Brien); a lone quote: to the end.
_QUOTED = re.compile(r"""['"](?:.*['"]|.*)""", re.DOTALL)
# Library messages that quote only what the library itself named, kept whole when the rendered text
# matches in full (so no header value can ride along): which Celery pool child died, and of which
# signal, is what an operator needs to read ("Process <withheld>" told nothing).
KEPT = (
    re.compile(r"Process '[A-Za-z]{0,16}(?:PoolWorker|Process)-\d+(?::\d+)*' pid:\d+ exited with "
               r"'(?:signal \d+(?: \(SIG[A-Z0-9+-]+\))?|exitcode -?\d+)'"),  # billiard's pool supervisor
    re.compile(r"Unknown PDU type received '0x[0-9A-F]{2}'"),  # pynetdicom.dul: one byte from the wire
)
_installed = False


def scrub(text: str) -> str:
    """`text` with everything it quotes withheld."""
    return _QUOTED.sub(WITHHELD, text)


def kept(text: str) -> bool:
    """Whether `text` is a library message known to quote nothing from a header (KEPT)."""
    return any(pattern.fullmatch(text) for pattern in KEPT)


def describe(error: BaseException) -> str:
    """An exception for a log line or a recorded reason: its type and its scrubbed message."""
    message = scrub(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def scrub_traceback(text: str) -> str:
    """A formatted traceback with the exception messages scrubbed; file names and code lines
    (indented, from our and the libraries' sources) are kept for debugging."""
    lines = text.splitlines()
    block: list[str] = []
    out: list[str] = []

    def flush() -> None:
        if block:
            out.append(scrub("\n".join(block)))
            block.clear()

    for line in lines:
        if line.startswith(" ") or line.startswith("Traceback (most recent call last)"):
            flush()
            out.append(line)
        else:
            block.append(line)
    flush()
    return "\n".join(out)


def _foreign(name: str) -> bool:
    return not any(name == own or name.startswith(own + ".") for own in OWN_LOGGERS)


def install() -> None:
    """Scrub records as they are made (before any handler or filter sees them); route Python
    warnings into logging so they are scrubbed too. Idempotent; for every pneumo process."""
    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()

    def scrubbed_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if _foreign(record.name):
            try:
                message = record.getMessage()
            except Exception:  # arguments that do not fit the format: logging reports those later
                message = f"{record.msg} {record.args}"
            record.msg, record.args = (message if kept(message) else scrub(message)), None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = scrub_traceback(logging.Formatter().formatException(record.exc_info))
        return record

    logging.setLogRecordFactory(scrubbed_record)
    logging.captureWarnings(True)
