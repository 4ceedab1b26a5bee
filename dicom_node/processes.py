"""`pneumo node` in several processes: one accepts, the others receive.

One Python process tops out near 200 files/s whatever the node trims (one GIL for every
association), so `node_processes` receiver processes each run associations in threads, as the
single-process node does. The acceptor (the parent) accepts every connection and applies the
connection guard's limits for all of them at once (slots in all and per host, the slots kept for
other hosts, connection rate, refusals, /healthz), then hands the socket to the receiver holding
the fewest associations (SCM_RIGHTS over a unix socket pair). The receiver runs the association
with its own watchdog (C-STORE deadline, transfer rate, association request timeout) and says
when it ended; the acceptor then frees the slot. SO_REUSEPORT would spread connections without
an acceptor, but each process would count only its own connections: a host's share, and the
slots kept for other hosts, would multiply by the number of processes.

Receivers are forked before the acceptor starts any thread, ask the kernel for SIGTERM when it
dies (Linux), and exit once their pipe to it closes. A receiver that dies stops the node (exit
status 1, and `pneumo run` restarts it): its associations' slots are freed first.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from core.settings import Settings
from dicom_node.guard import GuardedServer

log = logging.getLogger(__name__)

MAX_DEFAULT_PROCESSES = 8
STOP_WAIT_S = 5.0  # a receiver whose acceptor stopped lets its associations finish this long
CONNECTION_ID = struct.Struct("<Q")


def process_count(settings: Settings) -> int:
    """`node_processes`, or one per CPU this process may run on (at most 8); 1 where the socket
    hand-over is not available (it needs fork and SCM_RIGHTS: Linux)."""
    if not sys.platform.startswith("linux"):
        return 1
    return settings.node_processes or min(MAX_DEFAULT_PROCESSES, len(os.sched_getaffinity(0)))


def fork_receivers(count: int, serve: Callable[[socket.socket], None]) -> list[tuple[int, socket.socket]]:
    """Fork `count` receivers, each running `serve(its end of the pair)` and then exiting; for the
    acceptor, (pid, its end of the pair) of each. Call before any thread is started."""
    receivers: list[tuple[int, socket.socket]] = []
    parent = os.getpid()
    for _ in range(count):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the receiver
            status = 1
            try:
                ours.close()
                for _, other in receivers:
                    other.close()
                _die_with(parent)
                serve(theirs)
                status = 0
            except KeyboardInterrupt:
                status = 0
            except BaseException:
                log.exception("node receiver process failed")
            finally:
                logging.shutdown()
                os._exit(status)
        theirs.close()
        receivers.append((pid, ours))
    return receivers


def _die_with(parent: int) -> None:
    """SIGTERM this process when the acceptor dies, however it dies (prctl PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was set
        os._exit(1)


class Receiver(GuardedServer):
    """Runs the associations its acceptor hands over; listens on no port, writes no health file
    (the acceptor counts every slot), and tells the acceptor when each association ended."""

    _acceptor: socket.socket
    _ids: dict[Any, int]  # connection -> the acceptor's id for it, until the association ends

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()  # TCPServer made one; the acceptor's is the only listening socket

    def server_activate(self) -> None:
        pass

    def write_health(self) -> None:
        pass

    def receive(self, acceptor: socket.socket) -> None:
        """Run each handed-over connection in its own thread until the acceptor goes away."""
        self._acceptor, self._ids = acceptor, {}
        self._send_lock = threading.Lock()
        while True:
            message, fds, _, _ = socket.recv_fds(acceptor, 512, 1)
            if not message:
                break
            connection = socket.socket(fileno=fds[0])
            connection.settimeout(self.settings.network_timeout_s)
            (connection_id,) = CONNECTION_ID.unpack_from(message)
            host, _, port = message[CONNECTION_ID.size:].decode().partition(" ")
            request: Any = connection
            if self.ssl_context:  # the handshake is deferred to the association's thread (core.tls)
                try:
                    request = self.ssl_context.wrap_socket(connection, server_side=True)
                except OSError:
                    connection.close()
                    self._tell_ended(connection_id)
                    continue
            with self._lock:
                self._ids[request] = connection_id
            self.process_request(request, (host, int(port)))
            self.service_actions()  # as serve_forever does: pynetdicom collects ended associations
        self._stopped.set()
        deadline = time.monotonic() + STOP_WAIT_S
        while self._ids and time.monotonic() < deadline:
            time.sleep(0.1)

    def _release(self, request: Any) -> None:
        with self._lock:
            connection_id = self._ids.pop(request, None)
        if connection_id is not None:
            self._tell_ended(connection_id)

    def _tell_ended(self, connection_id: int) -> None:
        with self._send_lock, contextlib.suppress(OSError):  # a stopped acceptor needs no answer
            self._acceptor.send(CONNECTION_ID.pack(connection_id))


class Acceptor(GuardedServer):
    """Accepts and counts every connection (GuardedServer's limits), then hands it over to the
    receiver holding the fewest associations; over TLS the receiver wraps it."""

    wraps_tls = False

    def __init__(self, *args: Any, receivers: list[tuple[int, socket.socket]], **kwargs: Any) -> None:
        self._receivers = receivers
        self._load = [0] * len(receivers)
        self._handed: dict[int, tuple[Any, int]] = {}  # connection id -> (request, receiver)
        self._next_id = 0
        super().__init__(*args, **kwargs)
        self.failed = False
        for index in range(len(receivers)):
            threading.Thread(target=self._follow_receiver, args=(index,), daemon=True,
                             name=f"receiver-{index}").start()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            count = len(self._receivers)  # the least busy; on a tie, the next in turn
            index = min(range(count), key=lambda i: (self._load[i], (i - self._next_id) % count))
            self._next_id += 1
            connection_id = self._next_id
            self._handed[connection_id] = (request, index)
            self._load[index] += 1
        host, port = client_address[0], client_address[1]
        message = CONNECTION_ID.pack(connection_id) + f"{host} {port}".encode()
        try:
            socket.send_fds(self._receivers[index][1], [message], [request.fileno()])
        except OSError as error:
            log.error("could not hand a connection to node receiver %d: %s", index, error)
            self._ended(connection_id)
        request.close()  # the receiver holds the connection now; never shut down from here

    def _ended(self, connection_id: int) -> None:
        with self._lock:
            handed = self._handed.pop(connection_id, None)
            if handed is None:
                return
            request, index = handed
            self._load[index] -= 1
            self._release(request)

    def _follow_receiver(self, index: int) -> None:
        pid, pair = self._receivers[index]
        with contextlib.suppress(OSError):
            while message := pair.recv(CONNECTION_ID.size):
                self._ended(CONNECTION_ID.unpack(message)[0])
        if self._stopped.is_set():
            return
        log.error("node receiver process %d (pid %d) ended; stopping the node so it restarts whole",
                  index, pid)
        with self._lock:
            for connection_id in [c for c, (_, i) in self._handed.items() if i == index]:
                self._ended(connection_id)
        self.failed = True
        # Only ends serve_forever: `start` then shuts the server down as on any other stop.
        threading.Thread(target=socketserver.BaseServer.shutdown, args=(self,), daemon=True).start()

    def stop_receivers(self) -> None:
        """Close each pipe (its receiver lets its associations finish, then exits) and reap them."""
        self._stopped.set()
        for _, pair in self._receivers:
            with contextlib.suppress(OSError):
                pair.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + STOP_WAIT_S + 2.0
        for pid, _ in self._receivers:
            while time.monotonic() < deadline:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0]:
                        break
                    time.sleep(0.05)
                    continue
                break
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
