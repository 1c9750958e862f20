"""Agent configuration: one frozen dataclass, read from ``<home>/agent.toml``.

Only the CLI builds it (from the file, flags and ``EDGEFLEET_AGENT_HOME``); nothing else
reads the environment.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

__all__ = ["AgentConfig"]


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    home: Path
    device_id: str
    keep: int = 2  # versions kept for rollback (active included)
    threads: int = 1  # inference threads; 1 is fastest for small models
    max_payload: int = 512 * 1024 * 1024  # bytes
    offline_grace: int = 7 * 24 * 3600  # seconds a manifest stays valid past expiry offline
    broker: str = ""  # mqtt://host:port or mqtts://host:port
    username: str = ""  # broker user; defaults to the device id when a password is set
    password_file: str = ""  # file holding the broker password
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    mqtt_protocol: int = 5  # 5 or 311
    window: int = 8  # chunk requests in flight
    http_port: int = 0  # local inference API on 127.0.0.1; 0 = pick a free port
    telemetry_buffer: int = 1000  # messages kept while the broker is unreachable

    def __post_init__(self) -> None:
        if self.keep < 1 or self.threads < 1 or self.window < 1:
            raise ValueError("keep, threads and window must be >= 1")
        if self.mqtt_protocol not in (5, 311):
            raise ValueError(f"mqtt_protocol must be 5 or 311, got {self.mqtt_protocol}")

    @classmethod
    def load(cls, home: Path, **overrides: Any) -> AgentConfig:
        path = home / "agent.toml"
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{path} not found: run `edgefleet agent init` first") from exc
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        cfg = cls(home=home, **{k: v for k, v in data.items() if k != "home"})
        return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

    def to_toml(self) -> str:
        lines = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "home":
                continue
            lines.append(
                f"{f.name} = {value!r}" if not isinstance(value, str) else f'{f.name} = "{value}"'
            )
        return "\n".join(lines) + "\n"
