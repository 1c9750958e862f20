"""``edgefleet coordinator broker-config``: a locked-down mosquitto set-up for the fleet.

Writes ``mosquitto.conf`` (no anonymous access, persistence, per-client bounds from
``BrokerLimits``) and ``dynamic-security.json``, the state of mosquitto's dynamic-security
plugin: an admin account (``edgefleet-admin``, only ``$CONTROL``), the coordinator's account
(any client id, so several ``coordinator serve`` and ``model release`` run side by side under
their own ``coordinator-<host>-<pid>`` / ``release-<pid>`` ids) and one account and role per
enrolled device, pinned to the client id ``agent-<id>`` (no device can take another client's
id) and confined to its own topics (no ``$share``, no wildcards outside its subtree).

Passwords are made once and kept under ``<home>/secrets/`` (mode 0600): hand
``secrets/devices/<id>.password`` to the device (its ``password_file`` setting). While the
broker runs, ``enroll``/``revoke`` update it through the plugin (``sync_enrolled`` /
``sync_revoked``): a revoked device is disconnected at once and refused from then on.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.infra.broker import (
    DYNSEC_TOPIC,
    BrokerLimits,
    dynsec_enroll_commands,
    dynsec_revoke_commands,
    dynsec_state,
    mosquitto_config,
)
from edgefleet.infra.fsutil import atomic_write
from edgefleet.protocol import topics
from edgefleet.protocol.errors import TransportError

from .home import Coordinator

__all__ = [
    "ADMIN_USER",
    "BrokerFiles",
    "admin_password",
    "credentials",
    "root_user",
    "sync_enrolled",
    "sync_revoked",
    "write_broker_config",
]

log = logging.getLogger(__name__)

ADMIN_USER = "edgefleet-admin"  # the plugin's admin account: $CONTROL only, no fleet topics
_RESPONSE = f"{DYNSEC_TOPIC}/response"


@dataclass(frozen=True)
class BrokerFiles:
    config: Path
    dynsec: Path  # the plugin's state; mosquitto rewrites it on every change
    users: dict[str, str]  # username -> password (secret; for tests and the demo)
    run_as: str | None = None  # the `user` line written, if any


def _password(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, secrets.token_urlsafe(24).encode(), mode=0o600)
    return path.read_text().strip()


def admin_password(coordinator: Coordinator) -> str:
    return _password(coordinator.home / "secrets" / "broker-admin.password")


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
        if dev.device_id in users or dev.device_id == ADMIN_USER:
            raise ValueError(f"device {dev.device_id!r} collides with a broker username")
        if not dev.revoked:
            users[dev.device_id] = _password(sec / "devices" / f"{dev.device_id}.password")
    return users


def root_user() -> str | None:
    """Our account name if we run as root: mosquitto started as root drops to its own
    ``mosquitto`` user, which cannot read the 0600 files we write (it exits with "Unable to
    open pwfile"), so the generated config keeps it on ours instead."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    return pwd.getpwuid(0).pw_name


def write_broker_config(
    coordinator: Coordinator,
    out: Path,
    *,
    port: int = 1883,
    bind: str = "127.0.0.1",
    run_as: str | None = None,
    limits: BrokerLimits | None = None,
) -> BrokerFiles:
    """Write ``mosquitto.conf`` and ``dynamic-security.json`` into ``out``.

    The files are mode 0600 and owned by whoever runs this; started as root, mosquitto would
    drop to its ``mosquitto`` user, so unless ``run_as`` names another account the config then
    says ``user root`` (see ``root_user``)."""
    out.mkdir(parents=True, exist_ok=True)
    users = credentials(coordinator)
    if not coordinator.config.broker:  # `serve` and `model release` then need no --broker
        host = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
        coordinator.update_config(broker=f"mqtt://{host}:{port}")
    me = coordinator.config.username
    state = dynsec_state(
        admin=(ADMIN_USER, admin_password(coordinator)),
        users={me: users[me]},
        devices={u: pw for u, pw in users.items() if u != me},
        rules=topics.acl(me),
    )
    dynsec = out / "dynamic-security.json"
    atomic_write(dynsec, json.dumps(state, indent=1).encode(), mode=0o600)
    conf = out / "mosquitto.conf"
    (out / "data").mkdir(exist_ok=True)
    run_as = run_as or root_user()
    atomic_write(
        conf,
        mosquitto_config(
            port=port,
            data_dir=out / "data",
            dynsec_file=dynsec,
            bind=bind,
            user=run_as,
            limits=limits or BrokerLimits(),
        ).encode(),
        mode=0o600,
    )
    return BrokerFiles(conf, dynsec, users, run_as)


# -- the running broker ------------------------------------------------------------------------

LinkMaker = Callable[..., Any]  # an infra.link LinkFactory


def sync_enrolled(coordinator: Coordinator, device_id: str, **kw: Any) -> str:
    """Give an enrolled device its broker account now; one line saying what happened."""
    password = _password(coordinator.home / "secrets" / "devices" / f"{device_id}.password")
    rules = topics.acl(coordinator.config.username)
    return _sync(
        coordinator,
        dynsec_enroll_commands(rules, device_id, password),
        f"broker: {device_id} may connect as client {topics.device_client_id(device_id)}",
        "is not allowed to connect yet",
        **kw,
    )


def sync_revoked(coordinator: Coordinator, device_id: str, **kw: Any) -> str:
    """Remove a revoked device's broker account now (its live session is closed)."""
    return _sync(
        coordinator,
        dynsec_revoke_commands(device_id),
        f"broker: {device_id} disconnected and refused from now on",
        "keeps its broker access",
        **kw,
    )


def _sync(
    coordinator: Coordinator,
    commands: list[dict[str, Any]],
    done: str,
    not_done: str,
    *,
    link_factory: LinkMaker | None = None,
    timeout: float = 10.0,  # s
) -> str:
    device = str(commands[0].get("username") or commands[-1].get("username"))
    admin_file = coordinator.home / "secrets" / "broker-admin.password"
    fix = (
        f"run `edgefleet coordinator broker-config --home {coordinator.home}` and restart "
        "mosquitto with it"
    )
    if not coordinator.config.broker or not admin_file.exists():
        return f"broker: not managed here (no broker-config yet): {device} {not_done}; {fix}"
    try:
        answers = _control(coordinator, commands, link_factory=link_factory, timeout=timeout)
    except TransportError as exc:
        return f"broker not updated ({exc}): {device} {not_done}; {fix}"
    failed = [
        f"{a.get('command')}: {a['error']}"
        for a in answers
        if a.get("error") and not (a.get("command", "").startswith("delete") and _absent(a))
    ]
    if failed:
        return f"broker refused ({'; '.join(failed)}): {device} {not_done}; {fix}"
    log.info("%s", done)
    return done


def _absent(answer: dict[str, Any]) -> bool:
    return "not found" in str(answer.get("error", "")).lower()


def _control(
    coordinator: Coordinator,
    commands: list[dict[str, Any]],
    *,
    link_factory: LinkMaker | None,
    timeout: float,
) -> list[dict[str, Any]]:
    """Send plugin commands as the admin account; the plugin's per-command answers."""
    from edgefleet.infra.link import MqttConfig

    cfg = coordinator.config
    mqtt = MqttConfig(
        url=cfg.broker,
        client_id=f"{ADMIN_USER}-{os.getpid()}",
        username=ADMIN_USER,
        password=admin_password(coordinator),
        tls_ca=Path(cfg.tls_ca) if cfg.tls_ca else None,
        protocol=5 if cfg.mqtt_protocol == 5 else 311,
        clean_start=True,
        session_expiry=0,
        reconnect_min=0.2,
        reconnect_max=1.0,
    )
    corr = secrets.token_hex(8)
    tagged = [{**c, "correlationData": f"{corr}-{i}"} for i, c in enumerate(commands)]
    got: dict[str, dict[str, Any]] = {}
    cond = threading.Condition()

    def on_message(topic: str, payload: bytes, _props: object) -> None:
        try:
            answers = json.loads(payload).get("responses", [])
        except (ValueError, AttributeError):
            return
        with cond:
            for a in answers:
                if isinstance(a, dict) and str(a.get("correlationData", "")).startswith(corr):
                    got[a["correlationData"]] = a
            cond.notify_all()

    if link_factory is None:
        from edgefleet.infra.link.mqtt import MqttLink

        link_factory = MqttLink
    link = link_factory(mqtt, on_message)
    acked = link.subscribe(_RESPONSE, qos=1)
    link.start()
    try:
        if not link.wait_connected(timeout) or not acked.wait(timeout):
            raise TransportError(f"cannot reach {cfg.broker}: {link.last_error or 'timed out'}")
        link.publish(DYNSEC_TOPIC, json.dumps({"commands": tagged}).encode(), qos=1)
        with cond:
            if not cond.wait_for(lambda: len(got) == len(tagged), timeout):
                raise TransportError(f"{cfg.broker} did not answer the dynamic-security commands")
        return [got[c["correlationData"]] for c in tagged]
    finally:
        link.stop()
