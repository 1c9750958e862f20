"""Coordinator configuration: one frozen dataclass, from ``<home>/coordinator.toml``."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["CoordinatorConfig"]


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    home: Path
    database: str = ""  # SQLAlchemy URL; "" = sqlite file registry.db in home
    segment_size: int = 256 * 1024  # bytes of plaintext per encrypted segment / MQTT chunk
    manifest_ttl: int = 30 * 24 * 3600  # seconds a release manifest stays valid
    broker: str = ""  # mqtt://host:port; "" = embedded broker for demos
    username: str = "coordinator"
    password_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    mqtt_protocol: int = 5

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.home / 'registry.db'}"

    @classmethod
    def load(cls, home: Path, **overrides: Any) -> CoordinatorConfig:
        path = home / "coordinator.toml"
        data = tomllib.loads(path.read_text()) if path.exists() else {}
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        cfg = cls(home=home, **{k: v for k, v in data.items() if k != "home"})
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    def to_toml(self) -> str:
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "home":
                out.append(f'{f.name} = "{v}"' if isinstance(v, str) else f"{f.name} = {v!r}")
        return "\n".join(out) + "\n"
