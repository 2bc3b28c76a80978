"""Typed settings, loaded once per process from the environment and secret files.

Environment variables carry endpoints and tunables (``METERTWIN_`` prefix is not
used so that stack.yml's ``environment:`` stays short and OpenFaaS-idiomatic).
Secrets come from ``secrets_dir`` (``/var/openfaas/secrets`` on OpenFaaS) and are held
as :class:`SecretStr` so they never print. Two layouts are read: OpenFaaS mounts each
secret as a file, ``<secrets_dir>/<name>``; Knative (``faas-cli generate
--api=serving.knative.dev/v1``) mounts each Kubernetes Secret as a directory of its keys,
``<secrets_dir>/<name>/<key>``, where ``faas-cli secret create`` names the key after the
secret.

``REDIS_URL`` (and the MDMS's ``HOT_REDIS_URL``) may name a Redis Cluster with the scheme
``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` with TLS); see
:func:`redis_cluster_nodes` and :mod:`metertwin.core.redis_cluster`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

#: Where OpenFaaS mounts function secrets; override with ``SECRETS_DIR`` locally.
OPENFAAS_SECRETS_DIR = "/var/openfaas/secrets"


def _secrets_dir() -> str | None:
    path = os.environ.get("SECRETS_DIR", OPENFAAS_SECRETS_DIR)
    return path if Path(path).is_dir() else None


def _secret(name: str) -> AliasChoices:
    return AliasChoices(name, name.replace("_", "-"))


def secret_key_file(directory: Path, name: str) -> Path:
    """The file holding secret ``name`` inside its Knative mount ``directory``.

    A Secret volume lists each key as an entry (a symlink into ``..data/``); the entries
    starting with ``..`` are the kubelet's own. The key named like the secret wins (what
    ``faas-cli secret create`` and our kustomize secretGenerator make); a Secret with one
    key of another name is read too; several keys, none named so, is an error rather than
    a guess.
    """
    keys = sorted(p for p in directory.iterdir() if not p.name.startswith("..") and p.is_file())
    for key in keys:
        if key.name.lower() == name.lower():
            return key
    if len(keys) == 1:
        return keys[0]
    raise SettingsError(
        f"secret directory {str(directory)!r} holds keys {[k.name for k in keys]}; expected one key, "
        f"or a key named {name!r}"
    )


class _SecretFilesOrDirs(SecretsSettingsSource):
    """pydantic-settings' secrets source, reading a directory mount as its key file.

    The stock source warns "found a directory instead" and leaves the field at its default,
    which on Knative meant an empty signing key (every token rejected) and no MQTT password.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        field_key, value_is_complex = field_name, False
        for field_key, env_name, value_is_complex in self._extract_field_info(field, field_name):
            for root in reversed(self.secrets_paths):  # the last directory wins, as upstream
                path = self.find_case_path(root, env_name, self.case_sensitive)
                if path is None:
                    continue
                target = secret_key_file(path, env_name) if path.is_dir() else path
                if not target.is_file() or root.resolve() not in target.resolve().parents:
                    continue  # a dangling link, or a link out of the secrets directory: not a secret
                return target.read_text(encoding="utf-8").strip(), field_key, value_is_complex
        return None, field_key, value_is_complex


class Settings(BaseSettings):
    """Everything a function or service of one zone needs to know about its surroundings."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, populate_by_name=True)

    zone: str = Field(default="edge", description="Zone this process serves: edge, fog or cloud.")
    #: The zone's Redis: ``redis://host:port/db`` (``rediss://`` for TLS), or a Redis Cluster as
    #: ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster://`` for TLS):
    #: the listed nodes are only where discovery starts (see :func:`redis_cluster_nodes`).
    redis_url: str = "redis://127.0.0.1:6379/0"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    mqtt_username: str = "twin-service"
    s3_endpoint_url: str | None = None
    s3_bucket: str = "metertwin-cold"
    s3_region: str = "us-east-1"

    # Timeouts (seconds): every network wait has one.
    redis_timeout_s: float = 2.0
    mqtt_connect_timeout_s: float = 5.0
    meter_read_timeout_s: float = 3.0
    publish_timeout_s: float = 2.0

    # Limits.
    #: Connections per process to the zone's Redis; more callers wait (up to redis_timeout_s)
    #: for a free one instead of failing.
    redis_max_connections: int = Field(default=64, ge=1, le=10_000)
    max_body_bytes: int = 1_048_576
    max_bulk_meters: int = 10_000
    default_read_max_age_s: float = 900.0
    command_expiry_s: int = 3600
    #: A concentrator's batch message: at most this many readings and bytes (larger: refused whole).
    concentrator_max_readings: int = Field(default=1000, ge=1, le=100_000)
    concentrator_max_bytes: int = Field(default=524_288, ge=1024)

    # Secrets: file names in secrets_dir (or env vars of the same name for local runs).
    # Each is read from the file ``<secrets_dir>/<name-with-hyphens>`` (an OpenFaaS
    # secret) or from the environment variable of the same name in upper snake case.
    mqtt_password: SecretStr = Field(default=SecretStr(""), validation_alias=_secret("mqtt_password"))
    token_signing_key: SecretStr = Field(
        default=SecretStr(""), validation_alias=_secret("token_signing_key")
    )
    gateway_basic_auth_password: SecretStr = Field(
        default=SecretStr(""), validation_alias=_secret("gateway_basic_auth_password")
    )
    s3_access_key_id: SecretStr = Field(
        default=SecretStr("testing"), validation_alias=_secret("s3_access_key_id")
    )
    s3_secret_access_key: SecretStr = Field(
        default=SecretStr("testing"), validation_alias=_secret("s3_secret_access_key")
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The stock order (init, environment, .env, secrets), with secrets read from files or directories."""
        secrets_dir = getattr(file_secret_settings, "secrets_dir", None)
        return init_settings, env_settings, dotenv_settings, _SecretFilesOrDirs(settings_cls, secrets_dir)

    @field_validator("redis_url")
    @classmethod
    def _cluster_url_parses(cls, value: str) -> str:
        redis_cluster_nodes(value)  # a malformed cluster URL fails at start-up, not at the first call
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _empty_endpoint_is_aws(cls, value: str | None) -> str | None:
        # stack.yml writes ${S3_ENDPOINT_URL:-}: empty means AWS's own endpoint.
        return value or None

    # --- token deny-list (metertwin.core.revocation) ---
    #: How long a process trusts its last deny-list answer for a token (seconds; 0: ask Redis every call).
    #: A revocation takes effect within this time.
    token_revocation_cache_s: float = Field(default=1.0, ge=0, le=60)

    # --- outbound destinations (metertwin.core.destinations; docs/security.md) ---
    #: Lists are comma- or space-separated. Schemes an async callback or EMS webhook may use.
    destination_allowed_schemes: str = "https,http"
    #: When set, the only host names allowed (``*.example.com`` for subdomains); addresses are still checked.
    destination_allowed_hosts: str = ""
    #: Ranges allowed although non-public (loopback, private, link-local, ...), e.g. ``127.0.0.1/32``.
    destination_allowed_cidrs: str = ""
    destination_timeout_s: float = Field(default=5.0, gt=0, le=60)
    destination_max_response_bytes: int = Field(default=65_536, ge=0, le=16_777_216)
    #: MQTT EMS targets allowed beyond the meter's own ``ems/<meter_id>/...`` (exact topics, or ``prefix/#``).
    ems_mqtt_approved_topics: str = ""


# --- Redis Cluster (metertwin.core.clients builds the client) ---
#: URL schemes that name a Redis Cluster rather than one Redis. A scheme (not a separate flag) so that
#: every Redis URL setting (``REDIS_URL``, the MDMS's ``HOT_REDIS_URL``) can point at either on its own.
REDIS_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def redis_cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]] | None:
    """For a cluster URL, the plain URL of its first node and every ``(host, port)`` listed; else None.

    ``redis+cluster://user:pw@a:7000,b:7001`` gives ``("redis://user:pw@a:7000", [("a", 7000), ("b", 7001)])``.
    A cluster has only database 0, so a path other than ``/`` or ``/0`` is refused.
    """
    scheme, sep, rest = url.partition("://")
    plain = REDIS_CLUSTER_SCHEMES.get(scheme.lower())
    if plain is None or not sep:
        return None
    auth, _, hosts = rest.rpartition("@")
    hosts, _, path = hosts.partition("/")
    if path.split("?")[0] not in ("", "0"):
        raise ValueError(f"Redis Cluster URL {_redacted(url)!r} names database {path!r}; a cluster has only 0")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"Redis Cluster URL {_redacted(url)!r}: node {item!r} is not host:port")
        nodes.append((host, int(port)))
    first = f"{plain}://{auth + '@' if auth else ''}{nodes[0][0]}:{nodes[0][1]}"
    return first, nodes


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url


@functools.cache
def get_settings() -> Settings:
    """Return the process-wide settings, read once on first use."""
    return Settings(_secrets_dir=_secrets_dir())  # type: ignore[call-arg]


def reset_settings() -> None:
    """Forget cached settings (tests that change the environment call this)."""
    get_settings.cache_clear()
