"""The one release path (CLI, service, demo, HTTP API): build, then publish the offers.

``build`` signs a new sequence and wraps the content key per target (the bundler is
``Coordinator.build``); ``publish`` puts every target's offer, retained at QoS 1, on its
release topic through any ``Link`` and waits for the broker's acknowledgements in batches;
``release`` does both. Publishing the same release twice is harmless: the offer is retained
and agents ignore a sequence they already run.

What the broker retains on a device's release topic is whatever was published last, while
sequences are taken before the (slow) build: two releases built at once can be published in
the "wrong" order. So after publishing, ``publish`` asks the registry for each target's newest
release and publishes that one's offer again where it is newer, until nothing newer turns up:
the retained offer is always the newest release targeting the device. (A release registered
after that last check is published after it, and does the same check itself.)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from edgefleet.infra.link.mqtt import MqttConfig, MqttLink
from edgefleet.infra.link.port import Delivery, Link, LinkFactory, MessageProps
from edgefleet.protocol import topics
from edgefleet.protocol.build import BuiltRelease
from edgefleet.protocol.envelope import Envelope
from edgefleet.protocol.errors import TransportError
from edgefleet.protocol.messages import ReleaseOffer

from .home import Coordinator
from .registry import Registry, Release

__all__ = [
    "PUBLISH_BATCH",
    "PublishReport",
    "Released",
    "build",
    "connect",
    "keep_newest",
    "offers",
    "publish",
    "publish_sequence",
    "release",
]

log = logging.getLogger(__name__)

PUBLISH_BATCH = 200  # offers in flight before waiting for acks (paho queues at most 1000)
SUPERSEDE_ROUNDS = 8  # re-checks for newer releases after a publish, at most


@dataclass(frozen=True, kw_only=True)
class PublishReport:
    """What ``publish`` put on the broker: every offer here was acknowledged."""

    sequence: int
    devices: tuple[str, ...]  # sorted target ids
    bytes: int  # offer payload bytes
    batches: int
    republished: int = 0  # offers of newer releases published again over this one's


@dataclass(frozen=True, kw_only=True)
class Released:
    """A release built and published."""

    release: Release
    built: BuiltRelease
    report: PublishReport

    @property
    def sequence(self) -> int:
        return self.release.sequence

    @property
    def targets(self) -> tuple[str, ...]:
        return self.report.devices


def build(
    coordinator: Coordinator,
    name: str,
    version: str,
    selector: str,
    *,
    now: int | None = None,
    ttl: int | None = None,
) -> tuple[Release, BuiltRelease]:
    """Sign a new sequence of a registered model for the selected devices and record it."""
    return coordinator.build(name, version, selector, now=now, ttl=ttl)


def offers(release: Release) -> dict[str, ReleaseOffer]:
    """Each target device's release offer: the keyring, the signed manifest naming the device
    (its shard: a bounded set of targets, whatever the fleet's size) and its own key envelope."""
    signed = release.signed_manifests
    out = {}
    for t in release.targets:
        manifest, signature = signed(t.device_id)
        out[t.device_id] = ReleaseOffer(
            keyring=release.keyring,
            keyring_sig=release.keyring_sig,
            manifest=manifest,
            signature=signature,
            envelope=Envelope.from_dict(json.loads(t.envelope)),
        )
    return out


def publish(
    link: Link, release: Release, *, timeout: float = 30.0, registry: Registry | None = None
) -> PublishReport:
    """Publish (retained, QoS 1) every target's offer, in acknowledged batches; with the
    ``registry``, then re-publish each target's newest release where it is newer.

    Raises ``TransportError`` if the broker did not acknowledge every offer of a batch
    within ``timeout`` seconds: publishing the same release again is harmless.
    """
    items = sorted(offers(release).items())
    sent, batches = _publish_offers(link, items, release.sequence, timeout)
    log.info("published release %d to %d devices (%d bytes)", release.sequence, len(items), sent)
    again = 0
    if registry is not None:
        again = keep_newest(registry, link, {d: release.sequence for d, _ in items}, timeout)
    return PublishReport(
        sequence=release.sequence,
        devices=tuple(d for d, _ in items),
        bytes=sent,
        batches=batches,
        republished=again,
    )


def _publish_offers(
    link: Link, items: list[tuple[str, ReleaseOffer]], sequence: int, timeout: float
) -> tuple[int, int]:
    """Publish offers in acknowledged batches; return (bytes, batches)."""
    sent = batches = 0
    for start in range(0, len(items), PUBLISH_BATCH):
        pending: list[Delivery] = []
        for device_id, offer in items[start : start + PUBLISH_BATCH]:
            payload = offer.encode()
            pending.append(link.publish(topics.release(device_id), payload, qos=1, retain=True))
            sent += len(payload)
        batches += 1
        _await(pending, sequence, timeout)
    return sent, batches


def keep_newest(
    registry: Registry, link: Link, published: dict[str, int], timeout: float = 30.0
) -> int:
    """Given what was just published (``device id -> sequence``, acknowledged), publish the
    offer of each device's newest release where that is newer; return how many offers."""
    published = dict(published)
    again = 0
    for _ in range(SUPERSEDE_ROUNDS):
        stale = {d: s for d, s in registry.newest_releases(published).items()
                 if s > published[d]}  # fmt: skip
        if not stale:
            return again
        for sequence in sorted(set(stale.values())):
            newer = registry.release(sequence=sequence)
            if newer is None:  # deleted meanwhile: nothing to restore
                continue
            devices = {d for d, s in stale.items() if s == sequence}
            items = sorted((d, o) for d, o in offers(newer).items() if d in devices)
            _publish_offers(link, items, sequence, timeout)
            log.info("release %d is newer for %d of those devices: its offer published again",
                     sequence, len(items))  # fmt: skip
            published.update(dict.fromkeys(devices, sequence))
            again += len(items)
    log.warning("releases kept superseding each other for %d rounds", SUPERSEDE_ROUNDS)
    return again


def _await(pending: list[Delivery], sequence: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for delivery in pending:
        delivery.wait(max(0.0, deadline - time.monotonic()))
    unacked = sum(1 for d in pending if not d.published)
    if unacked:
        raise TransportError(
            f"release {sequence}: {unacked} offers not acknowledged "
            f"by the broker within {timeout:.0f} s; publish it again"
        )


def publish_sequence(
    registry: Registry, link: Link, sequence: int, *, timeout: float = 30.0
) -> PublishReport:
    """Publish a release built earlier; ``LookupError`` if there is no such sequence."""
    r = registry.release(sequence=sequence)
    if r is None:
        raise LookupError(f"release {sequence} does not exist")
    return publish(link, r, timeout=timeout, registry=registry)


def release(
    coordinator: Coordinator,
    link: Link,
    name: str,
    version: str,
    selector: str,
    *,
    timeout: float = 30.0,
    now: int | None = None,
    ttl: int | None = None,
) -> Released:
    """Build a release of ``name`` ``version`` for ``selector`` and publish it on ``link``."""
    r, built = build(coordinator, name, version, selector, now=now, ttl=ttl)
    report = publish(link, r, timeout=timeout, registry=coordinator.registry)
    return Released(release=r, built=built, report=report)


def _ignore(topic: str, payload: bytes, props: MessageProps) -> None:
    """A publisher subscribes to nothing."""


@contextmanager
def connect(
    config: MqttConfig,
    *,
    link_factory: LinkFactory = MqttLink,
    timeout: float = 15.0,
    attempts: int = 3,
) -> Iterator[Link]:
    """A started, connected publishing link, stopped on exit. ``ConnectionError`` if the
    broker is not reachable within ``timeout`` seconds or refused ``attempts`` connection
    attempts in a row (a command should not wait out its timeout on a dead broker)."""
    failed = threading.Semaphore(0)
    link = link_factory(config, _ignore, on_disconnect=lambda _reason: failed.release())
    link.start()
    try:
        deadline, refused = time.monotonic() + timeout, 0
        while not link.wait_connected(0):
            left = deadline - time.monotonic()
            if left <= 0 or refused >= attempts:
                raise ConnectionError(f"cannot reach the broker at {config.url}: {link.last_error}")
            if failed.acquire(timeout=min(left, 0.1)):  # an attempt failed
                refused += 1
        yield link
    finally:
        link.stop()
