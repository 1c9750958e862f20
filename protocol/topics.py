"""MQTT topic names (prefix ``ef/v1``), filters, routing and the broker ACL. Pure.

``Topic`` (a concrete name) and ``Filter`` (a subscription, ``+``/``#`` wildcards and the shared
form ``$share/<group>/<filter>``) are frozen, validated value objects with pure matching
(MQTT 5 §4.7, §4.8.2). The string helpers below (``release``, ``chunk``, ...) build on them and
return ``str`` because that is what the links take.

Each device lives in its own subtree, so a mosquitto ACL ``pattern`` with ``%u`` (the device
id is the broker username) confines it: it reads ``release``, ``chunk``, ``cmd`` and ``fl`` and
writes exactly its four upstream topics (``up/status``, ``up/chunkreq``, ``up/telemetry``,
``up/fl``). ``acl()`` is that ACL as data: ``edgefleet.infra.broker`` renders it for mosquitto
(an ``acl_file``, or one dynamic-security role per device) and the in-memory broker evaluates
it with ``allowed()`` and ``may_subscribe()``, so every broker enforces the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from ._fields import NAME_RE

__all__ = [
    "KINDS",
    "PREFIX",
    "SHARE_GROUP",
    "Access",
    "AclRule",
    "Filter",
    "Route",
    "Topic",
    "acl",
    "allowed",
    "chunk",
    "chunk_requests_shared",
    "cmd",
    "device_client_id",
    "device_of",
    "fl",
    "may_subscribe",
    "release",
    "route",
    "up",
    "up_all",
]

PREFIX = "ef/v1"
SHARE_GROUP = "edgefleet-coord"
MAX_TOPIC_BYTES = 65_535  # MQTT: a UTF-8 string with a 2-byte length

DOWN_KINDS = ("release", "chunk", "cmd", "fl")  # coordinator -> device (fl: Flower messages)
UP_KINDS = ("status", "chunkreq", "telemetry", "fl")  # device -> coordinator, under up/
#: every per-device topic kind: the suffix after ``ef/v1/dev/<id>/``
KINDS = (*DOWN_KINDS, *(f"up/{k}" for k in UP_KINDS))

Access = Literal["read", "write", "readwrite"]
_SHARE = "$share/"


def _check_name(value: str, what: str) -> bytes:
    """Rules common to topic names and filters; the UTF-8 encoding."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must be non-empty")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} {value!r:.80} is not valid UTF-8: {exc.reason}") from exc
    if len(encoded) > MAX_TOPIC_BYTES:
        raise ValueError(f"{what} is {len(encoded)} bytes; MQTT allows {MAX_TOPIC_BYTES}")
    if "\0" in value:
        raise ValueError(f"{what} {value!r:.80} contains NUL")
    return encoded


@dataclass(frozen=True, kw_only=True)
class Topic:
    """A concrete topic name: what a message is published to (no wildcards)."""

    value: str

    def __post_init__(self) -> None:
        _check_name(self.value, "topic")
        if "+" in self.value or "#" in self.value:
            raise ValueError(f"topic {self.value!r:.80} must not contain the wildcards + or #")

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.value.split("/"))

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, kw_only=True)
class Filter:
    """A subscription filter; ``$share/<group>/<filter>`` is a shared subscription."""

    value: str

    def __post_init__(self) -> None:
        _check_name(self.value, "filter")
        inner = self.value
        if self.value.startswith(_SHARE):
            group, sep, inner = self.value[len(_SHARE) :].partition("/")
            if not group or not sep or "+" in group or "#" in group:
                raise ValueError(
                    f"shared filter {self.value!r:.80}: expected $share/<group>/<filter> with "
                    "a non-empty group without + or #"
                )
            if not inner:
                raise ValueError(f"shared filter {self.value!r:.80} has an empty filter")
        levels = inner.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError(f"filter {self.value!r:.80}: # must be the whole last level")
            if "+" in level and level != "+":
                raise ValueError(f"filter {self.value!r:.80}: + must be a whole level")

    @property
    def group(self) -> str | None:
        """The share group of a ``$share/...`` filter, else None."""
        if not self.value.startswith(_SHARE):
            return None
        return self.value[len(_SHARE) :].partition("/")[0]

    @property
    def filter(self) -> str:
        """The filter proper: without the ``$share/<group>/`` prefix."""
        if not self.value.startswith(_SHARE):
            return self.value
        return self.value[len(_SHARE) :].partition("/")[2]

    @property
    def wildcard(self) -> bool:
        return "+" in self.filter or "#" in self.filter

    def matches(self, topic: Topic | str) -> bool:
        """True if a message published to ``topic`` matches this filter (shared or not).

        A leading wildcard does not match a topic that starts with ``$`` (MQTT 5 §4.7.2).
        """
        name = topic.value if isinstance(topic, Topic) else Topic(value=topic).value
        pattern = self.filter.split("/")
        if name.startswith("$") and pattern[0] in ("+", "#"):
            return False
        levels = name.split("/")
        for i, level in enumerate(pattern):
            if level == "#":
                return True  # also matches the parent level: a/# matches a
            if i >= len(levels) or (level != "+" and level != levels[i]):
                return False
        return len(pattern) == len(levels)

    def __str__(self) -> str:
        return self.value


# -- EdgeFleet's topics -----------------------------------------------------------------------


def _device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not NAME_RE.fullmatch(device_id):
        raise ValueError(f"device id {device_id!r} must match {NAME_RE.pattern}")
    return device_id


def device_topic(device_id: str, kind: str) -> Topic:
    """``ef/v1/dev/<device_id>/<kind>`` for one of ``KINDS``."""
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind {kind!r}; expected one of {KINDS}")
    return Topic(value=f"{PREFIX}/dev/{_device_id(device_id)}/{kind}")


def release(device_id: str) -> str:
    """Retained: the device's current release offer (manifest, signature, keyring, envelope)."""
    return device_topic(device_id, "release").value


def chunk(device_id: str) -> str:
    """Chunk replies for this device."""
    return device_topic(device_id, "chunk").value


def cmd(device_id: str) -> str:
    return device_topic(device_id, "cmd").value


def fl(device_id: str) -> str:
    """Coordinator -> device: federated-learning (Flower) messages."""
    return device_topic(device_id, "fl").value


def device_client_id(device_id: str) -> str:
    """The one MQTT client id a device's broker account may use (``agent-<id>``)."""
    return f"agent-{_device_id(device_id)}"


def up(device_id: str, kind: str) -> str:
    """Device -> coordinator: ``status`` (retained), ``chunkreq``, ``telemetry``, ``fl``."""
    if kind not in UP_KINDS:
        raise ValueError(f"unknown upstream kind {kind!r}")
    return device_topic(device_id, f"up/{kind}").value


def up_all_filter(kind: str) -> Filter:
    if kind not in UP_KINDS:
        raise ValueError(f"unknown upstream kind {kind!r}")
    return Filter(value=f"{PREFIX}/dev/+/up/{kind}")


def up_all(kind: str) -> str:
    """Every device's ``up/<kind>`` topic."""
    return up_all_filter(kind).value


def chunk_requests_shared() -> str:
    """What coordinators subscribe to so that they share the chunk load."""
    return Filter(value=f"{_SHARE}{SHARE_GROUP}/{up_all('chunkreq')}").value


@dataclass(frozen=True, kw_only=True)
class Route:
    """Where a per-device topic leads: the device and one of ``KINDS``."""

    device_id: str
    kind: str

    def __post_init__(self) -> None:
        device_topic(self.device_id, self.kind)  # validates both


def route(topic: str) -> Route | None:
    """The ``Route`` of ``ef/v1/dev/<id>/<kind>`` for a known kind, else None."""
    where = device_of(topic)
    if where is None or where[1] not in KINDS:
        return None
    return Route(device_id=where[0], kind=where[1])


def device_of(topic: str) -> tuple[str, str] | None:
    """``(device_id, rest)`` for a topic under ``ef/v1/dev/<id>/``, else ``None``."""
    parts = topic.split("/", 4)
    if len(parts) < 5 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] != "dev":
        return None
    if not NAME_RE.fullmatch(parts[3]):
        return None
    return parts[3], parts[4]


# -- the broker ACL ---------------------------------------------------------------------------

_GRANTS: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "write": frozenset({"write"}),
    "readwrite": frozenset({"read", "write"}),
}


def _check_user(user: str) -> None:
    if not isinstance(user, str) or not user or any(c.isspace() or c in "#+/" for c in user):
        raise ValueError(f"bad ACL username {user!r}: non-empty, no whitespace, no # + /")


@dataclass(frozen=True, kw_only=True)
class AclRule:
    """One mosquitto ``acl_file`` rule.

    ``user=None`` is a ``pattern`` rule for every user, where ``%u`` in ``filter`` stands for the
    username; otherwise a ``topic`` rule under ``user <name>``.
    """

    user: str | None
    access: Access
    filter: str

    def __post_init__(self) -> None:
        if self.user is not None:
            _check_user(self.user)
            if "%u" in self.filter:
                raise ValueError(f"%u only works in pattern rules (user=None): {self.filter!r}")
        if self.access not in get_args(Access):
            raise ValueError(f"access must be one of {get_args(Access)}, got {self.access!r}")
        if any(c in self.filter for c in "\r\n"):
            raise ValueError(f"ACL filter {self.filter!r} contains a newline")
        filt = Filter(value=self.filter.replace("%u", "user"))  # validates the shape
        if filt.group is not None:
            raise ValueError(f"ACL filters name topics, not $share subscriptions: {self.filter!r}")


def acl(coordinator_user: str = "coordinator") -> list[AclRule]:
    """The EdgeFleet broker ACL: devices confined to their subtree, the coordinator everywhere.

    A device (broker username = device id) reads its own ``release``, ``chunk``, ``cmd`` (and
    below ``cmd/``) and ``fl``, and writes exactly its own ``up/<kind>`` topics for
    ``UP_KINDS``: nothing else under ``up/``, so it cannot retain data on topics nobody reads.
    Only the coordinator writes releases, chunks, commands and FL messages; it reads and writes
    all of ``ef/v1/`` (and may join its ``$share`` group, see ``may_subscribe``).
    """
    _check_user(coordinator_user)
    own = f"{PREFIX}/dev/%u"
    return [
        *(AclRule(user=None, access="read", filter=f"{own}/{kind}") for kind in DOWN_KINDS[:3]),
        AclRule(user=None, access="read", filter=f"{own}/cmd/#"),
        AclRule(user=None, access="read", filter=f"{own}/fl"),
        *(AclRule(user=None, access="write", filter=f"{own}/up/{kind}") for kind in UP_KINDS),
        AclRule(user=coordinator_user, access="readwrite", filter=f"{PREFIX}/#"),
    ]


def allowed(
    rules: Iterable[AclRule],
    user: str | None,
    access: Literal["read", "write"],
    topic: Topic | str,
) -> bool:
    """Whether ``user`` (None = anonymous) may ``access`` ``topic`` under ``rules``.

    mosquitto 2.0 ``acl_file`` semantics: allowed if any rule for this user, or any pattern
    with ``%u`` replaced by the username, grants the access and its filter matches; nothing
    else is. A pattern with ``%u`` never applies to an anonymous client, and a username
    containing ``+`` or ``#`` is denied everything (mosquitto's "dangerous username").
    """
    if access not in ("read", "write"):
        raise ValueError(f"access must be 'read' or 'write', got {access!r}")
    name = topic if isinstance(topic, Topic) else Topic(value=topic)
    if user is not None and ("+" in user or "#" in user):
        return False
    for rule in rules:
        if access not in _GRANTS[rule.access]:
            continue
        if rule.user is not None:
            if rule.user != user:
                continue
            pattern = rule.filter
        elif "%u" in rule.filter:
            if user is None:
                continue
            pattern = rule.filter.replace("%u", user)
        else:
            pattern = rule.filter
        try:
            if Filter(value=pattern).matches(name):
                return True
        except ValueError:  # a username that makes the pattern malformed matches nothing
            continue
    return False


def _covers(pattern: str, wanted: str) -> bool:
    """Whether an ACL ``pattern`` covers the subscription filter ``wanted`` level by level.

    mosquitto 2.0.11's dynamic-security ``subscribePattern`` semantics (checked on 2.0.11): a
    ``+`` or ``#`` in ``wanted`` is only covered by a wildcard at that level of ``pattern``
    (``#`` only by ``#``), so ``ef/v1/dev/+/chunk`` is not covered by ``ef/v1/dev/a/#``.
    """
    have, want = pattern.split("/"), wanted.split("/")
    for i, level in enumerate(have):
        if level == "#":
            return True
        if i >= len(want) or want[i] == "#" or (level != "+" and level != want[i]):
            return False
    return len(have) == len(want)


def may_subscribe(rules: Iterable[AclRule], user: str | None, wanted: Filter | str) -> bool:
    """Whether the hardened broker grants ``user`` a SUBSCRIBE to ``wanted``.

    mosquitto's ``acl_file`` grants every SUBSCRIBE and checks only deliveries; the generated
    broker config uses the dynamic-security plugin, which checks the filter as sent, ``$share``
    prefix included (checked on 2.0.11). Rendered from the same rules: a filter is granted if a
    rule giving ``user`` read access covers it (a rule without wildcards only its exact
    filter). A ``$share/<group>/...`` filter is granted only to a named user (the coordinator)
    whose rule covers the inner filter, and only for ``SHARE_GROUP``: a device can never join
    the coordinators' group, so it cannot swallow their chunk requests.
    """
    filt = wanted if isinstance(wanted, Filter) else Filter(value=wanted)
    if user is None or "+" in user or "#" in user:
        return False
    if filt.group is not None and filt.group != SHARE_GROUP:
        return False
    for rule in rules:
        if "read" not in _GRANTS[rule.access]:
            continue
        if rule.user is None:
            if filt.group is not None:
                continue
            pattern = rule.filter.replace("%u", user)
        elif rule.user == user:
            pattern = rule.filter
        else:
            continue
        if "+" in pattern or "#" in pattern:
            if _covers(pattern, filt.filter):
                return True
        elif pattern == filt.filter:
            return True
    return False
