"""Spool files: where pynetdicom writes each received data set, bounded in size, on disk.

The node never holds a data set in memory (issue 23 row 5); a failed or oversized write is
remembered here by spool path, and `store_instance` answers 0xA700 with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
import weakref
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, dimse_messages

log = logging.getLogger(__name__)

_spool_errors: dict[str, str] = {}  # spool path -> why it was not kept (answered 0xA700)
_spool_errors_lock = threading.Lock()


def take_error(path: Path) -> str | None:
    """Why the spool file at `path` was emptied (disk full, over the size limit), or None; once."""
    with _spool_errors_lock:
        return _spool_errors.pop(str(path), None)


def too_large(limit_mb: int) -> str:
    return f"data set too large: over the node's {limit_mb} MiB limit (PNEUMO_MAX_DATASET_MB)"


class SpoolFile:
    """Where pynetdicom's chunked receive writes a data set (replaces its NamedTemporaryFile).

    A failed write (disk full), or a data set growing past `limit_mb`, empties the file and
    discards the rest of the data set, so the transfer still completes and `store_instance`
    answers 0xA700 with the reason, instead of the association dying mid-transfer with a partial
    file left filling the spool. Memory stays one P-DATA fragment whatever the size.
    """

    def __init__(self, *args: Any, limit_mb: int = 0, **kwargs: Any) -> None:
        self.file = self  # pynetdicom flushes through `.file`
        self.failed = False
        self.limit_mb, self.written = limit_mb, 0
        try:
            self._handle: Any = tempfile.NamedTemporaryFile(*args, **kwargs)  # noqa: SIM115
            self.name = self._handle.name
        except OSError as error:
            self._handle = None
            folder = kwargs.get("dir") or tempfile.gettempdir()
            self.name = os.path.join(folder, f"unwritable-{uuid.uuid4().hex}.dcm")
            self._fail(error)

    def _fail(self, error: OSError) -> None:
        self._discard(f"cannot write spool file: {error.strerror or type(error).__name__}")

    def _discard(self, reason: str) -> None:
        self.failed = True
        with _spool_errors_lock:
            _spool_errors[self.name] = reason
        if self._handle is not None:
            with contextlib.suppress(OSError):  # flushing its buffer may fail again; the fd closes
                self._handle.close()
            with contextlib.suppress(OSError):  # give the space back now, not when the janitor runs
                os.truncate(self.name, 0)

    def write(self, data: bytes) -> int:
        self.written += len(data)
        if not self.failed and self.limit_mb and self.written > self.limit_mb << 20:
            self._discard(too_large(self.limit_mb))
        if not self.failed:
            try:
                return self._handle.write(data)
            except OSError as error:
                self._fail(error)
        return len(data)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._handle.flush()
            except OSError as error:
                self._fail(error)

    def close(self) -> None:
        if not self.failed:
            self._handle.close()


_spool_dirs: weakref.WeakKeyDictionary[AE, tuple[Path, int]] = weakref.WeakKeyDictionary()


def _spool_file(*args: Any, **kwargs: Any) -> SpoolFile:
    """pynetdicom's call for a new spool file, made on the association's DUL thread: the file goes
    into the spool folder of the node (AE) that association belongs to, with its size limit."""
    ae = getattr(getattr(threading.current_thread(), "assoc", None), "ae", None)
    target = _spool_dirs.get(ae) if ae is not None else None
    if target is None:
        return SpoolFile(*args, **kwargs)
    return SpoolFile(*args, dir=str(target[0]), limit_mb=target[1], **kwargs)


def spool_into(ae: AE, spool_dir: Path, max_dataset_mb: int = 0) -> None:
    """Receive `ae`'s data sets straight into spool files in `spool_dir` (same filesystem as
    storage, for atomic renames) instead of memory, keeping at most `max_dataset_mb` of each
    (0: no limit). Called when a node starts, not at import: pynetdicom creates the file through
    a module-level name, replaced here."""
    _spool_dirs[ae] = (spool_dir, max_dataset_mb)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = _spool_file  # type: ignore[assignment]  # same call, a SpoolFile


def clean_spool(spool_dir: Path, older_than_s: float) -> list[Path]:
    """Remove spool files left by transfers that were interrupted (the handler never ran)."""
    cutoff = time.time() - older_than_s
    removed = []
    for path in spool_dir.glob("*.dcm"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    if removed:
        log.warning("removed %d spool file(s) of interrupted transfers", len(removed))
    return removed


def janitor(spool_dir: Path, older_than_s: float) -> None:
    """Runs for the life of the node process (a daemon thread)."""
    while True:
        time.sleep(60.0)
        clean_spool(spool_dir, older_than_s)
