"""One settings model for every process, read from `PNEUMO_*` environment variables
or a `.env`-style file named by `PNEUMO_SETTINGS_FILE`; loaded once in each `main` and passed down.
Secrets may instead be files in `PNEUMO_SECRETS_DIR` named like the variable (`pneumo_database_url`),
as Docker/Kubernetes secrets are mounted. Log `redacted()`, never the raw URLs or tokens.
"""

from __future__ import annotations

import contextlib
import os
import re
from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.contract import DEFAULT_MODELS_DIR


class PeerAddress:
    """`AE@host:port`, as PNEUMO_PACS gives a destination."""

    def __init__(self, text: str) -> None:
        ae_title, at, address = text.strip().partition("@")
        host, colon, port = address.rpartition(":")
        if not (at and colon and ae_title and host and port.isdigit()):
            raise ValueError(f"peer must look like AE@host:port, got {text!r}")
        if len(ae_title) > 16:
            raise ValueError(f"AE title {ae_title!r} is longer than 16 characters")
        self.ae_title, self.host, self.port = ae_title, host, int(port)

    def __repr__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


URL_FIELDS = ("database_url", "broker_url")


def redact_url(url: str) -> str:
    """`scheme://user:***@host/...?password=***`: what may be logged of a URL with a password.

    Hand-written: SQLAlchemy's `make_url(url).render_as_string(hide_password=True)` shows a
    `?password=` query value and part of an unencoded '@' in a password
    (`redis://default:p@ss@broker` gives `redis://default:***@ss@broker`)."""
    url = _QUERY_PASSWORD.sub(r"\1***", url)
    scheme, separator, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    if not (separator and at and ":" in userinfo):
        return url
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{host}{slash}{path}"


_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd)=)[^&#]*", re.IGNORECASE)


class Settings(BaseSettings):
    """Every setting, its unit in its name where it has one. Defaults run on one machine."""

    model_config = SettingsConfigDict(
        env_prefix="PNEUMO_", env_file=os.environ.get("PNEUMO_SETTINGS_FILE"), extra="ignore",
        secrets_dir=os.environ.get("PNEUMO_SECRETS_DIR"),
    )

    home: Path = Field(Path("var"), description="Storage, spool, embedded database and broker")
    ae_title: str = Field("PNEUMO", max_length=16, description="Our called AE title")
    host: str = Field("0.0.0.0", description="Address the DICOM node listens on")
    port: int = Field(11112, description="DICOM port of the node")
    allowed_peers: str = Field(
        "*",
        description=(
            "Comma-separated calling AE titles allowed to associate, each optionally AE@host; "
            "'*' allows any (embedded default only; set it in production)"
        ),
    )
    pacs: str = Field("", description="Comma-separated SR destinations AE@host:port; empty: none")
    database_url: str = Field("", description="SQLAlchemy URL; empty: SQLite file in home")
    broker_url: str = Field("", description="Celery broker URL; empty: embedded Redis socket in home")
    quiet_seconds: float = Field(5.0, description="A study is stable this long after its last image")
    max_associations: int = Field(10, description="Connections the node serves at once")
    node_processes: int = Field(
        0, ge=0, description="Processes `pneumo node` receives in (one accepts and keeps the limits "
        "below for all; associations go to the least busy); 0: one per CPU core, at most 8"
    )
    max_associations_per_host: int = Field(
        0, ge=0, description="Connections one peer host may hold at once (0: max_associations - 2, "
        "at least 1), so one host cannot take every slot; the other max_associations minus this are "
        "kept for hosts holding none, so several hosts together cannot either"
    )
    association_request_timeout_s: float = Field(
        10.0, gt=0, description="A connection must complete its A-ASSOCIATE-RQ within this (and a "
        "rejected or aborted one is closed after it); a stalled one is closed"
    )
    network_timeout_s: float = Field(60.0, description="DIMSE/ACSE/network timeouts")
    store_deadline_s: float = Field(
        900.0, gt=0, description="A C-STORE (receiving it, then storing it) running longer is aborted "
        "(A-ABORT) and its slot freed, whatever its handler is doing"
    )
    min_transfer_bytes_per_s: int = Field(
        1024, ge=0, description="A C-STORE received slower than this over transfer_rate_window_s is "
        "aborted and its slot freed (a drip holds a slot; 0: no minimum)"
    )
    transfer_rate_window_s: float = Field(
        30.0, gt=0, description="Window over which min_transfer_bytes_per_s is measured"
    )
    connection_rate_per_host_per_s: float = Field(
        10.0, ge=0, description="New connections one peer host may open per second, in bursts of "
        "connection_burst_per_host; past it they are refused at once (0: no limit)"
    )
    connection_burst_per_host: int = Field(
        30, ge=1, description="Connections one host may open at once before its rate applies"
    )
    peer_warnings_per_minute: int = Field(
        10, ge=0, description="Warnings of one kind the node logs per peer address per minute; the "
        "rest are counted and the count logged with the next one (0: no limit)"
    )
    min_free_disk_mb: int = Field(500, description="Below this free space, C-STORE answers 0xA700")
    max_inflated_mb: int = Field(
        512, description="A deflated data set inflating past this is refused (0xC210): the node reads "
        "an inflated copy in the spool (disk, not memory)"
    )
    max_dataset_mb: int = Field(
        1024, ge=0, description="A data set larger than this (as received) is refused 0xA700 with the "
        "reason recorded; the rest of its transfer is read and discarded, never stored (0: no limit)"
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) of the node; set with tls_key_file: TLS only"
    )
    tls_key_file: Path | None = Field(None, description="Unencrypted PEM key of tls_cert_file (mode 600)")
    tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle verifying client certificates and the PACS's certificate"
    )
    tls_require_client_cert: bool = Field(
        False, description="Mutual TLS: refuse peers without a certificate signed by tls_ca_file"
    )
    pacs_tls: bool = Field(
        False, description="SR delivery over TLS, verifying the PACS against tls_ca_file (system CAs if "
        "unset); our certificate and key are presented when set"
    )
    inference_queue: str = Field("inference-cpu", description="inference-cpu or inference-gpu")
    model_name: str = Field("pneumonia-transfer", description="Which served model the workers run")
    inference_batch_size: int = Field(
        1, ge=1, description="Images per model call; above 1, run the inference worker with "
        "`--pool threads` and at least this many threads (GPU: 32-128)"
    )
    inference_batch_wait_ms: float = Field(
        10.0, ge=0, description="How long a batch waits for more images after its first one"
    )
    models_dir: Path = Field(
        DEFAULT_MODELS_DIR, description="The model registry (versions and served.json) every command "
        "reads and writes; relative to the working directory: `models`. An installed product points "
        "it at its copy of the released models/ folder (README, Install)")
    delivery_max_attempts: int = Field(6, description="SR C-STORE tries before dead-letter")
    pictures: bool = Field(
        True, description="With each SR, a picture per image in its own series of the study: the "
        "image with the heat map and the answer burned in, or 'not assessed: <reason>' "
        "(worker.picture); false: the SR alone")
    delivery_backoff_s: float = Field(5.0, description="First retry delay; doubles each try")
    delivery_associations_per_destination: int = Field(
        4, ge=1, description="SR associations one delivery worker holds open to one PACS at once: "
        "`pneumo run` starts its delivery worker with this many pool processes, each reusing its "
        "association across SRs (worker.delivery.AssociationPool; threads of one process share it)"
    )
    delivery_association_idle_s: float = Field(
        1.0, gt=0, description="An SR association unused this long is released: a burst's SRs "
        "share one, and a PACS taking one association at a time (plain storescp) lets the next "
        "worker process in within this (5 s made a 500-study burst's tail ~15 s longer)"
    )
    classify_max_retries: int = Field(3)
    delivery_worker_max_memory_mb: int = Field(
        400, ge=0, description="`pneumo run`'s delivery worker replaces a pool child whose resident "
        "memory passes this after a task (0: never); bounds its slow growth (~10 MiB/hour measured)"
    )
    stop_timeout_s: float = Field(
        8.0, gt=0, description="`pneumo run` stops its children at once; one still running this long "
        "after SIGTERM is killed (its unfinished task is handed out again). Below a service "
        "manager's stop timeout (docker: 10 s, systemd: 90 s)"
    )
    log_max_mb: float = Field(
        10.0, gt=0, description="`pneumo run` rotates each log in home (node.log, worker-*.log, "
        "scheduler.log, dashboard.log, redis.log) when it reaches this size"
    )
    log_backups: int = Field(
        4, ge=0, description="Rotated files kept per log (node.log.1 ...); at most "
        "(log_backups + 1) * log_max_mb per log"
    )
    sweep_interval_s: float = Field(10.0, description="How often stuck instances are re-queued")
    finalise_interval_s: float = Field(1.0, description="How often stable studies are looked for")
    dashboard_host: str = Field("127.0.0.1", description="Address the dashboard/metrics service binds")
    dashboard_port: int = Field(8080, description="Port of the dashboard and /metrics")
    dashboard_token: SecretStr = Field(
        SecretStr(""), description="Token for the dashboard's state-changing actions")
    dashboard_token_file: Path | None = Field(None, description="File holding the token instead")
    dashboard_trusted_proxies: str = Field(
        "", description="Comma-separated addresses or networks (CIDR) of reverse proxies whose "
        "X-Forwarded-For/-Proto the dashboard believes; empty: none, the connecting address is the "
        "client (a forged header changes nothing, e.g. the sign-in throttle's key)"
    )
    dashboard_tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) of the dashboard; set with dashboard_tls_key_file: "
        "HTTPS only, and the session cookie is marked Secure"
    )
    dashboard_tls_key_file: Path | None = Field(
        None, description="Unencrypted PEM key of dashboard_tls_cert_file (mode 600)"
    )
    show_patient_names: bool = Field(False, description="Show patient names on the dashboard")
    drift_psi_alert: float = Field(
        0.1, ge=0, description="Smallest PSI (production scores vs the card's validation scores) worth "
        "an alert; a window alerts only above both this and its noise level at its size")
    drift_false_alarm_rate: float = Field(
        0.001, gt=0, lt=0.5, description="Chance that one drift window alerts although its scores come "
        "from the validation population (sets the noise level; 8 windows per model: <1% per model)")

    hl7_port: int | None = Field(
        None, description="Port of the HL7 v2 MLLP listener for the RIS's final reports (labels); "
        "unset: `pneumo run` starts none")
    hl7_host: str = Field("0.0.0.0", description="Address the HL7 MLLP listener binds")
    hl7_allowed_peers: str = Field(
        "", description="Comma-separated addresses or networks (CIDR) that may send HL7 reports (the "
        "RIS interface engine); empty: loopback only (the listener refuses to start on a wider "
        "PNEUMO_HL7_HOST without it). Others are disconnected unread")
    scorecard_alert_p: float = Field(
        0.01, gt=0, lt=0.5, description="One-sided exact binomial p-value below which a version's site "
        "sensitivity or specificity alerts as below what its card measured")

    def redacted(self) -> dict[str, object]:
        """Every setting, safe to log or print: URL passwords and tokens masked."""
        values = self.model_dump()
        for name, value in values.items():
            if isinstance(value, SecretStr):
                values[name] = "***" if value.get_secret_value() else ""
        for name in URL_FIELDS:
            values[name] = redact_url(values[name])
        return values

    def __repr_args__(self) -> list[tuple[str, object]]:
        """repr() and str() of the settings go through redacted(): a stray log line leaks nothing."""
        return list(self.redacted().items())

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("PNEUMO_AE_TITLE must not be empty")
        return value.strip()

    @field_validator("dashboard_trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: str) -> str:
        """Addresses or networks only: uvicorn would take a typo for a literal host name that
        never matches, silently trusting no one (or, worse, the wrong one)."""
        import ipaddress

        for part in filter(None, (p.strip() for p in value.split(","))):
            try:
                ipaddress.ip_network(part, strict=False)
            except ValueError:
                raise ValueError(f"not an IP address or network: {part!r}") from None
        return value

    @field_validator("pacs")
    @classmethod
    def _pacs(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            PeerAddress(part)
        return value

    @cached_property
    def pacs_destinations(self) -> list[PeerAddress]:
        return [PeerAddress(p) for p in self.pacs.split(",") if p.strip()]

    @cached_property
    def allowed(self) -> list[tuple[str, str | None]]:
        """[(ae_title, host or None)]; empty list when any peer is allowed."""
        entries = [p.strip() for p in self.allowed_peers.split(",") if p.strip()]
        if "*" in entries:
            return []
        return [(ae, host or None) for ae, _, host in (e.partition("@") for e in entries)]

    @property
    def associations_per_host(self) -> int:
        return self.max_associations_per_host or max(1, self.max_associations - 2)

    @property
    def home_dir(self) -> Path:
        return self.home.absolute()

    @property
    def storage_dir(self) -> Path:
        return self.home_dir / "storage"

    @property
    def spool_dir(self) -> Path:
        return self.home_dir / "spool"

    @property
    def node_health_path(self) -> Path:
        """Written by the node every few seconds: its association slots and recent refusals."""
        return self.home_dir / "node-health.json"

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home_dir / 'pneumo.db'}"

    @property
    def redis_socket(self) -> Path:
        return self.home_dir / "redis.sock"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or f"redis+socket://{self.redis_socket}"

    @property
    def sr_dir(self) -> Path:
        return self.home_dir / "sr"

    def ensure_dirs(self) -> None:
        """Home, storage, spool and SR folders, 0700: they hold patient data (images, SRs, the
        SQLite database, the broker's files, logs). An existing home is tightened too."""
        for folder in (self.home_dir, self.storage_dir, self.spool_dir, self.sr_dir):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder.stat().st_mode & 0o077:
                # Not ours (a mounted volume): its owner decides.
                with contextlib.suppress(PermissionError):
                    folder.chmod(0o700)


class SettingsError(ValueError):
    """The environment's settings are invalid; the message is one line naming each variable."""


def load_settings() -> Settings:
    """Settings from the environment, read once when a process starts and then passed down.

    Invalid ones raise SettingsError with one line, `invalid settings: PNEUMO_PORT: ...`, naming
    each variable and what is wrong but never its value (it may be a password).
    """
    try:
        return Settings()
    except ValidationError as error:
        problems = "; ".join(
            f"PNEUMO_{'_'.join(map(str, problem['loc'])).upper() or 'SETTINGS'}: {problem['msg']}"
            for problem in error.errors(include_url=False, include_input=False)
        )
        raise SettingsError(f"invalid settings: {problems}") from None
