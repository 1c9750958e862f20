"""Coordinator configuration: one frozen dataclass, from ``<home>/coordinator.toml``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.infra.fsutil import os_errors
from edgefleet.infra.settings import load_toml_config, to_toml
from edgefleet.protocol.build import SHARD_TARGETS

__all__ = ["CoordinatorConfig"]


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    home: Path
    database: str = ""  # SQLAlchemy URL; "" = sqlite file registry.db in home
    segment_size: int = 256 * 1024  # bytes of plaintext per encrypted segment / MQTT chunk
    manifest_ttl: int = 30 * 24 * 3600  # seconds a release manifest stays valid
    # devices per signed manifest of a release: an offer carries its shard's ids (~90 bytes
    # each), the registry one manifest per shard; 1 = no device learns another's id
    manifest_shard: int = SHARD_TARGETS  # 64
    broker: str = ""  # mqtt://host:port; "" = embedded broker for demos
    username: str = "coordinator"
    password_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    mqtt_protocol: int = 5
    # The storage key sealing content keys and model blobs at rest (coordinator/vault.py):
    # a file ("" = <home>/secrets/storage.key; mode 0600), or, if storage_key_env names an
    # environment variable, that variable (the CLI reads it and passes the key in).
    storage_key_file: str = ""
    storage_key_env: str = ""

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.home / 'registry.db'}"

    @property
    def storage_key_path(self) -> Path:
        """The key file; a relative ``storage_key_file`` is relative to the home."""
        return self.home / (self.storage_key_file or "secrets/storage.key")

    @classmethod
    def load(cls, home: Path, **overrides: Any) -> CoordinatorConfig:
        """Defaults if there is no file; ``StoreError`` if it cannot be read; ``ValueError``/
        ``TypeError`` for bad settings."""
        path = home / "coordinator.toml"
        with os_errors(f"{path}: cannot read the config", passthrough=(FileNotFoundError,)):
            return load_toml_config(cls, path, home, required=False, **overrides)

    def to_toml(self) -> str:
        return to_toml(self)
