"""The connection guard: pynetdicom's threaded server with the limits a hostile or broken peer
needs (deadlines, PDU size cap, slots and connection rate per host, health for /healthz).

Each limit closes a hole an independent probe found (issue 23 rows 1, 5, 7): see GuardedServer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from core.logsafe import printable
from core.settings import Settings

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ PDU: rejected-transient, service-provider (presentation), local-limit-exceeded.
LOCAL_LIMIT_EXCEEDED_RJ = bytes([0x03, 0x00, 0, 0, 0, 4, 0x00, 0x02, 0x03, 0x02])
# Largest PDU read before the association is accepted (an A-ASSOCIATE-RQ is a few KiB; user
# identity items may add up to 64 KiB each) and after it (peers must keep to our maximum PDU
# length; the margin is for lax ones). The length field allows 4 GiB, which pynetdicom buffers.
MAX_REQUEST_PDU_BYTES = 1 << 20
MAX_PDU_BYTES = 16 << 20
HEALTH_INTERVAL_S = 2.0
REFUSAL_WINDOW_S = 60.0  # /healthz reports refusals for capacity this long
LINGER_S, MAX_LINGERING = 2.0, 256  # a refused connection is read until the peer closes, this long
# A-ABORT PDU, source service provider (2), reason not specified: what a watchdog abort sends.
A_ABORT_PROVIDER = bytes([0x07, 0x00, 0, 0, 0, 4, 0x00, 0x00, 0x02, 0x00])
MAX_RATE_BUCKETS = 10_000


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket, refusing to buffer a PDU longer than the cap (the header's 4-byte
    length is read first, the body then buffered whole: 4 GiB from one unlisted peer), and
    counting what arrives for the watchdog's minimum transfer rate. pynetdicom reads a PDU's
    6-byte header once data is waiting, then its body: a body read in progress is a transfer."""

    received = 0  # class defaults: pynetdicom creates the socket, its class is swapped after
    in_body = False

    def recv(self, nr_bytes: int) -> bytearray:
        limit = MAX_PDU_BYTES if self.assoc.is_established else MAX_REQUEST_PDU_BYTES
        if nr_bytes <= limit:
            return self._read(nr_bytes)
        log.warning("connection from %s closed: PDU of %d bytes is over the %d-byte limit%s",
                    self.assoc.requestor.address, nr_bytes, limit,
                    "" if self.assoc.is_established else " before association")
        _shutdown(self.socket)
        return bytearray()  # pynetdicom reads a short PDU as the connection closing

    def _read(self, nr_bytes: int) -> bytearray:
        """As pynetdicom's recv: until `nr_bytes` arrived or the connection closed."""
        raw = cast(socket.socket, self.socket)
        bytestream = bytearray()
        self.in_body = nr_bytes != 6
        try:
            while len(bytestream) < nr_bytes:
                data = raw.recv(min(1 << 16, nr_bytes - len(bytestream)))
                if not data:
                    break
                bytestream.extend(data)
                self.received += len(data)
        finally:
            self.in_body = False
        return bytestream


class GuardedRequestHandler(RequestHandler):
    """Runs one association in the connection's own thread, so the server sees when it ends."""

    def handle(self) -> None:
        assoc = self._create_association()
        assoc.dul.socket.__class__ = GuardedSocket  # created by pynetdicom with its events queued
        server: GuardedServer = self.server  # type: ignore[assignment]
        server.track(assoc, self.request)
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        server.untrack(assoc)


@dataclass
class Live:
    """An association the watchdog follows: its connection, and its current C-STORE."""

    request: Any
    busy_since: float | None = None  # a C-STORE (or other message) being received or handled
    stores_done: int = 0
    window: tuple[float, int] = field(default=(0.0, 0))  # (since, bytes received then)


class GuardedServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the limits a hostile or broken peer needs.

    - every connection counts against max_associations and its host's share from the moment it
      is accepted (pynetdicom counts at the A-ASSOCIATE-RQ, after reading it without a timeout);
      over either, the peer gets an A-ASSOCIATE-RJ "local limit exceeded" and is closed;
    - the last max_associations - max_associations_per_host slots are kept for hosts holding
      none: two or more flooding hosts together cannot take every slot (the per-host share alone
      let two hosts' reconnect loops starve a third sender: 0 of 15 stored, issue 23 row 7);
    - one host may open connection_rate_per_host_per_s connections a second (bursts of
      connection_burst_per_host); past that they are refused at once;
    - a C-STORE (receiving it, then handling it) running past store_deadline_s, or received
      slower than min_transfer_bytes_per_s over transfer_rate_window_s, is aborted (A-ABORT)
      and its slot freed, whatever the handler is doing (a peer dripping one byte every 20 s
      inside a P-DATA held its slot for ever);
    - a connection that has not completed its association within association_request_timeout_s
      is closed (a stalled or dripping A-ASSOCIATE-RQ held a slot for ever);
    - reads block at most network_timeout_s;
    - the node's capacity and recent refusals go to `node-health.json` for /healthz.
    """

    daemon_threads = True
    block_on_close = False
    wraps_tls = True  # the socket is wrapped where it is accepted (not by dicom_node.processes)

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        self._per_host: dict[str, int] = {}
        self._slots: dict[Any, str] = {}  # connection -> host, while it holds a slot
        self._open: dict[Any, tuple[float, Any]] = {}  # association not yet established -> since
        self._refusals: deque[float] = deque(maxlen=1000)
        self._lingering: dict[Any, list] = {}  # refused connection -> [close by, answered]
        self._live: dict[Any, Live] = {}  # association -> what the watchdog knows of it
        self._buckets: dict[str, tuple[float, float]] = {}  # host -> (tokens, at): connection rate
        self._stopped = threading.Event()
        super().__init__(*args, **kwargs)
        threading.Thread(target=self._watch, daemon=True, name="association-watchdog").start()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """As pynetdicom's, plus a timeout on every read (accepted sockets block for ever) and
        TCP_NODELAY: a small PDU (a C-STORE-RSP) may otherwise wait for the peer's delayed ACK,
        about 40 ms on loopback."""
        assert self.socket is not None  # bound in __init__
        client, address = self.socket.accept()
        client.settimeout(self.settings.network_timeout_s)
        with contextlib.suppress(OSError):  # not a TCP socket (a unix socket in a test)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The TLS handshake is deferred to the association's thread (core.tls).
        if self.ssl_context and self.wraps_tls:
            try:
                client = self.ssl_context.wrap_socket(client, server_side=True)
            except OSError:
                client.close()
                raise
        return client, address

    def _rate_allows(self, host: str, now: float) -> bool:
        """Token bucket per host: `connection_rate_per_host_per_s`, bursts of `_burst`."""
        rate, burst = self.settings.connection_rate_per_host_per_s, self.settings.connection_burst_per_host
        if rate <= 0:
            return True
        tokens, at = self._buckets.get(host, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * rate)
        if len(self._buckets) >= MAX_RATE_BUCKETS:  # forget hosts whose bucket has refilled
            full = [known for known, (left, since) in self._buckets.items()
                    if left + (now - since) * rate >= burst]
            for known in full:
                del self._buckets[known]
        allowed = tokens >= 1.0
        self._buckets[host] = (tokens - 1.0 if allowed else tokens, now)
        return allowed

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        maximum, per_host = self.settings.max_associations, self.settings.associations_per_host
        with self._lock:
            held, free = self._per_host.get(host, 0), maximum - len(self._slots)
            reserved = maximum - per_host
            if not self._rate_allows(host, time.monotonic()):
                why = (f"more than {self.settings.connection_rate_per_host_per_s:g} connections a "
                       "second from this host")
            elif free <= 0:
                why = f"all {maximum} association slots in use"
            elif held >= per_host:
                why = f"{host} holds its {per_host} association slots"
            elif held and free <= reserved:
                why = f"{host} holds {held}; the last {reserved} slots are kept for other hosts"
            else:
                self._slots[request] = host
                self._per_host[host] = held + 1
                return True
            self._refusals.append(time.monotonic())
        log.warning("connection from %s refused: %s", host, why, extra={"peer": host})
        if not self.ssl_context and len(self._lingering) < MAX_LINGERING:
            # Answered by the watchdog once the peer's A-ASSOCIATE-RQ has arrived: sent before,
            # a peer may read the A-ASSOCIATE-RJ before it has sent its request and see an abort.
            # Over TLS no PDU can go before the handshake, which must not run in this thread
            # (see core.tls): that peer sees the connection close.
            with contextlib.suppress(OSError):
                request.setblocking(False)
                with self._lock:
                    self._lingering[request] = [time.monotonic() + LINGER_S, False]
        return False  # socketserver closes the connection (shutdown_request)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            if request in self._lingering:
                return  # the watchdog reads what the peer still sends, then closes it
        super().shutdown_request(request)

    def _close_lingering(self, now: float) -> None:
        """Refused connections: answer the request with A-ASSOCIATE-RJ, then read until the peer
        closes (closed at once, data arriving after makes the kernel reset the connection before
        the peer has read the answer), or until the deadline."""
        with self._lock:
            for request, state in list(self._lingering.items()):
                deadline, answered = state
                done = now > deadline
                try:
                    while request.recv(4096):
                        if not answered:
                            request.send(LOCAL_LIMIT_EXCEEDED_RJ)
                            request.shutdown(socket.SHUT_WR)
                            state[1] = answered = True
                    done = True  # end of stream
                except BlockingIOError:
                    pass
                except OSError:
                    done = True
                if done:
                    del self._lingering[request]
                    request.close()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._lock:
            host = self._slots.pop(request, None)
            if host is not None:
                self._per_host[host] -= 1
                if not self._per_host[host]:
                    del self._per_host[host]

    def track(self, assoc: Any, request: Any) -> None:
        with self._lock:
            self._open[assoc] = (time.monotonic(), request)
            self._live[assoc] = Live(request)

    def untrack(self, assoc: Any) -> None:
        with self._lock:
            self._live.pop(assoc, None)
            self._open.pop(assoc, None)

    def _follow(self, assoc: Any, live: Live, now: float) -> str | None:
        """Why the established association `assoc` is to be aborted now, or None.

        Busy: a message being received (a PDU body read, or a DIMSE message partly arrived) or
        the C-STORE handler running; the deadline runs from when it became busy, or from the
        end of the previous C-STORE. The transfer rate is checked while receiving only."""
        settings = self.settings
        sock = assoc.dul.socket
        receiving = bool(getattr(sock, "in_body", False)) or assoc.dimse.message is not None
        handling = bool(getattr(assoc, "pneumo_in_handler", False))
        received = int(getattr(sock, "received", 0))
        done = int(getattr(assoc, "pneumo_stores_done", 0))
        if done != live.stores_done:  # a C-STORE ended: the next one's clock starts now
            live.stores_done, live.busy_since = done, None
        if not (receiving or handling):
            live.busy_since = None
            return None
        if live.busy_since is None:
            live.busy_since, live.window = now, (now, received)
        if now - live.busy_since > settings.store_deadline_s:
            return (f"C-STORE running past its {settings.store_deadline_s:g} s deadline "
                    "(PNEUMO_STORE_DEADLINE_S)")
        since, at_start = live.window
        if handling or not receiving:
            live.window = (now, received)
        elif now - since >= settings.transfer_rate_window_s:
            rate = (received - at_start) / (now - since)
            if rate < settings.min_transfer_bytes_per_s:
                return (f"transfer at {rate:.1f} bytes/s over {now - since:.0f} s, under the "
                        f"{settings.min_transfer_bytes_per_s} bytes/s minimum "
                        "(PNEUMO_MIN_TRANSFER_BYTES_PER_S)")
            live.window = (now, received)
        return None

    def _abort(self, assoc: Any, live: Live, why: str) -> None:
        """A-ABORT and close the connection (its threads see it close), and free its slot now:
        a handler stuck in a call may keep its thread, never the slot."""
        address = assoc.requestor.address
        calling = printable(str(assoc.requestor.ae_title).strip())
        log.warning("association from %s (calling AE %s) aborted: %s", address, calling, why,
                    extra={"peer": address})
        self._live.pop(assoc, None)
        self._release(live.request)
        raw = getattr(assoc.dul.socket, "socket", None)
        if raw is not None and not isinstance(raw, ssl.SSLSocket):  # TLS: its own thread writes
            with contextlib.suppress(OSError):
                raw.settimeout(0)
                raw.send(A_ABORT_PROVIDER)
        _shutdown(raw)

    def _watch(self) -> None:
        """Close connections past their association deadline; write the health file."""
        last_health = 0.0
        while not self._stopped.wait(0.25):
            now = time.monotonic()
            deadline = self.settings.association_request_timeout_s
            with self._lock:
                for assoc, live in list(self._live.items()):
                    if assoc.is_established and (why := self._follow(assoc, live, now)):
                        self._abort(assoc, live, why)
                for assoc, (since, request) in list(self._open.items()):
                    raw = getattr(assoc.dul.socket, "socket", None)
                    if assoc.is_established:
                        del self._open[assoc]  # from now on pynetdicom's idle timer and _follow apply
                    elif (raw is None or raw.fileno() == -1
                          or (getattr(assoc, "_started_dul", False) and not assoc.dul.is_alive())):
                        # Over before an association (closed, junk, aborted): pynetdicom's
                        # thread still waits out its ACSE timeout, holding no slot meanwhile.
                        del self._open[assoc]
                        _shutdown(raw)
                        self._release(request)
                    elif now - since > deadline:
                        log.warning("connection from %s closed: no association within %.0f s",
                                    assoc.requestor.address, deadline)
                        _shutdown(raw)
            self._close_lingering(now)
            if now - last_health >= HEALTH_INTERVAL_S:
                last_health = now
                self.write_health()

    def health(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            active = len(self._slots)
            refused = sum(1 for at in self._refusals if now - at <= REFUSAL_WINDOW_S)
        return {
            "updated_at": time.time(), "active_associations": active,
            "max_associations": self.settings.max_associations,
            "max_associations_per_host": self.settings.associations_per_host,
            f"refused_last_{REFUSAL_WINDOW_S:.0f}_s": refused,
            "accepting": active < self.settings.max_associations,
        }

    def write_health(self) -> None:
        """Atomically, for the dashboard (another process, maybe another container)."""
        path = self.settings.node_health_path
        try:
            temporary = path.with_suffix(".tmp")
            temporary.write_text(json.dumps(self.health()))
            os.replace(temporary, path)
        except OSError as error:
            log.warning("could not write %s: %s", path, error.strerror)

    def shutdown(self) -> None:
        self._stopped.set()
        super().shutdown()


def _shutdown(raw: socket.socket | None) -> None:
    """Unblock a thread reading `raw` (it sees the connection close) and end the connection."""
    if raw is not None:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)
