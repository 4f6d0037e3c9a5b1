"""Node configuration.

Settings come from, in order of precedence: keyword arguments, ``PACS_TRIAGE_*``
environment variables, a TOML file (``PACS_TRIAGE_CONFIG`` or ``./pacs-triage.toml``)
and the defaults below. Every setting has a working default, so ``pacs-triage
serve`` runs with no configuration at all. Nested values (lists of callers, move
destinations) are JSON in the environment and tables in TOML.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "PACS_TRIAGE_"
CONFIG_FILE_ENV = "PACS_TRIAGE_CONFIG"
DEFAULT_CONFIG_FILE = "pacs-triage.toml"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pacs-triage"


class DuplicatePolicyValues(StrEnum):
    """What C-STORE does with a second copy of a SOP Instance whose bytes differ."""

    KEEP_FIRST = "keep_first"
    OVERWRITE = "overwrite"


class CallerRule(BaseModel):
    """One allowed DICOM caller: a calling AE title, optionally bound to source networks.

    ``hosts`` holds IP addresses or networks in CIDR notation (``10.1.2.0/24``);
    empty means any source address.
    """

    ae_title: str = Field(min_length=1, max_length=16)
    hosts: list[str] = Field(default_factory=list)

    @field_validator("hosts")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for host in value:
            ipaddress.ip_network(host, strict=False)
        return value

    def admits(self, ae_title: str, address: str) -> bool:
        """Return True if a caller with `ae_title` from `address` matches this rule."""
        if ae_title.strip() != self.ae_title.strip():
            return False
        if not self.hosts:
            return True
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        return any(ip in ipaddress.ip_network(h, strict=False) for h in self.hosts)


class RemoteAE(BaseModel):
    """A DICOM peer the node may connect to (C-MOVE destination, remote PACS, forward target)."""

    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(gt=0, lt=65536)


class WebhookTarget(BaseModel):
    """An alert receiver reached by HTTP POST of a JSON body (see README "Alerts")."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers, e.g. an ``Authorization`` the receiver expects."""
    include_patient_data: bool = False
    """Put Patient ID and Patient's Name into the message (never into logs)."""


class Hl7Target(BaseModel):
    """An HL7 v2 receiver (a RIS) reached over MLLP; alerts go as ORU^R01 messages."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    host: str
    port: int = Field(gt=0, lt=65536)
    sending_application: str = "PACS_TRIAGE"
    sending_facility: str = ""
    receiving_application: str = "RIS"
    receiving_facility: str = ""
    include_patient_data: bool = True
    """Fill PID-3/PID-5 (a RIS needs them to file the result)."""


class ForwardDestination(RemoteAE):
    """A DICOM AE (the hospital PACS) that receives the AI results by C-STORE."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    include_study: bool = False
    """Also send the study's images, not only the SR and key image."""


class DicomwebDestination(BaseModel):
    """A DICOMweb service that receives the AI results by STOW-RS (PS3.18 10.5)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    url: str = Field(pattern=r"^https?://")
    """Base URL of the service (``.../dicom-web``); ``/studies`` is appended."""
    headers: dict[str, str] = Field(default_factory=dict)
    include_study: bool = False


class TokenScopeValues(StrEnum):
    """What an HTTP bearer token may do."""

    READ = "read"
    """Query and retrieve (QIDO-RS, WADO-RS, worklist, results)."""
    WRITE = "write"
    """Store and change (STOW-RS, worklist actions)."""
    ADMIN = "admin"
    """Everything, including configuration and cohort runs."""


class HttpToken(BaseModel):
    """One bearer token accepted by the HTTP API."""

    name: str = Field(min_length=1, max_length=64)
    token: SecretStr = Field(min_length=16)
    scopes: list[TokenScopeValues] = Field(default_factory=lambda: [TokenScopeValues.READ])


class Settings(BaseSettings):
    """All node settings, with working defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    """Root of the file store and, by default, of the SQLite index."""

    database_url: str | None = None
    """SQLAlchemy URL of the index; default ``sqlite:///<data_dir>/index.sqlite``."""

    ae_title: str = Field(default="PACS_TRIAGE", min_length=1, max_length=16)
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(default=11112, ge=0, lt=65536)
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, lt=65536)

    dicom_workers: int = Field(default=0, ge=0)
    """DIMSE worker processes; 0 means one per CPU core."""

    maximum_pdu_size: int = Field(default=131072, ge=0)
    """Largest P-DATA PDU we accept (PS3.8 D.1); fewer, larger PDUs cost less CPU."""

    maximum_associations: int = Field(default=32, ge=1)
    """Concurrent associations per worker process."""

    network_timeout: float = Field(default=60.0, gt=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)

    allowed_callers: list[CallerRule] = Field(default_factory=list)
    """Calling AE titles (and optional source networks) allowed to associate."""

    open_on_loopback: bool = True
    """Accept any calling AE title from 127.0.0.0/8 and ::1, even if not listed."""

    duplicate_policy: DuplicatePolicyValues = DuplicatePolicyValues.KEEP_FIRST

    fsync: bool = True
    """fsync files and directories before acknowledging; only turn off for throwaway nodes."""

    stable_after_seconds: float = Field(default=5.0, gt=0)
    """A study with no new instance for this long is complete and goes to triage."""

    stable_after_release_seconds: float = Field(default=1.0, gt=0)
    """The quiet period once every association that sent the study has been released."""

    node_name: str = Field(default_factory=lambda: socket.gethostname() or "pacs-triage")
    """Names this node's claims on triage jobs (distinct per node sharing one database)."""

    triage_lease_seconds: float = Field(default=900.0, gt=0)
    """How long a claimed triage job stays with its node before another may take it."""

    triage_enabled: bool = True
    """Run the triage flow on ready studies (off: studies stay queued)."""

    triage_concurrency: int = Field(default=1, ge=1)
    """Triage flow runs at once in this node (embedded mode)."""

    triage_report_no_applicable_model: bool = True
    """Store an SR saying that no model applies (off: only the triage state says so)."""

    triage_max_attempts: int = Field(default=3, ge=1)
    """A job whose flow run itself fails this often ends ``failed`` instead of running again."""

    prefect_api_url: str | None = None
    """A Prefect server to submit triage runs to (distributed mode); also read from
    ``PREFECT_API_URL``. Unset: embedded mode, a managed Prefect server child."""

    prefect_work_pool: str = "pacs-triage"
    """Work pool of the triage deployment (distributed mode)."""

    move_destinations: list[RemoteAE] = Field(default_factory=list)
    """Known C-MOVE destinations, by AE title."""

    cohort_remotes: list[RemoteAE] = Field(default_factory=list)
    """Remote PACS a research cohort may be pulled from (C-FIND there, C-MOVE to us);
    each must know our AE title as a move destination."""

    cohort_move_interval_seconds: float = Field(default=0.0, ge=0)
    """Pause between two C-MOVEs of a remote cohort (throttles the load on the remote)."""

    cohort_concurrency: int = Field(default=1, ge=1, le=16)
    """Studies a cohort run analyses at once."""

    cohort_torch_threads: int = Field(default=1, ge=0)
    """Torch threads of a cohort run's process (0: torch's default); fewer leaves cores to
    clinical triage."""

    cohort_write_sr: bool = False
    """Store a research SR (Series Description ``RESEARCH ...``) into each analysed study
    (off by default: research results go to the results table; ``--sr`` asks for SRs)."""

    cohort_yield_to_triage: bool = True
    """A cohort run waits while clinical triage jobs are queued or running."""

    cohort_yield_poll_seconds: float = Field(default=0.25, gt=0)
    """How often a waiting cohort run looks at the triage outbox again."""

    cohort_stale_triage_seconds: float = Field(default=900.0, gt=0)
    """A triage job pending longer than this (no dispatcher is taking jobs) no longer holds
    cohort runs back."""

    cohort_stale_run_seconds: float = Field(default=120.0, gt=0)
    """A cohort run silent this long is taken for dead; a new run may take the cohort over."""

    cohort_pseudonym_key: SecretStr | None = None
    """Key of the de-identified export's pseudonyms (same key, same pseudonyms); ``--key``
    overrides it."""

    http_tokens: list[HttpToken] = Field(default_factory=list)
    """Bearer tokens for the HTTP API (see also :attr:`http_token_file`)."""

    http_token_file: Path | None = None
    """File of tokens, one per line: ``<token> <scope>[,<scope>...] [name]``; ``#`` comments.
    Default ``<data_dir>/http-tokens``, created with one admin token on first start."""

    http_open_on_loopback: bool = False
    """Serve HTTP callers from 127.0.0.0/8 and ::1 without a token (all scopes)."""

    cors_origins: list[str] = Field(default_factory=list)
    """Origins allowed to call the HTTP API from a browser (CORS), e.g. a web viewer."""

    alert_priority_classes: list[str] = Field(default_factory=lambda: ["STAT"])
    """Triage priority classes that raise an alert (STAT, URGENT, ROUTINE)."""

    alert_webhooks: list[WebhookTarget] = Field(default_factory=list)
    """Webhook receivers of critical-finding alerts."""

    alert_hl7: list[Hl7Target] = Field(default_factory=list)
    """HL7 v2 (MLLP) receivers of critical-finding alerts."""

    key_image_enabled: bool = True
    """Store a Secondary Capture of the key image with the finding marked in the study."""

    forward_destinations: list[ForwardDestination] = Field(default_factory=list)
    """DICOM AEs that receive the SR and key image (C-STORE) after triage."""

    forward_dicomweb: list[DicomwebDestination] = Field(default_factory=list)
    """DICOMweb services that receive the SR and key image (STOW-RS) after triage."""

    delivery_max_attempts: int = Field(default=10, ge=1)
    """Attempts per alert or forward before it is marked failed."""

    delivery_backoff_seconds: float = Field(default=2.0, gt=0)
    """Wait before the first retry; doubles per attempt up to ``delivery_backoff_max_seconds``."""

    delivery_backoff_max_seconds: float = Field(default=300.0, gt=0)

    delivery_timeout_seconds: float = Field(default=10.0, gt=0)
    """Connect/read timeout of one delivery attempt."""

    worklist_url: str | None = None
    """The worklist page's address as others reach it (put into alerts); default from http_*."""

    worklist_poll_seconds: float = Field(default=1.0, gt=0)
    """How often the live worklist checks the index for changes."""

    log_level: str = "INFO"

    models_dirs: list[Path] = Field(default_factory=list)
    """Extra folders of MONAI bundles, besides the shipped ones and ``<data_dir>/models``."""

    model_device: str = "auto"
    """Torch device models run on: ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda:0``."""

    model_threads: int = Field(default=1, ge=0)
    """Torch CPU threads for inference; 0 keeps torch's default (one per core)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = Path(os.environ.get(CONFIG_FILE_ENV, DEFAULT_CONFIG_FILE))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def resolved_database_url(self) -> str:
        """The index URL, defaulting to a SQLite file in the data directory."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'index.sqlite'}"

    @property
    def resolved_prefect_api_url(self) -> str | None:
        """The Prefect API of distributed mode, or None for embedded mode."""
        return self.prefect_api_url or os.environ.get("PREFECT_API_URL") or None

    @property
    def resolved_http_token_file(self) -> Path:
        """Where the token file is (default ``<data_dir>/http-tokens``)."""
        return self.http_token_file or self.data_dir / "http-tokens"

    @property
    def resolved_dicom_workers(self) -> int:
        return self.dicom_workers or os.cpu_count() or 1

    def caller_allowed(self, ae_title: str, address: str) -> bool:
        """Decide whether a calling AE from `address` may associate.

        Loopback callers are admitted when :attr:`open_on_loopback` is set; everyone
        else must match an entry of :attr:`allowed_callers`.
        """
        if self.open_on_loopback:
            try:
                if ipaddress.ip_address(address.split("%", 1)[0]).is_loopback:
                    return True
            except ValueError:
                pass
        return any(rule.admits(ae_title, address) for rule in self.allowed_callers)

    def move_destination(self, ae_title: str) -> RemoteAE | None:
        """Return the configured peer for a C-MOVE destination AE title, if any."""
        for remote in self.move_destinations:
            if remote.ae_title.strip() == ae_title.strip():
                return remote
        return None
