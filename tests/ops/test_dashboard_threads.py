"""The dashboard's database reads run in Starlette's thread pool: while one request waits on a
slow query, the event loop still answers others.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import httpx
import pytest

from core.settings import Settings
from ops import dashboard, monitoring, status

TOKEN = "operator-secret-threads"


@pytest.mark.parametrize("method,path,answer", [
    ("GET", "/", 200), ("GET", "/metrics", 200), ("GET", "/healthz", 503),  # the database is "down"
    ("POST", "/deliveries/1/resend", 303), ("POST", "/instances/1/rerun", 303),
])
def test_a_slow_database_read_does_not_stall_other_requests(
    method: str, path: str, answer: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, released, finished = threading.Event(), threading.Event(), threading.Event()

    def slow(result):
        def read(*_args, **_kwargs):
            entered.set()
            released.wait(2)
            finished.set()
            return result
        return read

    monkeypatch.setattr(monitoring, "snapshot", slow(monitoring.Snapshot(database_ok=False)))
    monkeypatch.setattr(status, "resend_delivery", slow(True))
    monkeypatch.setattr(status, "rerun_instance", slow(True))
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'none.db'}",
                        broker_url="redis://127.0.0.1:1/0", models_dir=tmp_path / "models",
                        dashboard_token=TOKEN)
    app = dashboard.create_app(settings)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as client:
            request = asyncio.create_task(client.request(
                method, path, headers={"Authorization": f"Bearer {TOKEN}"}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            other = await client.post("/logout")
            assert other.status_code == 303
            assert not finished.is_set(), "the other request waited for the slow read"
            released.set()
            assert (await request).status_code == answer

    asyncio.run(scenario())
