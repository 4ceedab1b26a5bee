"""The dashboard's charts over time: a panel on the main page (per hour, last 24 h) and
`/trends?window=30d` (per day, last 30 days). Data from ops.trends, drawn by ops.charts."""

from __future__ import annotations

from datetime import datetime

from markupsafe import Markup
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from core.db import utcnow
from ops import trends
from ops.charts import svg_chart
from ops.web import Dashboard


def charts(session: Session, window: trends.Window, now: datetime | None = None) -> list[Markup]:
    """Throughput, C-STORE-to-SR latency, images not classified, positive rate: four reads of
    at most one row per bucket and series, each chart with its own empty state."""
    now = now or utcnow()
    labels = window.labels(window.keys(now))
    per = window.unit
    axis = window.x_label
    done = trends.throughput(session, window, now)
    late = trends.latency(session, window, now)
    refused = trends.refusals(session, window, now)
    rates, results = trends.positive_rate(session, window, now)
    return [
        svg_chart(f"Throughput per {per}", labels, done, y_label="count",
                  empty=not any(any(v) for v in done.values()),
                  empty_text=f"no image classified and no SR delivered in {window.span}", x_label=axis),
        svg_chart("First image received (C-STORE) to SR delivered", labels, late, y_label="seconds",
                  empty_text=f"no SR delivered in {window.span}", x_label=axis),
        svg_chart(f"Refused or not classified, per {per}", labels, refused, y_label="images / C-STOREs",
                  kind="bar", empty=not any(any(v) for v in refused.values()),
                  empty_text=f"nothing refused, out of scope or failed in {window.span}", x_label=axis),
        svg_chart(f"Positive rate per {per} ({results} results)", labels, rates, y_label="positive",
                  percent=True, empty_text=f"no image classified in {window.span}", x_label=axis),
    ]


def section(session: Session, window: trends.Window, other: trends.Window) -> Markup:
    """The charts in a grid, with a link to the other window."""
    figures = "".join(f'<div class="chart-cell">{chart}</div>' for chart in charts(session, window))
    return Markup(
        f'<h2 id="trends">Over time: per {window.unit}, {window.span} (UTC)</h2>'
        f'<div class="charts">{figures}</div>'
        f'<p class="note"><a href="/trends?window={other.key}">per {other.unit}, {other.span}</a></p>')


def panel(dashboard: Dashboard, session: Session) -> Markup:
    return section(session, trends.HOURLY, trends.DAILY)


def routes(dashboard: Dashboard) -> list[BaseRoute]:
    def page(request: Request) -> Response:
        window = trends.WINDOWS.get(request.query_params.get("window", trends.DAILY.key))
        if window is None:
            return PlainTextResponse(f"window must be one of {', '.join(trends.WINDOWS)}", status_code=400)
        other = trends.HOURLY if window is trends.DAILY else trends.DAILY
        try:
            with dashboard.sessions() as session:
                body = section(session, window, other)
        except SQLAlchemyError as error:
            body = Markup('<div class="banner bad">Database unreachable ({}): no charts.</div>').format(
                type(error).__name__)
        return dashboard.templates.TemplateResponse(request, "trends.html", {
            "settings": dashboard.settings, "body": body})

    dashboard.links.append(("/trends?window=30d", "over time (30 days)"))
    return [Route("/trends", page)]
