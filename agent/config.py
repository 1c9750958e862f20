"""Agent configuration: one frozen dataclass, read from ``<home>/agent.toml``.

Only the CLI builds it (from the file, flags and ``EDGEFLEET_AGENT_HOME``); nothing else
reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.infra.fsutil import os_errors
from edgefleet.infra.settings import load_toml_config, to_toml

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
    fl_enabled: bool = False  # opt in to federated-learning rounds (edgefleet.federated)
    fl_data_dir: str = ""  # local training data (.npz/.csv); "" = <home>/fl-data
    shadow_sample: float = 0.1  # share of requests a shadow candidate also runs on (0 = none)
    shadow_queue: int = 64  # samples waiting for the shadow; more are dropped and counted
    predlog_sample: float = 0.0  # share of requests in the prediction log (0 = no log)
    predlog_max_bytes: int = 4 * 1024 * 1024  # bytes per log file before it rotates
    predlog_keep: int = 4  # rotated log files kept
    predlog_redact: str = ""  # comma-separated fields logged as digests: inputs,outputs,argmax

    def __post_init__(self) -> None:
        if self.keep < 1 or self.threads < 1 or self.window < 1:
            raise ValueError("keep, threads and window must be >= 1")
        if not 0.0 <= self.predlog_sample <= 1.0:
            raise ValueError("predlog_sample must be in [0, 1]")
        if not 0.0 <= self.shadow_sample <= 1.0 or self.shadow_queue < 1:
            raise ValueError("shadow_sample must be in [0, 1] and shadow_queue >= 1")
        if self.mqtt_protocol not in (5, 311):
            raise ValueError(f"mqtt_protocol must be 5 or 311, got {self.mqtt_protocol}")

    @classmethod
    def load(cls, home: Path, **overrides: Any) -> AgentConfig:
        """``FileNotFoundError`` (saying how to make one) if there is none; ``StoreError`` if it
        cannot be read; ``ValueError``/``TypeError`` for bad settings."""
        path = home / "agent.toml"
        with os_errors(f"{path}: cannot read the config", passthrough=(FileNotFoundError,)):
            return load_toml_config(
                cls, path, home, required=True, hint="run `edgefleet agent init` first", **overrides
            )

    def to_toml(self) -> str:
        return to_toml(self)
