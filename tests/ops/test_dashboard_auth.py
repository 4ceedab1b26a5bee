"""The dashboard's operator access (issue 23): ids past any row, sessions that sign-out ends,
the throttle's key behind a proxy or alone, TLS and the Secure cookie."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient

from core.settings import Settings
from ops.dashboard import create_app
from tests.conftest import REDIS_TEST_URL

TOKEN = "operator-secret-23"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def _settings(tmp_path: Path, database_url: str, **extra) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, broker_url=f"{REDIS_TEST_URL}/9",
                    models_dir=tmp_path / "models", dashboard_token=TOKEN, **extra)


@pytest.mark.parametrize("path", ["/deliveries/99999999999999999999999/resend",
                                  "/instances/99999999999999999999999/rerun"])
def test_an_id_past_any_row_is_not_found(tmp_path: Path, database_url: str, path: str) -> None:
    client = TestClient(create_app(_settings(tmp_path, database_url)), raise_server_exceptions=False)
    response = client.post(path, headers=BEARER)
    assert response.status_code == 404
    assert "not found" in response.text
