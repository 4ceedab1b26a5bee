"""The dashboard's operator access (issue 23): ids past any row, sessions that sign-out ends,
the throttle's key behind a proxy or alone, TLS and the Secure cookie."""

from __future__ import annotations

import ssl
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


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (its own CA) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pneumo dashboard test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "dashboard.pem", folder / "dashboard.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture
def served(tmp_path: Path):
    """`pneumo dashboard` as deployed (uvicorn, HTTPS), on 127.0.0.1, over a migrated SQLite."""
    import os
    import subprocess
    import sys

    from core.migrate import upgrade
    from tests.helpers import free_port, wait_for

    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    cert, key = _self_signed(tmp_path)
    port = free_port()
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_DATABASE_URL": url,
           "PNEUMO_BROKER_URL": f"{REDIS_TEST_URL}/9", "PNEUMO_MODELS_DIR": str(tmp_path / "models"),
           "PNEUMO_DASHBOARD_HOST": "127.0.0.1", "PNEUMO_DASHBOARD_PORT": str(port),
           "PNEUMO_DASHBOARD_TOKEN": TOKEN, "PNEUMO_DASHBOARD_TLS_CERT_FILE": str(cert),
           "PNEUMO_DASHBOARD_TLS_KEY_FILE": str(key)}
    env.pop("PNEUMO_SETTINGS_FILE", None)
    env.pop("PNEUMO_DASHBOARD_TRUSTED_PROXIES", None)
    from tests.conftest import REPO

    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "dashboard"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise RuntimeError(process.stdout.read().decode(errors="replace"))
        try:
            httpx.get(f"{base}/healthz", verify=ssl.create_default_context(cafile=cert), timeout=2)
        except httpx.HTTPError:
            return False
        return True

    import httpx

    try:
        wait_for(answers, 60, "the dashboard to answer over HTTPS")
        yield {"base": base, "cert": str(cert)}
    finally:
        process.terminate()
        process.wait(timeout=20)


def _client(served: dict, source: str):
    import httpx

    transport = httpx.HTTPTransport(verify=ssl.create_default_context(cafile=served["cert"]),
                                    local_address=source)
    return httpx.Client(base_url=served["base"], transport=transport, follow_redirects=False)


def test_a_forged_forwarded_header_neither_escapes_the_throttle_nor_locks_out_the_operator(served) -> None:
    """Row 8 as the probe ran it: uvicorn believed X-Forwarded-For from 127.0.0.1, so each try
    with a new header was a new client, and tries naming the operator's address locked it out."""
    operator_address = "127.0.0.2"  # loopback too, so the test needs no second interface
    with _client(served, "127.0.0.1") as attacker, _client(served, operator_address) as operator:
        statuses = [attacker.post("/login", data={"token": f"guess{n}"},
                                  headers={"X-Forwarded-For": operator_address}).status_code
                    for n in range(5)]
        assert statuses == [303] * 5
        assert attacker.post("/login", data={"token": "guess"},
                             headers={"X-Forwarded-For": "10.9.8.7"}).status_code == 429
        assert attacker.post("/login", data={"token": TOKEN},
                             headers={"X-Forwarded-For": "10.9.8.8"}).status_code == 429
        signed_in = operator.post("/login", data={"token": TOKEN})
        assert signed_in.status_code == 303 and "Signed%20in" in signed_in.headers["location"]
        cookie = signed_in.headers["set-cookie"].lower()
        assert "secure" in cookie and "httponly" in cookie  # HTTPS: a Secure cookie


def test_a_signed_out_cookie_is_refused(served) -> None:
    """Row 9: the cookie of a session that signed out was accepted until its Max-Age (8 h)."""
    with _client(served, "127.0.0.1") as browser, _client(served, "127.0.0.1") as thief:
        browser.post("/login", data={"token": TOKEN})
        copied = browser.cookies["pneumo_session"]
        thief.cookies.set("pneumo_session", copied)
        resend = "/deliveries/1/resend"  # no such delivery: 303 back to the page once authorised
        assert thief.post(resend).status_code == 303
        browser.post("/logout")
        assert thief.post(resend).status_code == 401
        assert browser.post(resend).status_code == 401


def test_behind_a_trusted_proxy_the_forwarded_client_is_counted(tmp_path: Path, database_url: str) -> None:
    """The proxy appends the address it saw; what a client wrote before it is not believed."""
    app = create_app(_settings(tmp_path, database_url, dashboard_trusted_proxies="10.0.0.0/8"))
    via_proxy = TestClient(app, client=("10.0.0.1", 40000), follow_redirects=False)
    attacker = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}  # forged first, the real one appended
    assert [via_proxy.post("/login", data={"token": f"guess{n}"}, headers=attacker).status_code
            for n in range(5)] == [303] * 5
    assert via_proxy.post("/login", data={"token": TOKEN}, headers=attacker).status_code == 429
    operator = via_proxy.post("/login", data={"token": TOKEN}, headers={"X-Forwarded-For": "198.51.100.7"})
    assert operator.status_code == 303 and "Signed%20in" in operator.headers["location"]

    direct = TestClient(app, client=("192.0.2.1", 40000), follow_redirects=False)  # not a proxy
    for n in range(5):
        direct.post("/login", data={"token": f"guess{n}"}, headers={"X-Forwarded-For": f"192.0.2.{n + 2}"})
    forged = {"X-Forwarded-For": "192.0.2.99"}
    assert direct.post("/login", data={"token": TOKEN}, headers=forged).status_code == 429


def test_ipv6_clients_are_counted_by_their_64(tmp_path: Path) -> None:
    from ops.dashboard import throttle_key

    assert throttle_key("2001:db8:1:2::1") == throttle_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert throttle_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert throttle_key("192.0.2.1") == "192.0.2.1"


def test_a_flood_of_addresses_does_not_reset_a_throttled_one() -> None:
    from ops.dashboard import LoginThrottle

    throttle = LoginThrottle()
    for _ in range(throttle.attempts):
        throttle.failed("198.51.100.7")
    for n in range(LoginThrottle.MAX_CLIENTS + 50):  # one wrong try from each of many addresses
        throttle.failed(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert throttle.retry_after("198.51.100.7") > 0
    assert len(throttle._failures) <= LoginThrottle.MAX_CLIENTS


def test_no_token_no_listening_beyond_loopback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Row 9 / issue 22: the dashboard on 0.0.0.0 with an empty token served anyone's re-sends
    as 'disabled' but its pages to the whole network; now it refuses to start."""
    import uvicorn

    from ops.dashboard import CannotListen, serve
    from tests.helpers import free_port

    monkeypatch.setattr(uvicorn.Server, "run", lambda *_a, **_k: pytest.fail("served without a token"))
    settings = Settings(home=tmp_path / "home", dashboard_host="0.0.0.0", dashboard_port=free_port(),
                        dashboard_token="", database_url=f"sqlite:///{tmp_path / 'p.db'}")
    with pytest.raises(CannotListen, match="PNEUMO_DASHBOARD_TOKEN"):
        serve(settings)


def test_half_a_tls_setting_stops_the_start_with_both_names(tmp_path: Path) -> None:
    from core import tls

    cert, _key = _self_signed(tmp_path)
    both = "PNEUMO_DASHBOARD_TLS_CERT_FILE and PNEUMO_DASHBOARD_TLS_KEY_FILE"
    with pytest.raises(tls.TLSConfigError, match=both):
        tls.check(Settings(dashboard_tls_cert_file=cert))


def test_trusted_proxies_must_be_addresses() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not an IP address or network"):
        Settings(dashboard_trusted_proxies="10.0.0.0/8, proxy.example")
