"""The dashboard against a hostile client (issue 16, attack probe): guessing the operator token,
reading it from the cookie, framing the page."""

from __future__ import annotations

from pathlib import Path

from pydantic import SecretStr
from starlette.testclient import TestClient

from core.db import Delivery, DeliveryState
from ops.dashboard import create_app
from tests.ops.test_dashboard import TOKEN, _populate, _settings, broker, served_registry  # noqa: F401


def test_wrong_tokens_are_throttled_per_client(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path  # noqa: F811
) -> None:
    ids = _populate(sessions, tmp_path, [])
    client = TestClient(create_app(_settings(tmp_path, database_url, served_registry)))
    for attempt in range(5):
        assert "Sign-in refused" in client.post("/login", data={"token": f"guess{attempt}"},
                                                follow_redirects=True).text
    throttled = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert throttled.status_code == 429  # even the right token, until the window passes
    assert 0 < int(throttled.headers["Retry-After"]) <= 300
    resend = f"/deliveries/{ids['dead']}/resend"
    assert client.post(resend, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 429
    with sessions() as session:
        assert session.get(Delivery, ids["dead"]).state == DeliveryState.DEAD

    other = TestClient(create_app(_settings(tmp_path, database_url, served_registry)))
    other.post("/login", data={"token": TOKEN})
    assert other.post(resend, follow_redirects=False).status_code == 303  # a fresh app: not throttled


def test_bearer_guesses_count_too(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path  # noqa: F811
) -> None:
    ids = _populate(sessions, tmp_path, [])
    client = TestClient(create_app(_settings(tmp_path, database_url, served_registry)))
    resend = f"/deliveries/{ids['dead']}/resend"
    statuses = [client.post(resend, headers={"Authorization": f"Bearer guess{n}"}).status_code
                for n in range(6)]
    assert statuses == [401] * 5 + [429]


def test_the_cookie_holds_a_signed_session_not_the_token(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path  # noqa: F811
) -> None:
    ids = _populate(sessions, tmp_path, [])
    settings = _settings(tmp_path, database_url, served_registry)
    client = TestClient(create_app(settings))
    signed_in = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    cookie = signed_in.headers["set-cookie"]
    assert TOKEN not in cookie and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert all(TOKEN not in value for value in client.cookies.values())
    resend = f"/deliveries/{ids['dead']}/resend"
    assert client.post(resend, follow_redirects=False).status_code == 303

    forged = TestClient(create_app(settings))
    forged.cookies.set("pneumo_session", client.cookies["pneumo_session"][:-4] + "AAAA")
    assert forged.post(resend).status_code == 401

    rotated_settings = settings.model_copy(update={"dashboard_token": SecretStr("a-new-token")})
    rotated = TestClient(create_app(rotated_settings))
    rotated.cookies.set("pneumo_session", client.cookies["pneumo_session"])
    assert rotated.post(resend).status_code == 401  # a new token signs everyone out

    client.post("/logout")
    assert client.post(resend).status_code == 401


def test_every_response_has_the_security_headers(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path  # noqa: F811
) -> None:
    client = TestClient(create_app(_settings(tmp_path, database_url, served_registry)))
    for response in (client.get("/"), client.get("/healthz"), client.get("/metrics"),
                     client.post("/login", data={"token": "x"}, follow_redirects=False)):
        headers = response.headers
        assert headers.get("X-Frame-Options") == "DENY", response.url
        assert headers.get("X-Content-Type-Options") == "nosniff"
        assert headers.get("Referrer-Policy") == "no-referrer"
        csp = headers.get("Content-Security-Policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
        assert "script-src" not in csp and "form-action 'self'" in csp
