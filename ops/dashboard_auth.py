"""Operator sign-in for the dashboard: the token, a throttle on wrong tokens per client, and
server-side sessions (the browser holds only a random key). See ops.dashboard for the rules."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.db import OperatorSession, utcnow
from core.settings import Settings

log = logging.getLogger("ops.dashboard")
SESSION_MAX_AGE_S = 8 * 3600  # one shift


def operator_token(settings: Settings) -> str:
    """The configured token ('' when none); the file wins so a secret need not sit in the env."""
    if settings.dashboard_token_file:
        return settings.dashboard_token_file.read_text().strip()
    return settings.dashboard_token.get_secret_value().strip()



def throttle_key(host: str) -> str:
    """Whom the sign-in throttle counts: an IPv4 address, or an IPv6 client's /64 (one site or
    host is given a whole /64, so counting single IPv6 addresses would give it 2**64 tries)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class LoginThrottle:
    """At most `attempts` wrong tokens per client in `window_s`; then 429 until the oldest ages out.

    Without it the operator token could be guessed at the speed of the network. Keyed by the
    client's address (throttle_key), which a request cannot choose: an attacker's failures lock
    out only the attacker, never an operator elsewhere.
    """

    MAX_CLIENTS = 10_000  # past this, the clients that failed longest ago are forgotten first

    def __init__(self, attempts: int = 5, window_s: float = 300.0) -> None:
        self.attempts, self.window_s = attempts, window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def retry_after(self, client: str) -> int:
        """Seconds this client must wait before trying again; 0 if it may try now."""
        now = time.monotonic()
        with self._lock:
            failures = self._failures.get(client)
            while failures and now - failures[0] > self.window_s:
                failures.popleft()
            if not failures:
                self._failures.pop(client, None)
                return 0
            if len(failures) < self.attempts:
                return 0
            return max(1, int(self.window_s - (now - failures[0])) + 1)

    def failed(self, client: str) -> None:
        with self._lock:
            if client not in self._failures and len(self._failures) >= self.MAX_CLIENTS:
                self._forget_one()
            self._failures.setdefault(client, deque(maxlen=self.attempts)).append(time.monotonic())
            self._failures.move_to_end(client)

    def _forget_one(self) -> None:
        """Make room: a flood of addresses must not grow this for ever, nor wipe the count of a
        throttled client (clearing all let a burst of new addresses reset one). The client that
        failed longest ago and is not throttled goes; only if every one is, the oldest."""
        now = time.monotonic()
        for client, failures in self._failures.items():
            if len(failures) < self.attempts or now - failures[-1] > self.window_s:
                del self._failures[client]
                return
        self._failures.popitem(last=False)


class OperatorSessions:
    """Signed-in operators, on the server: the browser holds a random key, the database its
    SHA-256 and when it expires. Signing out deletes the row, so the cookie stops working at
    once, not when its Max-Age runs out (issue 23); a restart keeps the sessions."""

    def __init__(self, sessions: sessionmaker[Session], max_age_s: float = SESSION_MAX_AGE_S) -> None:
        self._sessions, self.max_age_s = sessions, max_age_s

    @staticmethod
    def _digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    def open(self) -> str:
        """A new session's key (expired ones are removed on the way)."""
        key = secrets.token_urlsafe(32)
        now = utcnow()
        with self._sessions() as session, session.begin():
            session.execute(delete(OperatorSession).where(OperatorSession.expires_at <= now))
            session.add(OperatorSession(key_sha256=self._digest(key), created_at=now,
                                        expires_at=now + timedelta(seconds=self.max_age_s)))
        return key

    def valid(self, key: object) -> bool:
        """Whether `key` names an open, unexpired session; False when the database cannot say."""
        if not isinstance(key, str) or not key:
            return False
        try:
            with self._sessions() as session:
                expires_at = session.scalar(select(OperatorSession.expires_at)
                                            .where(OperatorSession.key_sha256 == self._digest(key)))
        except SQLAlchemyError as error:
            log.warning("dashboard: cannot check a session (%s)", type(error).__name__)
            return False
        return expires_at is not None and expires_at > utcnow()

    def close(self, key: object) -> None:
        if isinstance(key, str) and key:
            with self._sessions() as session, session.begin():
                session.execute(delete(OperatorSession)
                                .where(OperatorSession.key_sha256 == self._digest(key)))


def session_secret(token: str) -> str:
    """Sessions are signed with a key derived from the token: changing the token signs everyone
    out, and a restart keeps sessions. With no token a random key (nothing to sign in to)."""
    if not token:
        return secrets.token_hex(32)
    return hmac.new(token.encode(), b"pneumo dashboard session", hashlib.sha256).hexdigest()
