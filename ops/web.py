"""What the dashboard's page modules share: the templates and a `Dashboard` handle (settings,
database, operator checks). A page module (ops.trend_pages, a scorecard) defines
`routes(dashboard) -> list[Route]` and, to show a panel on the main page,
`panel(dashboard, session) -> Markup`; ops.dashboard.PAGE_MODULES lists them, one line each,
so a page is added without touching the main page's code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker
from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from core.settings import Settings

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))


@dataclass
class Dashboard:
    """Handed to each page module once, when the app is made."""

    settings: Settings
    sessions: sessionmaker[Session]
    templates: Jinja2Templates
    token_configured: bool
    signed_in: Callable[[Request], bool]
    # None when the request may change state (signed in, or the token as a Bearer header); else
    # the response to send (401, a redirect with the reason, or 429 when throttled).
    refusal: Callable[[Request], Response | None]
    links: list[tuple[str, str]] = field(default_factory=list)  # (path, text) in the page footer
