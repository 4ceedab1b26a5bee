"""The dashboard's label and scorecard pages (a page module: ops.dashboard.PAGE_MODULES):
- /labels: recent studies with the model's study-level finding (ops.scorecard.STUDY_RULE) and the
  current label; a signed-in operator agrees or disagrees, giving their name or initials;
- POST /studies/{id}/label: records that as a label (source dashboard), audited;
- /scorecard: each version's scorecard per site with its plots (ops.scorecard_plots);
- /metrics/scorecard: the scorecard and its alerts for Prometheus (a second scrape path, so the
  main /metrics stays cheap);
- a panel on the main page with the scorecard's alerts.
A POST is refused unless signed in (or the Bearer token), as the dashboard's own actions are;
besides the SameSite=Strict session cookie, a POST whose Origin is another site is refused (403).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from markupsafe import Markup
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import case, desc, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from core.contract import NEGATIVE_CLASS, POSITIVE_CLASS
from core.db import Instance, LabelSource, Result, Study
from ops import scorecard, scorecard_plots
from ops.labels import LabelError, current_labels, record_label
from ops.web import Dashboard

log = logging.getLogger(__name__)
RECENT = 50
MAX_READER = 64
MAX_ROW_ID = 2**63 - 1  # the largest primary key either database stores


@dataclass
class StudyFinding:
    study_id: int
    study_instance_uid: str
    accession_number: str | None
    model: str  # name@version of the latest result
    finding: str
    score: float
    label: str | None
    label_source: str | None


def recent_findings(session: Session, limit: int = RECENT, study_id: int | None = None) -> list[StudyFinding]:
    """The last studies with a result (or the one `study_id`): the latest version's study-level
    finding (ops.scorecard.STUDY_RULE) and their current label."""
    query = (select(Study.id, Study.study_instance_uid, Study.accession_number)
             .where(Study.id.in_(select(Instance.study_id).join(Result, Result.instance_id == Instance.id))))
    if study_id is not None:
        query = query.where(Study.id == study_id)
    studies = session.execute(query.order_by(desc(Study.last_received_at)).limit(limit)).all()
    labels = current_labels(session, [s.id for s in studies])
    found = []
    for sid, uid, accession in studies:
        name, version = session.execute(
            select(Result.model_name, Result.model_version).join(Instance)
            .where(Instance.study_id == sid)
            .order_by(desc(Result.created_at), desc(Result.id)).limit(1)).one()
        score, positive = session.execute(
            select(func.max(Result.probability), func.max(case((Result.label == POSITIVE_CLASS, 1), else_=0)))
            .join(Instance).where(Instance.study_id == sid, Result.model_name == name,
                                  Result.model_version == version)).one()
        label = labels.get(sid)
        found.append(StudyFinding(sid, uid, accession, f"{name}@{version}",
                                  POSITIVE_CLASS if positive else NEGATIVE_CLASS, float(score),
                                  label.label if label else None, label.source if label else None))
    return found


def same_origin(request: Request) -> bool:
    """No Origin header (older clients, scripts), "null" (what browsers send from our own pages:
    they carry Referrer-Policy no-referrer), or one naming this dashboard's host. The session
    cookie is SameSite=Strict besides, so a cross-site form never carries a sign-in."""
    origin = request.headers.get("origin")
    if not origin or origin == "null":
        return True
    return urlsplit(origin).netloc == request.headers.get("host", "")


def operator_name(request: Request, reader: str) -> str:
    """Who: the name the operator typed and a short, non-secret tag of their session (the digest
    the database keeps is SHA-256 of the key; this is a different hash of it)."""
    key = str(request.session.get("operator") or "")
    tag = hashlib.sha256(b"label " + key.encode()).hexdigest()[:8] if key else "bearer"
    return f"{reader} (dashboard session {tag})"


def metrics_body(cards: list[scorecard.Scorecard]) -> bytes:
    """The scorecard as Prometheus gauges (pneumo_scorecard_*), alerts as 0/1 per metric."""
    labels = ["model", "version", "site"]

    class Collector:
        def describe(self):
            return []

        def collect(self):
            studies = GaugeMetricFamily("pneumo_scorecard_studies", "Labelled studies scored", labels=labels)
            values = {name: GaugeMetricFamily(f"pneumo_scorecard_{name}", f"Site {name} (study level)",
                                              labels=labels)
                      for name in ("sensitivity", "specificity", "ppv", "auc", "ece")}
            alert = GaugeMetricFamily("pneumo_scorecard_alert", "1 when the site's figure is "
                                      "significantly below the card's", labels=[*labels, "metric"])
            for card in cards:
                key = [card.model_name, card.model_version, card.site]
                studies.add_metric(key, card.overall.n)
                for name, family in values.items():
                    value = getattr(card.overall, name).value
                    if value is not None:
                        family.add_metric(key, value)
                for name in ("sensitivity", "specificity"):
                    alert.add_metric([*key, name], float(any(a.startswith(name) for a in card.alerts)))
            yield studies
            yield from values.values()
            yield alert

    registry = CollectorRegistry()
    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry)


def alert_banners(cards: list[scorecard.Scorecard]) -> Markup:
    return Markup("").join(
        Markup('<div class="banner bad scorecard-alert">Scorecard: {}@{} at {}: {}</div>').format(
            card.model_name, card.model_version, card.site, alert)
        for card in cards for alert in card.alerts)


PANEL_CACHE_S = 60.0  # the main page reloads every 15 s; the scorecard took ~1 s at 3,000 studies
_panel_cache: dict[int, tuple[float, list[scorecard.Scorecard]]] = {}


def panel(dashboard: Dashboard, session: Session) -> Markup:
    import time

    cached = _panel_cache.get(id(dashboard))
    if cached is not None and time.monotonic() - cached[0] < PANEL_CACHE_S:
        cards = cached[1]
    else:
        try:
            cards = scorecard.build(dashboard.sessions, dashboard.settings, intervals=False)
        except SQLAlchemyError:
            return Markup("")
        _panel_cache[id(dashboard)] = (time.monotonic(), cards)
    scored = sum(card.overall.n for card in cards)
    return alert_banners(cards) + Markup(
        '<p class="note" id="scorecard-panel">Scorecard: {} labelled studies scored across {} '
        'version(s) and site(s): <a href="/scorecard">scorecard</a> · <a href="/labels">label '
        'studies</a></p>').format(scored, len(cards))


def routes(dashboard: Dashboard) -> list[BaseRoute]:
    _panel_cache.pop(id(dashboard), None)  # a new app: nothing cached for it (ids are reused)
    templates = dashboard.templates

    def labels_page(request: Request) -> Response:
        try:
            with dashboard.sessions() as session:
                studies = recent_findings(session)
        except SQLAlchemyError as error:
            return PlainTextResponse(f"database unreachable ({type(error).__name__})", status_code=503)
        return templates.TemplateResponse(request, "labels.html", {
            "settings": dashboard.settings, "studies": studies, "signed_in": dashboard.signed_in(request),
            "message": request.query_params.get("msg", ""), "max_reader": MAX_READER})

    def back(message: str) -> RedirectResponse:
        return RedirectResponse(f"/labels?msg={quote(message)}", status_code=303)

    async def label_study(request: Request) -> Response:
        if not same_origin(request):
            return PlainTextResponse("Refused: the form came from another site", status_code=403)
        if (refused := dashboard.refusal(request)) is not None:
            return refused
        form = await request.form()
        verdict, reader = str(form.get("verdict", "")), str(form.get("reader", "")).strip()
        if verdict not in ("agree", "disagree"):
            return PlainTextResponse("verdict must be agree or disagree", status_code=400)
        if not reader or len(reader) > MAX_READER:
            return back(f"Not recorded: give your name or initials (at most {MAX_READER} characters)")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(record, request, int(request.path_params["study_id"]), verdict,
                                       operator_name(request, reader))

    def record(request: Request, study_id: int, verdict: str, who: str) -> Response:
        with dashboard.sessions() as session, session.begin():
            found = recent_findings(session, study_id=study_id) if study_id <= MAX_ROW_ID else []
            if not found:
                return PlainTextResponse(f"study {study_id} has no result to agree with", status_code=404)
            finding = found[0]
            label = finding.finding if verdict == "agree" else (
                NEGATIVE_CLASS if finding.finding == POSITIVE_CLASS else POSITIVE_CLASS)
            try:
                row = record_label(session, label=label, source=LabelSource.DASHBOARD, who=who,
                                   evidence=f"dashboard: {verdict}d with {finding.model} finding "
                                            f"{finding.finding} (p {finding.score:.3f}) on study {study_id}",
                                   study_instance_uid=finding.study_instance_uid)
            except LabelError as error:
                return back(f"Not recorded: {error}")
        return back(f"Study {study_id}: label {row.id} recorded ({label}, you {verdict}d)")

    def scorecard_page(request: Request) -> Response:
        try:
            cards = scorecard.build(dashboard.sessions, dashboard.settings)
        except SQLAlchemyError as error:
            return PlainTextResponse(f"database unreachable ({type(error).__name__})", status_code=503)
        return templates.TemplateResponse(request, "scorecard.html", {
            "settings": dashboard.settings, "alerts": alert_banners(cards),
            "entries": [(card, scorecard_plots.plots(card)) for card in cards], "rule": scorecard.STUDY_RULE})

    def scorecard_metrics(_request: Request) -> Response:
        try:
            body = metrics_body(scorecard.build(dashboard.sessions, dashboard.settings, intervals=False))
        except SQLAlchemyError as error:
            return PlainTextResponse(f"# database unreachable ({type(error).__name__})\n", status_code=503)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    dashboard.links.extend([("/scorecard", "scorecard"), ("/labels", "label studies")])
    return [Route("/labels", labels_page),
            Route("/studies/{study_id:int}/label", label_study, methods=["POST"]),
            Route("/scorecard", scorecard_page), Route("/metrics/scorecard", scorecard_metrics)]
