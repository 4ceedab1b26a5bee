"""Repeated warnings from one peer, rate-limited: a flood must not become a flood of log lines.

600 KB of 6-byte unknown-PDU headers added 6.5 MB to node.log, one pynetdicom error per PDU, and
a reconnect loop logs one refusal per connection (issue 23 row 6). Each peer address may log
`per_minute` warnings (or worse) of one kind (logger and message template) per minute; past that
they are counted, and the next one let through says how many were suppressed. Informational
lines are not limited: the connection rate limit bounds them.

The peer is the record's `peer` attribute (`extra={"peer": host}`), else the address of the
association whose thread logs (pynetdicom logs from the association's and its DUL's threads).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

WINDOW_S = 60.0
MAX_KEYS = 10_000  # oldest forgotten first: memory bounded however many peers


def peer_of(record: logging.LogRecord) -> str | None:
    peer = getattr(record, "peer", None)
    if peer is not None:
        return str(peer)
    thread = threading.current_thread()
    assoc = getattr(thread, "assoc", None) or (thread if hasattr(thread, "requestor") else None)
    requestor = getattr(assoc, "requestor", None)
    return getattr(requestor, "address", None) or None


class PeerLogLimit(logging.Filter):
    """A logger filter: at most `per_minute` warnings of one kind from one peer per minute."""

    def __init__(self, per_minute: int) -> None:
        super().__init__()
        self.per_minute = per_minute
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple[str, str, str], list[float | int]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or self.per_minute <= 0:
            return True
        peer = peer_of(record)
        if peer is None:
            return True
        key = (peer, record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            state = self._seen.get(key)  # [window start, let through, suppressed]
            if state is None or now - state[0] >= WINDOW_S:
                suppressed = int(state[2]) if state is not None else 0
                self._seen[key] = state = [now, 0, 0]
                self._seen.move_to_end(key)
                while len(self._seen) > MAX_KEYS:
                    self._seen.popitem(last=False)
                if suppressed:
                    record.msg = f"{record.msg} ({suppressed} more like this from {peer} suppressed)"
            if state[1] >= self.per_minute:
                state[2] += 1
                return False
            state[1] += 1
        return True


_installed: dict[str, PeerLogLimit] = {}


def install(per_minute: int, prefixes: tuple[str, ...] = ("pynetdicom", "dicom_node")) -> PeerLogLimit:
    """Put one limiter on every logger under `prefixes` (logger filters do not apply to a child
    logger's records, so each gets it); installing again replaces the limit."""
    limiter = PeerLogLimit(per_minute)
    for name in [*prefixes, *list(logging.root.manager.loggerDict)]:
        if name.startswith(prefixes):
            logger = logging.getLogger(name)
            if (old := _installed.get(name)) is not None:
                logger.removeFilter(old)
            logger.addFilter(limiter)
            _installed[name] = limiter
    return limiter
