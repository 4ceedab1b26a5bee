"""The dashboard's shadow panel: each candidate's agreement with the served version (% agree,
Cohen's kappa, on the images both classified), its labelled-study check, and which served versions
are silent; `/shadow.json` gives the same figures to a script. Figures from ops.shadow."""

from __future__ import annotations

from markupsafe import Markup
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from core import registry
from ops import shadow
from ops.web import Dashboard


def figures(dashboard: Dashboard, session: Session) -> dict:
    """Candidates (agreement and labelled check) and silent versions of the dashboard's registry."""
    models_dir = dashboard.settings.models_dir
    rows = []
    for agreement in shadow.shadow_report(session, models_dir):
        served = registry.resolve(agreement.model_name, models_dir)
        candidate = registry.resolve(f"{agreement.model_name}@{agreement.candidate_version}", models_dir)
        rows.append({**agreement.dump(),
                     "labelled": shadow.promotion_check(session, served, candidate).dump()})
    return {"candidates": rows, "silent": registry.silent_versions(models_dir)}


def _cell(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def panel(dashboard: Dashboard, session: Session) -> Markup:
    """A table per candidate; a line per silent version; one line when there is neither."""
    try:
        data = figures(dashboard, session)
    except registry.RegistryError as error:
        return Markup('<h2 id="shadow">Shadow and silent versions</h2><p class="note">{}</p>').format(
            str(error))
    parts = [Markup('<h2 id="shadow">Shadow and silent versions</h2>')]
    for name, version in sorted(data["silent"].items()):
        parts.append(Markup('<p class="note">{}@{} is served <strong>silent</strong>: results '
                            'recorded, nothing sent to the PACS until accepted.</p>').format(name, version))
    if not data["candidates"]:
        parts.append(Markup('<p class="note">No candidate runs in shadow.</p>'))
        return Markup("").join(parts)
    parts.append(Markup(
        '<table><thead><tr><th>candidate</th><th>served</th><th>images both classified</th>'
        '<th>% agree</th><th>Cohen\'s kappa</th><th>served only</th><th>labelled studies</th>'
        '<th>sensitivity served / candidate</th><th>specificity served / candidate</th>'
        '<th>check</th></tr></thead><tbody>'))
    for row in data["candidates"]:
        check = row["labelled"]
        parts.append(Markup(
            "<tr><td>{}@{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
            "<td>{} / {}</td><td>{} / {}</td><td>{}</td></tr>").format(
            row["model_name"], row["candidate_version"], row["served_version"], row["images"],
            _cell(row["percent_agree"], "{:.1f}%"), _cell(row["kappa"], "{:.3f}"), row["served_only"],
            check["studies"], _cell(check["served_sensitivity"], "{:.1%}"),
            _cell(check["candidate_sensitivity"], "{:.1%}"), _cell(check["served_specificity"], "{:.1%}"),
            _cell(check["candidate_specificity"], "{:.1%}"), check["reason"]))
    parts.append(Markup("</tbody></table>"))
    return Markup("").join(parts)


def routes(dashboard: Dashboard) -> list[BaseRoute]:
    def as_json(_request: Request) -> Response:
        try:
            with dashboard.sessions() as session:
                return JSONResponse(figures(dashboard, session))
        except (SQLAlchemyError, registry.RegistryError) as error:
            return JSONResponse({"error": type(error).__name__}, status_code=503)

    dashboard.links.append(("/shadow.json", "shadow agreement (JSON)"))
    return [Route("/shadow.json", as_json)]
