"""Fleet set-up on disk: a coordinator home, enrolled agent homes, broker credentials.

The same steps as ``edgefleet coordinator init`` / ``model register`` / ``agent init`` /
``coordinator enroll`` / ``broker-config``, done in-process. Tests, ``bench/`` and the demo
all build their fleets here, so there is one copy of fleet set-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.agent.config import AgentConfig
from edgefleet.agent.identity import DeviceIdentity
from edgefleet.agent.provision import provision
from edgefleet.coordinator.brokerconf import credentials
from edgefleet.coordinator.home import Coordinator
from edgefleet.infra.fsutil import atomic_write
from edgefleet.protocol.keys import KEM_X25519, decode_public_key

__all__ = ["FleetHomes", "ModelFile", "enroll_device", "point_agents_at", "provision_fleet"]


@dataclass(frozen=True, kw_only=True)
class ModelFile:
    """A model to register: ``edgefleet model register --name NAME --file PATH --version V``."""

    name: str
    path: Path
    version: str


@dataclass(frozen=True, kw_only=True)
class FleetHomes:
    coordinator: Coordinator
    root_public: bytes
    homes: dict[str, Path]  # device id -> agent home
    identities: dict[str, DeviceIdentity]
    users: dict[str, str]  # broker username -> password (coordinator and every device)


def enroll_device(
    coordinator: Coordinator, home: Path, device_id: str, *, kem: str = KEM_X25519, **config: Any
) -> DeviceIdentity:
    """``edgefleet agent init`` in ``home`` (keys made there, the root key pinned) followed by
    ``edgefleet coordinator enroll`` of its public keys."""
    root_public = decode_public_key((coordinator.home / "root.pub").read_bytes())
    identity = provision(home, device_id, root_public, kem=kem, **config)
    coordinator.enroll(identity.public())
    return identity


def provision_fleet(
    work: Path,
    devices: Iterable[str] | Mapping[str, str],
    *,
    models: Sequence[ModelFile] = (),
    segment_size: int | None = None,  # bytes of plaintext per segment; None = the default
    now: int | None = None,  # unix seconds the coordinator's keys are made at
    coordinator_home: Path | None = None,
    database: str = "",  # SQLAlchemy URL of the registry; "" = SQLite in the home
    **agent_config: Any,
) -> FleetHomes:
    """A coordinator in ``work/coordinator`` (or ``coordinator_home``) with ``models``
    registered, and one enrolled agent home per device in ``work/<device>``.

    ``devices`` may map each device id to its KEM (``protocol.keys.KEM_*``).
    """
    kems = dict(devices) if isinstance(devices, Mapping) else dict.fromkeys(devices, KEM_X25519)
    c = Coordinator.init(coordinator_home or work / "coordinator", database=database, now=now)
    if segment_size is not None:
        c.update_config(segment_size=segment_size)
    for m in models:
        c.register_model(m.name, m.path, version=m.version)
    homes = {dev: work / dev for dev in kems}
    identities = {
        dev: enroll_device(c, homes[dev], dev, kem=kem, **agent_config) for dev, kem in kems.items()
    }
    return FleetHomes(
        coordinator=c,
        root_public=decode_public_key((c.home / "root.pub").read_bytes()),
        homes=homes,
        identities=identities,
        users=credentials(c),
    )


def point_agents_at(
    coordinator: Coordinator, homes: Mapping[str, Path], url: str, protocol: int
) -> None:
    """Write the broker URL, protocol and each device's password file (made by
    ``broker-config``'s credentials) into its agent.toml, and the broker into the
    coordinator's config."""
    coordinator.update_config(broker=url, mqtt_protocol=protocol)
    secrets = coordinator.home / "secrets" / "devices"
    for dev, home in homes.items():
        cfg = dataclasses.replace(
            AgentConfig.load(home),
            broker=url,
            mqtt_protocol=protocol,
            password_file=str((secrets / f"{dev}.password").resolve()),
        )
        atomic_write(home / "agent.toml", cfg.to_toml().encode())
