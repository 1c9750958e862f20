"""Shared plumbing for the components' frozen config dataclasses: TOML files and MQTT links.

Each component keeps its own ``*Config`` dataclass (units in comments); this module only
reads and writes them, and turns their broker fields into an ``MqttConfig``.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, cast

if TYPE_CHECKING:  # imported lazily: reading a config file must not pull in paho
    from .link.config import MqttConfig

__all__ = ["load_toml_config", "mqtt_config", "to_toml"]

C = TypeVar("C")


def load_toml_config(
    cls: type[C], path: Path, home: Path, *, required: bool, hint: str = "", **overrides: Any
) -> C:
    """Build ``cls(home=home, **file settings)`` and apply the non-None ``overrides``."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        if required:
            raise FileNotFoundError(f"{path} not found{': ' + hint if hint else ''}") from exc
        data = {}
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc
    unknown = set(data) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    data.pop("home", None)
    cfg = cls(home=home, **data)  # type: ignore[call-arg]
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})  # type: ignore[type-var]


def to_toml(cfg: object) -> str:
    """Every field but ``home``, one ``key = value`` per line (JSON string escapes are TOML's)."""
    lines = []
    for f in fields(cfg):  # type: ignore[arg-type]
        if f.name != "home":
            value = getattr(cfg, f.name)
            lines.append(
                f"{f.name} = {json.dumps(value) if isinstance(value, str | bool) else repr(value)}"
            )
    return "\n".join(lines) + "\n"


def mqtt_config(
    cfg: Any,
    *,
    client_id: str,
    username: str,
    broker: str | None = None,
    password: str | None = None,
    protocol: int | None = None,
    **extra: Any,
) -> MqttConfig:
    """An ``MqttConfig`` from a component config's ``broker``, ``password_file`` and ``tls_*``."""
    from .link.config import MqttConfig

    if password is None and cfg.password_file:
        password = Path(cfg.password_file).read_text().strip()
    return MqttConfig(
        url=broker or cfg.broker,
        client_id=client_id,
        username=username if password else None,
        password=password,
        tls_ca=Path(cfg.tls_ca) if cfg.tls_ca else None,
        tls_cert=Path(cfg.tls_cert) if cfg.tls_cert else None,
        tls_key=Path(cfg.tls_key) if cfg.tls_key else None,
        protocol=cast(Literal[5, 311], protocol or cfg.mqtt_protocol),
        **extra,
    )
