"""DICOM over TLS: the node, SR delivery and `pneumo send`, against pynetdicom and dcmtk peers.

Certificates are made here, per test session, by a throwaway CA (and a second, untrusted one);
no key is ever committed.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from core import tls
from core.db import Instance, InstanceState
from core.settings import PeerAddress, Settings
from dicom_node import scp
from dicom_node.receive import SUCCESS
from ops.send import wrap_image
from tests.conftest import DATA
from tests.helpers import dcmtk, free_port, wait_for
from tests.pipeline.conftest import REPO
from worker.delivery import DeliveryError, send_sr
from worker.report import ImageFinding, build_sr

IMAGE = sorted((DATA / "test" / "NORMAL").iterdir())[0]


# --- a throwaway PKI ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA we trust
    server: Identity  # 127.0.0.1 / localhost, signed by `ca`
    client: Identity  # signed by `ca`
    rogue_server: Identity  # 127.0.0.1, signed by an untrusted CA
    rogue_client: Identity  # signed by an untrusted CA


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(_name(issuer))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                          key_agreement=False, encipher_only=False, decipher_only=False),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"),
        ]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, certificate, key=None) -> Identity:
    cert_path = folder / f"{stem}.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{stem}.key"
    if key is not None:
        key_path.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        key_path.chmod(0o600)
    return Identity(cert_path, key_path)


def _new_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    made = {}
    for ca_name in ("ca", "rogue-ca"):
        ca_key = _new_key()
        ca_cert = _certificate(f"Pneumo test {ca_name}", ca_key, f"Pneumo test {ca_name}", ca_key, ca=True)
        made[ca_name] = _write(folder, ca_name, ca_cert)
        prefix = "" if ca_name == "ca" else "rogue-"
        for role in ("server", "client"):
            key = _new_key()
            cert = _certificate(f"{prefix}{role}", key, f"Pneumo test {ca_name}", ca_key, ca=False,
                                server=role == "server")
            made[f"{prefix}{role}"] = _write(folder, f"{prefix}{role}", cert, key)
    return Pki(made["ca"].cert, made["server"], made["client"], made["rogue-server"],
               made["rogue-client"])


# --- the node -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_sessions(tmp_path_factory: pytest.TempPathFactory):
    """One migrated SQLite database for the module: TLS does not depend on the back-end."""
    from core.db import session_factory
    from core.migrate import upgrade

    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'pneumo.db'}"
    upgrade(url)
    factory = session_factory(url)
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def start_node(tmp_path: Path, sqlite_sessions, pki: Pki):
    """Starts a TLS node (mutual TLS on request); returns its settings and the queued ids."""
    servers = []

    def start(require_client_cert: bool = False, network_timeout_s: float = 10) -> tuple[Settings, list[int]]:
        queued: list[int] = []
        settings = Settings(
            home=tmp_path / f"home{len(servers)}", port=free_port(), host="127.0.0.1",
            allowed_peers="SENDER,STORESCU,ECHOSCU,PNEUMO-SEND", tls_cert_file=pki.server.cert,
            tls_key_file=pki.server.key, tls_ca_file=pki.ca, tls_require_client_cert=require_client_cert,
            network_timeout_s=network_timeout_s,
        )
        servers.append(scp.start(settings, sqlite_sessions, queued.append))
        return settings, queued

    yield start
    for server in servers:
        server.shutdown()


def client(ca: Path | None, identity: Identity | None = None) -> ssl.SSLContext:
    return tls.client_context(ca, identity.cert if identity else None, identity.key if identity else None)


def associate(settings: Settings, context: ssl.SSLContext | None, calling: str = "SENDER",
              dataset=None):
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(Verification)
    if dataset is not None:
        ae.add_requested_context(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID])
    tls_args = None if context is None else (context, "127.0.0.1")
    return ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title, tls_args=tls_args)


def test_tls_node_answers_echo_and_stores_from_pynetdicom(start_node, pki: Pki, sqlite_sessions) -> None:
    settings, queued = start_node()
    dataset = wrap_image(IMAGE)
    assoc = associate(settings, client(pki.ca), dataset=dataset)
    assert assoc.is_established
    assert isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    assert assoc.dul.socket.socket.version() in ("TLSv1.2", "TLSv1.3")
    assert assoc.send_c_echo().Status == SUCCESS
    assert assoc.send_c_store(dataset).Status == SUCCESS
    assoc.release()
    with sqlite_sessions() as session:
        instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == dataset.SOPInstanceUID))
    assert instance.state == InstanceState.QUEUED and queued == [instance.id]
    assert dcmread(instance.path).PixelData == dataset.PixelData


def test_plain_tcp_to_the_tls_port_fails(start_node) -> None:
    settings, _ = start_node()
    assoc = associate(settings, None)
    assert not assoc.is_established
    echo = subprocess.run([dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", settings.ae_title, "-to", "5",
                           "127.0.0.1", str(settings.port)], capture_output=True, timeout=30)
    assert echo.returncode != 0


def test_an_idle_connection_does_not_stall_other_associations(start_node, pki: Pki) -> None:
    """The handshake runs in the association's thread, not the one accepting connections."""
    settings, _ = start_node()
    with socket.create_connection(("127.0.0.1", settings.port)):  # connects, never says anything
        time.sleep(0.2)
        started = time.monotonic()
        assoc = associate(settings, client(pki.ca))
        assert assoc.is_established
        assoc.release()
        assert time.monotonic() - started < 5


def test_a_handshake_that_stops_halfway_is_dropped_after_the_network_timeout(start_node) -> None:
    settings, _ = start_node(network_timeout_s=2)
    with socket.create_connection(("127.0.0.1", settings.port)) as raw:
        raw.sendall(b"\x16\x03\x01\x02\x00")  # a TLS record header announcing 512 bytes, then nothing
        raw.settimeout(20)
        started = time.monotonic()
        try:
            closed = raw.recv(1024) == b""
        except ConnectionResetError:
            closed = True
        assert closed and time.monotonic() - started < 10


def test_unknown_calling_ae_over_tls_is_rejected(start_node, pki: Pki) -> None:
    settings, _ = start_node()
    assert associate(settings, client(pki.ca), calling="STRANGER").is_rejected


def test_client_that_does_not_trust_the_node_refuses_it(start_node, pki: Pki) -> None:
    settings, _ = start_node()
    rogue = tls.client_context(pki.rogue_server.cert.parent / "rogue-ca.pem")
    assert not associate(settings, rogue).is_established


@pytest.mark.parametrize("identity", [None, "rogue_client"])
def test_mutual_tls_refuses_clients_without_a_trusted_certificate(
    start_node, pki: Pki, identity: str | None
) -> None:
    settings, _ = start_node(require_client_cert=True)
    context = client(pki.ca, getattr(pki, identity) if identity else None)
    assoc = associate(settings, context)
    assert not assoc.is_established


def test_mutual_tls_accepts_a_trusted_client_certificate(start_node, pki: Pki) -> None:
    settings, _ = start_node(require_client_cert=True)
    assoc = associate(settings, client(pki.ca, pki.client))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == SUCCESS
    assoc.release()


@pytest.mark.parametrize("identity", [None, "rogue_client", "client"])
def test_without_mutual_tls_any_client_certificate_is_accepted(
    start_node, pki: Pki, identity: str | None
) -> None:
    """The node does not ask for one, so an untrusted one is never even sent."""
    settings, _ = start_node()
    assoc = associate(settings, client(pki.ca, getattr(pki, identity) if identity else None))
    assert assoc.is_established
    assoc.release()


def test_tls_1_2_is_the_floor_both_ways(pki: Pki) -> None:
    """Asserted on the contexts: OpenSSL 3's own default already refuses older versions, so a
    handshake could not tell whether our floor is there."""
    settings = Settings(tls_cert_file=pki.server.cert, tls_key_file=pki.server.key, tls_ca_file=pki.ca,
                        pacs_tls=True)
    assert tls.server_context(settings).minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.pacs_context(settings).minimum_version == ssl.TLSVersion.TLSv1_2
    assert client(pki.ca).minimum_version == ssl.TLSVersion.TLSv1_2


def _dcmtk_tls(pki: Pki, identity: Identity | None) -> list[str]:
    own = ["+tls", str(identity.key), str(identity.cert)] if identity else ["+tla"]
    return [*own, "+cf", str(pki.ca), "-rc"]


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_dcmtk_storescu_over_tls_is_stored(
    start_node, pki: Pki, sqlite_sessions, tmp_path: Path, mutual: bool
) -> None:
    settings, queued = start_node(require_client_cert=mutual)
    dataset = wrap_image(IMAGE)
    path = tmp_path / "image.dcm"
    dataset.save_as(path, enforce_file_format=True)
    result = subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", settings.ae_title, "-to", "10",
         *_dcmtk_tls(pki, pki.client if mutual else None), "127.0.0.1", str(settings.port), str(path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with sqlite_sessions() as session:
        stored = session.scalar(select(Instance).where(Instance.sop_instance_uid == dataset.SOPInstanceUID))
    assert stored is not None and queued == [stored.id]


def test_dcmtk_without_a_client_certificate_is_refused_by_mutual_tls(start_node, pki: Pki) -> None:
    settings, _ = start_node(require_client_cert=True)
    result = subprocess.run(
        [dcmtk("echoscu"), "-aet", "ECHOSCU", "-aec", settings.ae_title, "-to", "10", *_dcmtk_tls(pki, None),
         "127.0.0.1", str(settings.port)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0


def test_pneumo_send_over_tls(start_node, pki: Pki) -> None:
    settings, queued = start_node(require_client_cert=True)
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "send", str(IMAGE), "--to", f"PNEUMO@127.0.0.1:{settings.port}",
         "--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "sent 1/1" in result.stdout and len(queued) == 1
    untrusted = subprocess.run(
        [sys.executable, "-m", "ops.cli", "send", str(IMAGE), "--to", f"PNEUMO@127.0.0.1:{settings.port}",
         "--tls-ca", str(pki.rogue_server.cert.parent / "rogue-ca.pem")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert untrusted.returncode == 2
    assert "certificate is not trusted" in untrusted.stderr


# --- SR delivery to a TLS PACS ------------------------------------------------------------------


@pytest.fixture
def sr_file(tmp_path: Path) -> Path:
    report = build_sr([ImageFinding(wrap_image(IMAGE), 0.9, True)], "pneumonia-test", "tls-1", 0.5)
    path = tmp_path / "report.dcm"
    report.save_as(path, enforce_file_format=True)
    return path


def start_tls_storescp(folder: Path, port: int, identity: Identity, verify_client_with: Path | None):
    verification = ["+cf", str(verify_client_with), "-rc"] if verify_client_with else ["-ic"]
    return subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(folder), "+tls", str(identity.key), str(identity.cert),
         *verification, str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def tls_pacs(tmp_path: Path):
    """Starts dcmtk storescp with TLS; returns its address and folder."""
    processes = []

    def start(identity: Identity, verify_client_with: Path | None = None) -> tuple[PeerAddress, Path]:
        folder = tmp_path / f"pacs{len(processes)}"
        folder.mkdir()
        port = free_port()
        processes.append(start_tls_storescp(folder, port, identity, verify_client_with))

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 10, "storescp to listen", interval_s=0.1)
        return PeerAddress(f"PACS@127.0.0.1:{port}"), folder

    yield start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def pacs_settings(pki: Pki, identity: Identity | None = None) -> Settings:
    return Settings(pacs_tls=True, tls_ca_file=pki.ca, tls_cert_file=identity and identity.cert,
                    tls_key_file=identity and identity.key)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_sr_is_delivered_to_a_tls_pacs(tls_pacs, pki: Pki, sr_file: Path, mutual: bool) -> None:
    destination, folder = tls_pacs(pki.server, verify_client_with=pki.ca if mutual else None)
    context = tls.pacs_context(pacs_settings(pki, pki.client if mutual else None))
    send_sr(sr_file, destination, "PNEUMO", 10, context)
    received = list(folder.glob("SR*"))
    assert len(received) == 1
    assert dcmread(received[0]).SOPInstanceUID == dcmread(sr_file).SOPInstanceUID


def test_delivery_to_an_untrusted_pacs_fails_clearly(tls_pacs, pki: Pki, sr_file: Path) -> None:
    destination, folder = tls_pacs(pki.rogue_server)
    expected = r"TLS with PACS@127\.0\.0\.1:\d+ failed: the peer's certificate is not trusted"
    with pytest.raises(DeliveryError, match=expected):
        send_sr(sr_file, destination, "PNEUMO", 10, tls.pacs_context(pacs_settings(pki)))
    assert not any(folder.iterdir())


def test_delivery_over_plain_tcp_to_a_tls_pacs_fails(tls_pacs, pki: Pki, sr_file: Path) -> None:
    destination, folder = tls_pacs(pki.server)
    with pytest.raises(DeliveryError):
        send_sr(sr_file, destination, "PNEUMO", 5, tls.pacs_context(Settings(pacs_tls=False)))
    assert not any(folder.iterdir())


# --- configuration errors at startup ------------------------------------------------------------


def test_missing_key_file_names_the_setting(tmp_path: Path, pki: Pki) -> None:
    settings = Settings(tls_cert_file=pki.server.cert, tls_key_file=tmp_path / "absent.key")
    with pytest.raises(tls.TLSConfigError, match=r"PNEUMO_TLS_KEY_FILE: cannot read .*absent\.key"):
        scp.start(settings, None, lambda _id: None)


def test_unreadable_ca_file_names_the_setting(tmp_path: Path, pki: Pki) -> None:
    """A folder where the file should be: unreadable even as root (mode 000 would not be)."""
    settings = Settings(tls_cert_file=pki.server.cert, tls_key_file=pki.server.key, tls_ca_file=tmp_path,
                        tls_require_client_cert=True)
    with pytest.raises(tls.TLSConfigError, match=r"PNEUMO_TLS_CA_FILE: cannot read .*: Is a directory"):
        tls.server_context(settings)


def test_mismatched_key_is_reported_without_its_contents(pki: Pki) -> None:
    settings = Settings(tls_cert_file=pki.server.cert, tls_key_file=pki.client.key)
    with pytest.raises(tls.TLSConfigError) as raised:
        tls.server_context(settings)
    message = str(raised.value)
    assert "PNEUMO_TLS_CERT_FILE/PNEUMO_TLS_KEY_FILE" in message
    assert "PRIVATE KEY" not in message and pki.client.key.read_text().splitlines()[1] not in message


def test_encrypted_key_is_refused_without_a_prompt(tmp_path: Path, pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    ))
    settings = Settings(tls_cert_file=pki.server.cert, tls_key_file=encrypted)
    with pytest.raises(tls.TLSConfigError, match=r"PNEUMO_TLS_KEY_FILE: .*encrypted"):
        tls.server_context(settings)


@pytest.mark.parametrize("values", [
    {"tls_cert_file": "server.pem"},
    {"tls_require_client_cert": True},
    {"tls_cert_file": "server.pem", "tls_key_file": "server.key", "tls_require_client_cert": True},
])
def test_incomplete_tls_settings_are_refused(pki: Pki, values: dict) -> None:
    resolved = {k: pki.server.cert.parent / v if isinstance(v, str) else v for k, v in values.items()}
    with pytest.raises(tls.TLSConfigError, match="PNEUMO_TLS_"):
        tls.server_context(Settings(**resolved))


def test_pneumo_run_stops_at_startup_on_a_missing_tls_file(tmp_path: Path, pki: Pki) -> None:
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_PORT": str(free_port()),
           "PNEUMO_TLS_CERT_FILE": str(pki.server.cert), "PNEUMO_TLS_KEY_FILE": str(tmp_path / "gone.key")}
    result = subprocess.run([sys.executable, "-m", "ops.cli", "run"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: PNEUMO_TLS_KEY_FILE: cannot read" in result.stderr
    assert "Traceback" not in result.stderr
