"""`pneumo dashboard`: the page radiology IT keeps open, `/metrics` for Prometheus, `/healthz`.

Server-rendered (Starlette + Jinja2, no JavaScript). Reading is open; re-send and re-run change
state and need the operator token (PNEUMO_DASHBOARD_TOKEN or _FILE), given once on the page; the
browser then holds a signed cookie (HttpOnly, SameSite=Strict, Secure over HTTPS) with the key of
a session kept in the database, never the token itself; signing out deletes the session, so a
copied cookie dies with it. Wrong tokens are throttled per client address (429): the address that
connected, or, only from a configured proxy (PNEUMO_DASHBOARD_TRUSTED_PROXIES), the one it
forwards. With no token configured the actions are disabled, and the dashboard will not listen
beyond loopback. Patient names are not shown unless PNEUMO_SHOW_PATIENT_NAMES is set.
"""

from __future__ import annotations

import hmac
import importlib
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from core.db import Instance, session_factory
from core.logsafe import printable
from core.queue import CLASSIFY, DELIVER, make_app, task_sender
from core.registry import candidate_versions
from core.settings import Settings
from ops import monitoring, status
from ops.dashboard_auth import (
    SESSION_MAX_AGE_S,
    LoginThrottle,
    OperatorSessions,
    operator_token,
    session_secret,
    throttle_key,
)
from ops.metrics import exposition
from ops.studies import StudyRow, deliveries_needing_attention, failed_instances, recent_studies
from ops.web import TEMPLATES, Dashboard

log = logging.getLogger(__name__)
# Pages beyond the main one, one line each: a module with routes(dashboard) and, optionally,
# panel(dashboard, session) for a panel on the main page (see ops.web).
PAGE_MODULES = [
    "ops.trend_pages",
    "ops.labels_web",  # labels (agree/disagree) and the scorecard (issue 20)
    "ops.shadow_web",  # candidate vs served agreement, silent versions (issue 20)
]
SESSION_COOKIE = "pneumo_session"
MAX_ROW_ID = 2**63 - 1  # the largest primary key either database stores (BIGINT)
SECURITY_HEADERS = {
    # The page has one inline <style> and no script; nothing may frame it (clickjacking of the
    # re-send and re-run buttons) and forms post only to the dashboard itself.
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",  # study lists (and names, when shown) stay out of caches
}


async def _security_headers(request: Request,
                            call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def trusted_proxies(settings: Settings) -> list[str]:
    """The proxies whose forwarded headers are believed (PNEUMO_DASHBOARD_TRUSTED_PROXIES)."""
    return [entry.strip() for entry in settings.dashboard_trusted_proxies.split(",") if entry.strip()]


def tls_enabled(settings: Settings) -> bool:
    return settings.dashboard_tls_cert_file is not None or settings.dashboard_tls_key_file is not None


def create_app(settings: Settings) -> Starlette:
    sessions = session_factory(settings.sqlalchemy_url)
    operators = OperatorSessions(sessions)
    token = operator_token(settings)
    producer = make_app(settings)
    send_delivery = task_sender(settings, DELIVER, producer)
    send_classify = task_sender(settings, CLASSIFY, producer)

    throttle = LoginThrottle()

    def client_of(request: Request) -> str:
        """The client's address: the peer of the connection, or what a trusted proxy forwarded
        (ProxyHeadersMiddleware rewrites it only for those)."""
        return throttle_key(request.client.host) if request.client else "?"

    def token_matches(given: str) -> bool:
        return bool(token) and hmac.compare_digest(given.encode(), token.encode())

    def signed_in(request: Request) -> bool:
        return bool(token) and operators.valid(request.session.get("operator"))

    def refusal(request: Request) -> Response | None:
        """None if the request may change state: a signed-in session, or the token as a Bearer
        header (scripts). Wrong Bearer tokens count against the client as wrong sign-ins do."""
        if signed_in(request):
            return None
        header = request.headers.get("authorization", "")
        if header.startswith("Bearer "):
            if (too_many := throttled(request)) is not None:
                return too_many
            if token_matches(header.removeprefix("Bearer ")):
                return None
            throttle.failed(client_of(request))
        return refuse(request)

    def throttled(request: Request) -> Response | None:
        wait = throttle.retry_after(client_of(request))
        if not wait:
            return None
        text = f"Too many wrong operator tokens from this address; try again in {wait} s"
        return PlainTextResponse(text, status_code=429, headers={"Retry-After": str(wait)})

    def back(message: str) -> RedirectResponse:
        return RedirectResponse(f"/?msg={quote(message)}", status_code=303)

    # Handlers that read the database (or queue a task) are plain functions: Starlette runs them
    # in its thread pool, so a slow query does not stall the event loop and every other request.
    # Only sign-in and sign-out, which touch no database, run on the loop.
    def page(request: Request) -> Response:
        snap = monitoring.snapshot(settings, sessions)
        studies, failures, deliveries, panels = [], [], [], []
        if snap.database_ok:
            with sessions() as session:
                studies = recent_studies(session, candidates=candidate_versions(settings.models_dir))
                failures = failed_instances(session)
                deliveries = deliveries_needing_attention(session)
                if settings.show_patient_names:
                    _add_patient_names(session, studies)
                panels = [module.panel(dashboard, session) for module in modules if hasattr(module, "panel")]
        return TEMPLATES.TemplateResponse(request, "dashboard.html", {
            "snap": snap, "studies": studies, "failures": failures, "deliveries": deliveries,
            "settings": settings, "message": request.query_params.get("msg", ""),
            "signed_in": signed_in(request), "token_configured": bool(token), "panels": panels,
            "links": dashboard.links,
        })

    async def login(request: Request) -> Response:
        if (refusal := throttled(request)) is not None:
            log.warning("dashboard sign-in from %s throttled", printable(client_of(request)))
            return refusal
        given = str((await request.form()).get("token", ""))
        if not token_matches(given):
            throttle.failed(client_of(request))
            log.warning("dashboard sign-in refused from %s", printable(client_of(request)))
            return back("Sign-in refused: wrong operator token")
        previous = request.session.get("operator")
        request.session.clear()
        try:
            await run_in_threadpool(operators.close, previous)
            request.session["operator"] = await run_in_threadpool(operators.open)
        except SQLAlchemyError as error:
            log.warning("dashboard sign-in failed: the database is unreachable (%s)", type(error).__name__)
            return back("Sign-in failed: the database is unreachable")
        return back("Signed in")

    async def logout(request: Request) -> Response:
        key = request.session.get("operator")
        request.session.clear()
        try:
            await run_in_threadpool(operators.close, key)
        except SQLAlchemyError as error:
            log.warning("dashboard sign-out: the database is unreachable (%s)", type(error).__name__)
            return back("Signed out here, but the database is unreachable: the session may live on")
        return back("Signed out")

    def refuse(request: Request) -> Response:
        text = ("Refused: no operator token is configured (set PNEUMO_DASHBOARD_TOKEN)" if not token
                else "Refused: sign in with the operator token first")
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(f"/?msg={quote(text)}", status_code=303)
        return PlainTextResponse(text, status_code=401)

    def queue_again(what: str, key: str, requeue: Callable[..., bool], enqueue: Callable[[int], None],
                    refused_text: str) -> Callable[[Request], Response]:
        """An operator action: `requeue` one delivery or instance, then back to the page."""
        def action(request: Request) -> Response:
            if (refused := refusal(request)) is not None:
                return refused
            entity_id = int(request.path_params[key])
            if entity_id > MAX_ROW_ID:  # no such row; the database would raise on the number
                return PlainTextResponse(f"{what} {entity_id} not found", status_code=404)
            if not requeue(sessions, entity_id, enqueue, by="dashboard"):
                return back(f"{what} {entity_id} {refused_text}")
            log.info("dashboard: %s %s queued again", what.lower(), entity_id)
            return back(f"{what} {entity_id} queued again")
        return action

    resend = queue_again("Delivery", "delivery_id", status.resend_delivery, send_delivery, "not found")
    rerun = queue_again("Instance", "instance_id", status.rerun_instance, send_classify,
                        "is not a failed instance")

    def metrics(_request: Request) -> Response:
        body = exposition(lambda: monitoring.snapshot(settings, sessions))
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    def healthz(_request: Request) -> Response:
        snap = monitoring.snapshot(settings, sessions)
        healthy = snap.database_ok and snap.broker_ok
        node = node_health(settings)
        return JSONResponse({
            "database": "ok" if snap.database_ok else snap.database_error,
            "broker": "ok" if snap.broker_ok else "unreachable",
            "accepting_images": not snap.refusing_images and node.get("accepting", True),
            "node": node,
        }, status_code=200 if healthy else 503)

    dashboard = Dashboard(settings, sessions, TEMPLATES, bool(token), signed_in, refusal)
    modules = [importlib.import_module(name) for name in PAGE_MODULES]
    pages: list[BaseRoute] = [route for module in modules for route in module.routes(dashboard)]
    proxies = trusted_proxies(settings)
    return Starlette(routes=[
        Route("/", page),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/deliveries/{delivery_id:int}/resend", resend, methods=["POST"]),
        Route("/instances/{instance_id:int}/rerun", rerun, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        # Browsers ask for it on every page; a 404 is an error in their console.
        Route("/favicon.ico", lambda _request: Response(status_code=204)),
        *pages,  # after the main routes: a page module cannot shadow them
    ], middleware=[
        # Outermost: the client address every later layer sees. No trusted proxy: none is believed.
        *([Middleware(ProxyHeadersMiddleware, trusted_hosts=proxies)] if proxies else []),
        Middleware(BaseHTTPMiddleware, dispatch=_security_headers),
        Middleware(SessionMiddleware, secret_key=session_secret(token), session_cookie=SESSION_COOKIE,
                   max_age=SESSION_MAX_AGE_S, same_site="strict", https_only=tls_enabled(settings)),
    ])


def node_health(settings: Settings, stale_s: float = 15.0) -> dict:
    """The node's own account of its association slots (it writes the file every 2 s).

    Without it the dashboard said "accepting" while every association was refused. No file: no
    node has run with this home (another host, or not started), so nothing is claimed; a file
    not rewritten for `stale_s`: the node is not running, so it is not accepting.
    """
    try:
        health = json.loads(settings.node_health_path.read_text())
    except FileNotFoundError:
        return {"status": "unknown: no node has written its health under PNEUMO_HOME"}
    except (OSError, ValueError) as error:
        return {"status": f"unreadable: {type(error).__name__}"}
    age = time.time() - float(health.get("updated_at", 0))
    if age > stale_s:
        return {**health, "accepting": False, "status": f"not running: no update for {age:.0f} s"}
    return {**health, "status": "running" if health.get("accepting") else "all association slots in use"}


def _add_patient_names(session: Session, studies: list[StudyRow]) -> None:
    """Names are not in the database on purpose; read them from one stored header per study."""
    for row in studies:
        path = session.scalar(select(Instance.path).where(Instance.study_id == row.study_id).limit(1))
        try:
            if path is None:
                raise OSError("no stored image")
            row.patient_name = str(dcmread(path, stop_before_pixels=True).get("PatientName", ""))
        except (OSError, TypeError, ValueError):
            row.patient_name = "?"


class CannotListen(RuntimeError):
    """The dashboard cannot listen as configured (port in use, TLS files, no token beyond
    loopback): restarting will not help."""


def beyond_loopback(host: str) -> bool:
    """Whether listening on `host` is reachable from other machines (0.0.0.0, ::, a LAN address)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: whatever it resolves to, assume the network
        return True


def serve(settings: Settings) -> None:
    """Bind first (a port in use raises CannotListen, not uvicorn's exit), then say so, then serve."""
    import socket

    import uvicorn

    from core import tls

    host, port = settings.dashboard_host, settings.dashboard_port
    if beyond_loopback(host) and not operator_token(settings):
        raise CannotListen(f"the dashboard would listen on {host}, beyond loopback, with no operator "
                           f"token: set PNEUMO_DASHBOARD_TOKEN (or PNEUMO_DASHBOARD_TOKEN_FILE), or "
                           f"PNEUMO_DASHBOARD_HOST=127.0.0.1")
    try:
        context = tls.dashboard_context(settings)
    except tls.TLSConfigError as error:
        raise CannotListen(str(error)) from None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        raise CannotListen(f"cannot listen on {host}:{port} (PNEUMO_DASHBOARD_HOST/PNEUMO_DASHBOARD_PORT): "
                           f"{error.strerror or error}") from None
    scheme = "https" if context is not None else "http"
    log.info("dashboard on %s://%s:%d/ (metrics at /metrics)", scheme, host, port)
    from core.lifecycle import notify_ready

    notify_ready()
    # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: a local attacker (or anything
    # on the host) could pick its own address. Forwarded headers are create_app's business alone.
    server = uvicorn.Server(uvicorn.Config(
        create_app(settings), log_level="warning", access_log=False, proxy_headers=False,
        ssl_context_factory=(lambda _config, _default: context) if context is not None else None,
    ))
    server.run(sockets=[sock])
