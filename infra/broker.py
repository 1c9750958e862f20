"""Embedded MQTT broker for demos and tests, and mosquitto configuration generators.

``EmbeddedBroker`` spawns the system ``mosquitto`` on a free loopback port with a generated
config (persistent sessions, password file, ACL). Without mosquitto it runs ``amqtt`` in-process:
MQTT 3.1.1 only, no ACLs, sessions lost on restart; demo only (ARCHITECTURE §4).

The hardened set-up that ``coordinator broker-config`` writes uses ``BrokerLimits`` (what
mosquitto may buffer per client, the largest packet) and mosquitto's dynamic-security plugin
instead of a password file and ``acl_file`` (``dynsec_state``): ``acl_file`` cannot refuse a
SUBSCRIBE (so a device could join the coordinators' ``$share`` group and swallow their chunk
requests), cannot bind a client id to an account (so a device could kick others off with their
ids), and changes only on a reload that leaves revoked clients connected. The plugin checks
SUBSCRIBE filters as sent (``$share/...`` included), pins each device account to its client id
``agent-<id>``, and takes ``createClient``/``deleteClient`` at run time over
``$CONTROL/dynamic-security/v1`` (``deleteClient`` disconnects the live session). mosquitto 2.0
cannot substitute ``%u`` in plugin ACLs, so each device gets its own role with its topics
spelled out, rendered from the same ``topics.acl()`` rules the ``acl_file`` is.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgefleet.protocol import topics
from edgefleet.protocol.errors import ConfigError
from edgefleet.protocol.messages import MAX_OFFER
from edgefleet.protocol.segments import MAX_SEGMENT

__all__ = [
    "ADMIN_ROLE",
    "CHUNK_FRAME_OVERHEAD",
    "DYNSEC_TOPIC",
    "MAX_PACKET",
    "BrokerLimits",
    "EmbeddedBroker",
    "TlsFiles",
    "dynsec_client",
    "dynsec_plugin",
    "dynsec_revoke_commands",
    "dynsec_role",
    "dynsec_state",
    "dynsec_enroll_commands",
    "edgefleet_acl",
    "mosquitto_config",
    "mosquitto_password_file",
]

log = logging.getLogger(__name__)

BrokerKind = Literal["mosquitto", "amqtt"]
_SBIN = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    ca: Path  # CA certificate (PEM) clients are verified against
    cert: Path  # server certificate (PEM)
    key: Path  # server private key (PEM)
    require_client_cert: bool = False


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


# -- password file ------------------------------------------------------------------------


def mosquitto_password_file(
    path: Path | str, users: Mapping[str, str], *, use_tool: bool = True
) -> Path:
    """Write a mosquitto password file (mode 0600) for ``users`` (username -> password).

    Uses ``mosquitto_passwd -U`` on a 0600 file when available (passwords never appear on a
    command line), else writes the same ``$7$`` PBKDF2-SHA512 format itself.
    """
    path = Path(path)
    for name in users:
        if not name or any(c in name for c in ":\n\r"):
            raise ValueError(f"bad username {name!r}: must be non-empty without ':' or newlines")
    # mosquitto_passwd -U cuts a password at its first ':' (2.0.11); hash those ourselves.
    plain_ok = not any(c in pw for pw in users.values() for c in ":\r\n")
    tool = _which("mosquitto_passwd") if use_tool and plain_ok else None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for name, password in users.items():
            f.write(f"{name}:{password if tool else _pbkdf2_hash(password)}\n")
    if tool:
        try:
            subprocess.run([tool, "-U", str(path)], check=True, capture_output=True, timeout=30)
        except (subprocess.SubprocessError, OSError) as exc:
            path.unlink(missing_ok=True)  # do not leave plaintext behind
            raise RuntimeError(f"mosquitto_passwd -U failed: {exc}") from exc
    return path


def _pbkdf2_hash(password: str, *, salt: bytes | None = None, iterations: int = 101) -> str:
    """mosquitto 2.0's ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>`` format."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


# -- limits ---------------------------------------------------------------------------------

#: bytes a chunk reply frame adds to its segment: 16-byte GCM tag and a JSON header under 2 KiB
#: (agent.daemon.MAX_CHUNK_FRAME = MAX_SEGMENT + CHUNK_FRAME_OVERHEAD)
CHUNK_FRAME_OVERHEAD = 16 + 2048
#: bytes: the largest legitimate MQTT packet. A chunk frame of the largest segment the protocol
#: allows (4 MiB, larger than an offer's 2 MiB cap) plus its header, plus the MQTT fixed header,
#: topic and v5 properties (1 KiB, infra.link.config.HEADER_ALLOWANCE), rounded up to 8 KiB of
#: headroom. Equal to or above what an agent announces as its own maximum (MAX_INCOMING).
MAX_PACKET = max(MAX_SEGMENT + CHUNK_FRAME_OVERHEAD, MAX_OFFER) + 8 * 1024


@dataclass(frozen=True, kw_only=True)
class BrokerLimits:
    """What the generated mosquitto config lets one client make the broker hold.

    Per client, mosquitto 2.0.11 holds at most ``max_inflight_bytes + max_queued_bytes`` of
    QoS 1 messages and ``max_queued_messages`` QoS 0 packets (it counts QoS 0 deliveries to a
    connected client by number only; checked on 2.0.11), each at most ``max_packet_size``.
    """

    # bytes; a larger packet from any client closes its connection before mosquitto reads
    # the payload (announced to MQTT 5 clients in CONNACK, so MqttLink refuses it locally)
    max_packet_size: int = MAX_PACKET
    # messages queued per client beyond those in flight (mosquitto's own default): a device
    # has a window of 8 chunk requests outstanding; the coordinator's status backlog is the
    # large user. Past it mosquitto drops and logs "Outgoing messages are being dropped".
    max_queued_messages: int = 1000
    # bytes of QoS 1 queued per client beyond those in flight: eight of the largest packets
    # (offers for an offline device, the coordinator's backlog of <= 16 KiB statuses)
    max_queued_bytes: int = 8 * MAX_PACKET
    max_inflight_messages: int = 20  # unacknowledged QoS 1 per client (mosquitto's default)
    max_inflight_bytes: int = 2 * MAX_PACKET  # bytes of unacknowledged QoS 1 per client
    # bytes of payload; 0 = none. max_packet_size already bounds every publish and is checked
    # before the payload is read, so the generated config leaves this off.
    message_size_limit: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.max_packet_size <= 268_435_455:
            raise ValueError(f"max_packet_size must be 1..268435455, got {self.max_packet_size}")
        counts = (self.max_queued_messages, self.max_queued_bytes, self.max_inflight_messages,
                  self.max_inflight_bytes, self.message_size_limit)  # fmt: skip
        if any(not isinstance(n, int) or n < 0 for n in counts):
            raise ValueError(f"broker limits must be integers >= 0, got {self}")

    @property
    def per_client_qos0(self) -> int:
        """Bytes of QoS 0 mosquitto may hold for one connected client that does not read."""
        return (self.max_queued_messages + self.max_inflight_messages) * self.max_packet_size

    @property
    def per_client_qos1(self) -> int:
        """Bytes of QoS 1 mosquitto may hold for one client (in flight and queued)."""
        return self.max_inflight_bytes + self.max_queued_bytes

    def lines(self) -> list[str]:
        return [
            f"max_packet_size {self.max_packet_size}",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_inflight_bytes {self.max_inflight_bytes}",
            *([f"message_size_limit {self.message_size_limit}"] if self.message_size_limit else []),
        ]


# -- dynamic security -----------------------------------------------------------------------

DYNSEC_TOPIC = "$CONTROL/dynamic-security/v1"
ADMIN_ROLE = "edgefleet-admin"
_PLUGIN = "mosquitto_dynamic_security.so"
_PLUGIN_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib",
                "/usr/local/lib", "/opt/homebrew/lib", "/usr/lib/arm-linux-gnueabihf")  # fmt: skip


def dynsec_plugin() -> Path | None:
    """The installed dynamic-security plugin of mosquitto 2.0+, if any."""
    for d in _PLUGIN_DIRS:
        path = Path(d) / _PLUGIN
        if path.is_file():
            return path
    return None


def _role_name(user: str, *, device: bool) -> str:
    return f"edgefleet-{'device' if device else 'user'}-{user}"


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "priority": 0, "allow": True}


def dynsec_role(rules: list[topics.AclRule], user: str, *, device: bool) -> dict[str, Any]:
    """The plugin role for ``user``: a device gets the ``%u`` pattern rules spelled out with
    its id; a named user (the coordinator) its own rules, and may join ``topics.SHARE_GROUP``.

    Reads become ``publishClientReceive`` plus a subscribe rule (literal unless the filter
    has wildcards); writes become ``publishClientSend``. Subscribing is denied by default.
    """
    acls: list[dict[str, Any]] = []
    for rule in rules:
        if device != (rule.user is None) or (not device and rule.user != user):
            continue
        filt = rule.filter.replace("%u", user)
        if rule.access in ("read", "readwrite"):
            wild = "+" in filt or "#" in filt
            acls.append(_acl("publishClientReceive", filt))
            acls.append(_acl("subscribePattern" if wild else "subscribeLiteral", filt))
            if not device:
                acls.append(_acl("subscribePattern", f"$share/{topics.SHARE_GROUP}/{filt}"))
        if rule.access in ("write", "readwrite"):
            acls.append(_acl("publishClientSend", filt))
    return {"rolename": _role_name(user, device=device), "acls": acls}


def _admin_role() -> dict[str, Any]:
    own = f"{DYNSEC_TOPIC.rsplit('/', 1)[0]}/#"
    return {
        "rolename": ADMIN_ROLE,
        "acls": [
            _acl("publishClientSend", own),
            _acl("publishClientReceive", own),
            _acl("subscribePattern", own),
        ],
    }


def dynsec_client(
    username: str,
    password: str,
    *,
    role: str,
    client_id: str | None = None,
    salt: bytes | None = None,
    iterations: int = 101,
) -> dict[str, Any]:
    """A plugin client entry: PBKDF2-SHA512 as the plugin stores it (base64 hash and salt).

    ``client_id``: the only client id this account may connect with (None: any).
    """
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    entry: dict[str, Any] = {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": iterations,
        "roles": [{"rolename": role, "priority": 0}],
    }
    if client_id is not None:
        entry["clientid"] = client_id
    return entry


def dynsec_state(
    *,
    admin: tuple[str, str],
    users: Mapping[str, str],
    devices: Mapping[str, str],
    rules: list[topics.AclRule],
) -> dict[str, Any]:
    """The plugin's ``dynamic-security.json``: an admin account for ``$CONTROL`` only, named
    users (coordinators) with their rules and any client id, and every device with its own role
    and the one client id ``agent-<id>``. Everything not granted is denied."""
    clients = [dynsec_client(admin[0], admin[1], role=ADMIN_ROLE)]
    roles = [_admin_role()]
    for user, password in users.items():
        roles.append(dynsec_role(rules, user, device=False))
        clients.append(dynsec_client(user, password, role=roles[-1]["rolename"]))
    for device, password in devices.items():
        roles.append(dynsec_role(rules, device, device=True))
        clients.append(
            dynsec_client(
                device,
                password,
                role=roles[-1]["rolename"],
                client_id=topics.device_client_id(device),
            )  # fmt: skip
        )
    return {
        "clients": clients,
        "groups": [],
        "roles": roles,
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }


def dynsec_enroll_commands(
    rules: list[topics.AclRule], device: str, password: str
) -> list[dict[str, Any]]:
    """Plugin commands that (re)create a device's role and account; the deletes may fail
    with "not found" on a first enrolment."""
    role = dynsec_role(rules, device, device=True)
    return [
        *dynsec_revoke_commands(device),
        {"command": "createRole", **role},
        {
            "command": "createClient",
            "username": device,
            "password": password,
            "clientid": topics.device_client_id(device),
            "roles": [{"rolename": role["rolename"], "priority": 0}],
        },
    ]


def dynsec_revoke_commands(device: str) -> list[dict[str, Any]]:
    """Plugin commands that remove a device's account (disconnecting its session) and role."""
    return [
        {"command": "deleteClient", "username": device},
        {"command": "deleteRole", "rolename": _role_name(device, device=True)},
    ]


# -- ACL and config -----------------------------------------------------------------------


def edgefleet_acl(coordinator_user: str = "coordinator") -> str:
    """mosquitto ``acl_file`` text for ``topics.acl()``: devices confined to their own subtree.

    mosquitto 2.0 checks read access when it delivers a message (also retained ones), so a
    device may subscribe to a wildcard but only ever receives its own topics. The in-memory
    broker enforces the same rules with ``topics.allowed``.
    """
    rules = topics.acl(coordinator_user)
    lines = [
        "# EdgeFleet ACL, generated by edgefleet.infra.broker.edgefleet_acl().",
        "# Devices: the broker username is the device id; %u confines each to its subtree.",
        *(f"pattern {r.access} {r.filter}" for r in rules if r.user is None),
        "",
    ]
    users = list(dict.fromkeys(r.user for r in rules if r.user is not None))
    if users:
        lines.append("# Per-user rules: the coordinator reads and writes the whole tree.")
    for user in users:
        lines.append(f"user {user}")
        lines += [f"topic {r.access} {r.filter}" for r in rules if r.user == user]
        lines.append("")
    return "\n".join(lines)


def mosquitto_config(
    *,
    port: int,
    data_dir: Path | str,
    password_file: Path | str | None = None,
    acl_file: Path | str | None = None,
    tls: TlsFiles | None = None,
    persistence: bool = True,
    bind: str = "127.0.0.1",
    max_queued_messages: int = 10_000,
    max_packet_size: int | None = None,
    message_size_limit: int | None = None,
    user: str | None = None,
    limits: BrokerLimits | None = None,
    dynsec_file: Path | str | None = None,
) -> str:
    """mosquitto 2.0 config text for one listener; state and log live in ``data_dir``.

    ``user``: the account mosquitto switches to when started as root (its default is
    ``mosquitto``, which cannot read files a root test run writes with mode 0600).
    ``limits``: per-client bounds (replace ``max_queued_messages`` and the size options).
    ``dynsec_file``: authenticate and authorize with the dynamic-security plugin and this
    state file (instead of ``password_file``/``acl_file``); ``ConfigError`` if not installed.
    """
    data_dir = Path(data_dir).resolve()
    plugin = None
    if dynsec_file is not None:
        if password_file is not None or acl_file is not None:
            raise ValueError("dynsec_file replaces password_file and acl_file; give one")
        plugin = dynsec_plugin()
        if plugin is None:
            raise ConfigError(
                f"mosquitto's dynamic-security plugin ({_PLUGIN}) is not installed in any of "
                f"{', '.join(_PLUGIN_DIRS)}; install mosquitto 2.0 or newer"
            )
    if limits is not None:
        max_queued_messages = limits.max_queued_messages
    paths = [data_dir, password_file, acl_file, dynsec_file, plugin,
             *(tls and (tls.ca, tls.cert, tls.key) or ())]  # fmt: skip
    if any(p is not None and any(c in str(p) for c in "\r\n") for p in paths):
        raise ValueError("paths in a mosquitto config must not contain newlines")
    lines = [
        "# Generated by edgefleet.infra.broker.mosquitto_config().",
        "per_listener_settings false",
        f"listener {int(port)} {bind}",
        "set_tcp_nodelay true",
        # Without a password file mosquitto 2.0 refuses everyone unless told otherwise.
        f"allow_anonymous {'false' if password_file or dynsec_file else 'true'}",
        # Default 1000: a QoS 1 subscriber ~1,020 behind loses messages. Chunk transfers are
        # windowed, so this only buys room for offline devices' status/cmd backlog.
        f"max_queued_messages {int(max_queued_messages)}",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {data_dir}{os.sep}",
        "autosave_interval 30",  # s; SIGTERM also saves
        f"log_dest file {data_dir / 'mosquitto.log'}",
        *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
        "connection_messages true",
    ]
    if user is not None:
        lines.append(f"user {user}")
    if limits is not None:
        lines += [line for line in limits.lines() if not line.startswith("max_queued_messages")]
        max_packet_size = message_size_limit = None
    if plugin is not None and dynsec_file is not None:
        lines.append(f"plugin {plugin}")
        lines.append(f"plugin_opt_config_file {Path(dynsec_file).resolve()}")
    if max_packet_size is not None:
        lines.append(f"max_packet_size {int(max_packet_size)}")  # announced in v5 CONNACK
    if message_size_limit is not None:
        lines.append(f"message_size_limit {int(message_size_limit)}")  # payload bytes
    if password_file is not None:
        lines.append(f"password_file {Path(password_file).resolve()}")
    if acl_file is not None:
        lines.append(f"acl_file {Path(acl_file).resolve()}")
    if tls is not None:
        lines += [
            f"cafile {tls.ca.resolve()}",
            f"certfile {tls.cert.resolve()}",
            f"keyfile {tls.key.resolve()}",
            f"require_certificate {'true' if tls.require_client_cert else 'false'}",
        ]
    return "\n".join(lines) + "\n"


# -- embedded broker ----------------------------------------------------------------------


class EmbeddedBroker:
    """A loopback broker for the demo and tests; a context manager.

    ``stop()`` keeps the data dir so ``restart()`` resumes on the same port with the same
    persisted sessions; leaving the ``with`` block also deletes a temporary data dir.
    """

    def __init__(
        self,
        *,
        data_dir: Path | str | None = None,
        users: Mapping[str, str] | None = None,
        acl: str | None = None,
        tls: TlsFiles | None = None,
        max_packet_size: int | None = None,
        persistence: bool = True,
        force_kind: BrokerKind | None = None,
        start_timeout: float = 10.0,  # s
    ) -> None:
        self._mosquitto = _which("mosquitto")
        if force_kind == "mosquitto" and self._mosquitto is None:
            raise RuntimeError("force_kind='mosquitto' but no mosquitto binary on PATH")
        self.kind: BrokerKind = force_kind or ("mosquitto" if self._mosquitto else "amqtt")
        self._owns_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="edgefleet-broker-"))
        self._users = dict(users or {})
        self._acl = acl
        self._tls = tls
        self._max_packet_size = max_packet_size
        self._persistence = persistence
        self._start_timeout = start_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._amqtt: _AmqttThread | None = None

    @property
    def protocol(self) -> Literal[5, 311]:
        """The MQTT version clients should speak: amqtt only knows 3.1.1."""
        return 5 if self.kind == "mosquitto" else 311

    @property
    def url(self) -> str:
        return f"{'mqtts' if self._tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        if self._proc is not None or self._amqtt is not None:
            raise RuntimeError("broker already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or _free_port()
        if self.kind == "mosquitto":
            self._start_mosquitto()
        else:
            self._amqtt = _AmqttThread(self._amqtt_config())
            self._amqtt.start(self._start_timeout)
        log.info("%s broker listening on %s", self.kind, self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            proc.terminate()  # mosquitto saves its persistence db on SIGTERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("mosquitto did not stop in %.1f s; killing it", timeout)
                proc.kill()
                proc.wait()
        if self._amqtt is not None:
            amqtt, self._amqtt = self._amqtt, None
            amqtt.stop(timeout)

    def restart(self) -> None:
        """Stop and start again on the same port with the same data dir.

        mosquitto keeps sessions, queued and retained messages; amqtt starts empty.
        """
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _start_mosquitto(self) -> None:
        assert self._mosquitto is not None
        pw_file = acl_file = None
        if self._users:
            pw_file = mosquitto_password_file(self.data_dir / "passwd", self._users)
        if self._acl is not None:
            acl_file = self.data_dir / "acl"
            acl_file.write_text(self._acl, encoding="utf-8")
        conf = self.data_dir / "mosquitto.conf"
        conf.write_text(
            mosquitto_config(
                port=self.port,
                data_dir=self.data_dir,
                password_file=pw_file,
                acl_file=acl_file,
                tls=self._tls,
                persistence=self._persistence,
                max_packet_size=self._max_packet_size,
                user=_current_user_if_root(),
            ),
            encoding="utf-8",
        )
        log_file = self.data_dir / "mosquitto.log"
        log_offset = log_file.stat().st_size if log_file.exists() else 0
        with open(self.data_dir / "mosquitto.stderr", "wb") as stderr:
            self._proc = subprocess.Popen(
                [self._mosquitto, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
            )
        self._wait_listening(log_offset)

    def _wait_listening(self, log_offset: int) -> None:
        """Poll until this mosquitto logged "running" and the port accepts connections.

        The log line proves the listener is ours: a stranger on the port makes mosquitto exit.
        """
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            if " running" in self._read_log(log_offset) and _accepts(self.port):
                return
            try:  # doubles as the poll interval
                code = self._proc.wait(0.02)
            except subprocess.TimeoutExpired:
                continue
            self._proc = None
            raise RuntimeError(
                f"mosquitto exited with {code} on port {self.port}: {self._log_tail()}"
            )
        self.stop()
        raise RuntimeError(
            f"mosquitto did not listen on port {self.port} within "
            f"{self._start_timeout} s: {self._log_tail()}"
        )

    def _read_log(self, offset: int = 0) -> str:
        try:
            with open(self.data_dir / "mosquitto.log", "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self) -> str:
        tails = []
        for name in ("mosquitto.stderr", "mosquitto.log"):
            try:
                tails.append((self.data_dir / name).read_text(errors="replace")[-1000:].strip())
            except OSError:
                pass
        return " | ".join(t for t in tails if t) or "(no log)"

    def _amqtt_config(self) -> dict[str, Any]:
        if self._acl is not None:
            log.warning(
                "amqtt cannot enforce the EdgeFleet ACL: every user may read and "
                "write every topic (demo only)"
            )
        listener: dict[str, Any] = {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}
        if self._tls is not None:
            listener.update(
                ssl=True,
                cafile=str(self._tls.ca),
                certfile=str(self._tls.cert),
                keyfile=str(self._tls.key),
            )
        auth: dict[str, Any] = {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
        }
        if self._users:
            auth = {
                "amqtt.plugins.authentication.FileAuthPlugin": {
                    "password_file": str(self._amqtt_password_file())
                }
            }
        return {"listeners": {"default": listener}, "plugins": auth}

    def _amqtt_password_file(self) -> Path:
        # amqtt 0.11 (pinned: 0.12 conflicts with flwr over typer) checks passwords with
        # passlib's custom_app_context (sha256_crypt/sha512_crypt), its own dependency.
        from passlib.apps import custom_app_context as hasher

        path = self.data_dir / "amqtt-passwd"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for name, password in self._users.items():
                f.write(f"{name}:{hasher.hash(password)}\n")
        return path


class _AmqttThread:
    """amqtt's asyncio broker on its own event loop in a daemon thread."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="amqtt-broker", daemon=True
        )
        self._broker: Any = None
        self._writers: set[asyncio.StreamWriter] = set()  # live client connections

    def start(self, timeout: float) -> None:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout)
        except BaseException:
            self.stop(timeout)
            raise

    async def _start(self) -> None:
        from amqtt.broker import Broker  # coordinator extra; imported only when needed

        writers = self._writers

        class _TrackingBroker(Broker):  # type: ignore[misc]
            async def stream_connected(
                self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
            ) -> None:
                writers.add(writer)
                try:
                    await super().stream_connected(reader, writer, listener_name)
                finally:
                    writers.discard(writer)

        self._broker = _TrackingBroker(self._config)
        await self._broker.start()

    async def _shutdown(self, timeout: float) -> None:
        # amqtt 0.12's shutdown() hangs now and then while a client is still connected (a
        # handler waits for its cancelled reader). Drop the connections first, as a killed
        # mosquitto would; the clients see the broker go away and reconnect later.
        for writer in list(self._writers):
            writer.transport.abort()
        try:
            await asyncio.wait_for(self._broker.shutdown(), timeout)
        finally:  # stop listening whatever shutdown() did (amqtt 0.11 can be cancelled midway)
            for server in getattr(self._broker, "_servers", {}).values():
                instance = getattr(server, "instance", None)
                if instance is not None:
                    instance.close()

    def stop(self, timeout: float) -> None:
        if self._broker is not None:
            future = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self._loop)
            try:
                future.result(timeout + 1)
            except Exception:
                log.warning("amqtt broker did not shut down cleanly", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()


def _current_user_if_root() -> str | None:
    """Keep a root-started embedded mosquitto as root so it can read our 0600 files."""
    if os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
