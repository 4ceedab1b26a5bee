"""`pneumo dashboard`: the page radiology IT keeps open, `/metrics` for Prometheus, `/healthz`.

Server-rendered (Starlette + Jinja2, no JavaScript). Reading is open; re-send and re-run change
state and need the operator token (PNEUMO_DASHBOARD_TOKEN or _FILE), given once on the page and
kept in an HttpOnly, SameSite=Strict cookie. With no token configured the actions are disabled.
Patient names are not shown unless PNEUMO_SHOW_PATIENT_NAMES is set.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from urllib.parse import quote

from pydicom import dcmread
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from core.db import Instance, session_factory
from core.queue import CLASSIFY, DELIVER, make_app, task_sender
from core.settings import Settings
from ops import monitoring, status
from ops.metrics import exposition

log = logging.getLogger(__name__)
TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
COOKIE = "pneumo_token"


def operator_token(settings: Settings) -> str:
    """The configured token ('' when none); the file wins so a secret need not sit in the env."""
    if settings.dashboard_token_file:
        return settings.dashboard_token_file.read_text().strip()
    return settings.dashboard_token.strip()


def create_app(settings: Settings) -> Starlette:
    sessions = session_factory(settings.sqlalchemy_url)
    token = operator_token(settings)
    producer = make_app(settings)
    send_delivery = task_sender(settings, DELIVER, producer)
    send_classify = task_sender(settings, CLASSIFY, producer)

    def authorised(request: Request) -> bool:
        given = request.cookies.get(COOKIE) or request.headers.get("authorization", "").removeprefix(
            "Bearer ")
        return bool(token) and hmac.compare_digest(given.encode(), token.encode())

    def back(message: str) -> RedirectResponse:
        return RedirectResponse(f"/?msg={quote(message)}", status_code=303)

    async def page(request: Request) -> Response:
        snap = monitoring.snapshot(settings, sessions)
        studies, failures, deliveries = [], [], []
        if snap.database_ok:
            with sessions() as session:
                studies = monitoring.recent_studies(session)
                failures = monitoring.failed_instances(session)
                deliveries = monitoring.deliveries_needing_attention(session)
                if settings.show_patient_names:
                    _add_patient_names(session, studies)
        return TEMPLATES.TemplateResponse(request, "dashboard.html", {
            "snap": snap, "studies": studies, "failures": failures, "deliveries": deliveries,
            "settings": settings, "message": request.query_params.get("msg", ""),
            "signed_in": authorised(request), "token_configured": bool(token),
        })

    async def login(request: Request) -> Response:
        given = str((await request.form()).get("token", ""))
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            log.warning("dashboard sign-in refused from %s", request.client.host if request.client else "?")
            return back("Sign-in refused: wrong operator token")
        response = back("Signed in")
        response.set_cookie(COOKIE, given, httponly=True, samesite="strict")
        return response

    async def logout(request: Request) -> Response:
        response = back("Signed out")
        response.delete_cookie(COOKIE)
        return response

    def refuse(request: Request) -> Response:
        text = ("Refused: no operator token is configured (set PNEUMO_DASHBOARD_TOKEN)" if not token
                else "Refused: sign in with the operator token first")
        if "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(f"/?msg={quote(text)}", status_code=303)
        return PlainTextResponse(text, status_code=401)

    async def resend(request: Request) -> Response:
        if not authorised(request):
            return refuse(request)
        delivery_id = int(request.path_params["delivery_id"])
        if not status.resend_delivery(sessions, delivery_id, send_delivery, by="dashboard"):
            return back(f"Delivery {delivery_id} not found")
        log.info("dashboard: delivery %s queued again", delivery_id)
        return back(f"Delivery {delivery_id} queued again")

    async def rerun(request: Request) -> Response:
        if not authorised(request):
            return refuse(request)
        instance_id = int(request.path_params["instance_id"])
        if not status.rerun_instance(sessions, instance_id, send_classify, by="dashboard"):
            return back(f"Instance {instance_id} is not a failed instance")
        log.info("dashboard: instance %s queued again", instance_id)
        return back(f"Instance {instance_id} queued again")

    async def metrics(_request: Request) -> Response:
        body = exposition(lambda: monitoring.snapshot(settings, sessions))
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def healthz(_request: Request) -> Response:
        snap = monitoring.snapshot(settings, sessions)
        healthy = snap.database_ok and snap.broker_ok
        return JSONResponse({
            "database": "ok" if snap.database_ok else snap.database_error,
            "broker": "ok" if snap.broker_ok else "unreachable",
            "accepting_images": not snap.refusing_images,
        }, status_code=200 if healthy else 503)

    return Starlette(routes=[
        Route("/", page),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/deliveries/{delivery_id:int}/resend", resend, methods=["POST"]),
        Route("/instances/{instance_id:int}/rerun", rerun, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/healthz", healthz),
    ])


def _add_patient_names(session, studies: list[monitoring.StudyRow]) -> None:
    """Names are not in the database on purpose; read them from one stored header per study."""
    for row in studies:
        path = session.scalar(select(Instance.path).where(Instance.study_id == row.study_id).limit(1))
        try:
            row.patient_name = str(dcmread(path, stop_before_pixels=True).get("PatientName", ""))
        except (OSError, TypeError, ValueError):
            row.patient_name = "?"


class CannotListen(RuntimeError):
    """The dashboard's port cannot be bound: restarting will not help."""


def serve(settings: Settings) -> None:
    """Bind first (a port in use raises CannotListen, not uvicorn's exit), then say so, then serve."""
    import socket

    import uvicorn

    host, port = settings.dashboard_host, settings.dashboard_port
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as error:
        raise CannotListen(f"cannot listen on {host}:{port} (PNEUMO_DASHBOARD_HOST/PNEUMO_DASHBOARD_PORT): "
                           f"{error.strerror or error}") from None
    log.info("dashboard on http://%s:%d/ (metrics at /metrics)", host, port)
    from core.lifecycle import notify_ready

    notify_ready()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", access_log=False))
    server.run(sockets=[sock])
