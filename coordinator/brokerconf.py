"""``edgefleet coordinator broker-config``: a locked-down mosquitto set-up for the fleet.

Writes ``mosquitto.conf`` (no anonymous access, persistence, raised queue limits), a password
file for the coordinator and every enrolled device, and the ACL that confines each device to
its own topics. Passwords are made once and kept under ``<home>/secrets/`` (mode 0600): hand
``secrets/devices/<id>.password`` to the device (its ``password_file`` setting).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from edgefleet.infra.broker import edgefleet_acl, mosquitto_config, mosquitto_password_file
from edgefleet.infra.fsutil import atomic_write

from .home import Coordinator

__all__ = ["BrokerFiles", "credentials", "write_broker_config"]


@dataclass(frozen=True)
class BrokerFiles:
    config: Path
    passwords: Path
    acl: Path
    users: dict[str, str]  # username -> password (secret; for tests and the demo)


def _password(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, secrets.token_urlsafe(24).encode(), mode=0o600)
    return path.read_text().strip()


def credentials(coordinator: Coordinator) -> dict[str, str]:
    """Broker username -> password for the coordinator and every enrolled device.

    Also points the coordinator's own config at its password file if it has none yet.
    """
    sec = coordinator.home / "secrets"
    own = sec / "coordinator.password"
    users = {coordinator.config.username: _password(own)}
    if not coordinator.config.password_file:
        coordinator.update_config(password_file=str(own.resolve()))
    for dev in coordinator.registry.devices():
        if dev.device_id in users:
            raise ValueError(f"device {dev.device_id!r} collides with the coordinator's username")
        if not dev.revoked:
            users[dev.device_id] = _password(sec / "devices" / f"{dev.device_id}.password")
    return users


def write_broker_config(
    coordinator: Coordinator,
    out: Path,
    *,
    port: int = 1883,
    bind: str = "127.0.0.1",
    run_as: str | None = None,
) -> BrokerFiles:
    """Write config, passwords and ACL into ``out``.

    The files are mode 0600 and owned by whoever runs this; mosquitto started as root drops
    to its ``mosquitto`` user unless ``run_as`` names the owner (e.g. ``root``)."""
    out.mkdir(parents=True, exist_ok=True)
    users = credentials(coordinator)
    if not coordinator.config.broker:  # `serve` and `model release` then need no --broker
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
        coordinator.update_config(broker=f"mqtt://{host}:{port}")
    pw = mosquitto_password_file(out / "passwd", users)
    acl = out / "acl"
    atomic_write(acl, edgefleet_acl(coordinator.config.username).encode(), mode=0o600)
    conf = out / "mosquitto.conf"
    (out / "data").mkdir(exist_ok=True)
    atomic_write(
        conf,
        mosquitto_config(
            port=port,
            data_dir=out / "data",
            password_file=Path(pw),
            acl_file=acl,
            bind=bind,
            user=run_as,
        ).encode(),
    )
    return BrokerFiles(conf, Path(pw), acl, users)
