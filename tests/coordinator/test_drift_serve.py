"""``coordinator serve`` raises drift alerts itself as drift telemetry arrives (the same alerts
``fleet drift`` and the dashboard read), over the in-memory broker and the real service."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from edgefleet.coordinator import drift
from edgefleet.coordinator.service import CoordinatorService
from edgefleet.infra.link import InMemoryBroker
from edgefleet.infra.link.port import Link
from edgefleet.protocol import topics
from edgefleet.protocol.messages import Telemetry
from edgefleet.simulations.wait import wait_until

from .homes import T0, TIMEOUT, Home, make_home, mqtt

EVERY = 0.3  # s between the service's drift checks


def _report(psi: list[float], n: float = 600.0) -> dict[str, Any]:
    return {"n": n, "psi": psi, "ks": [p / 4 for p in psi], "max_psi": max(psi),
            "max_ks": max(psi) / 4, "output_psi": 0.01, "nonfinite": 0}  # fmt: skip


def _send(link: Link, device: str, psi: list[float], n: float = 600.0) -> None:
    t = Telemetry(device_id=device, time=T0, metrics={"drift": {"m@1": _report(psi, n)}})
    link.publish(topics.up(device, "telemetry"), t.encode(), qos=1)


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path)


@pytest.fixture
def served(home: Home) -> Iterator[tuple[CoordinatorService, Link]]:
    with InMemoryBroker() as broker:
        svc = CoordinatorService(home.coordinator, mqtt("coordinator"), link_factory=broker.link,
                                 clock=lambda: T0 + 5, drift_every=EVERY)  # fmt: skip
        svc.start(timeout=TIMEOUT)
        device = broker.link(mqtt("devices"), lambda *a: None)
        device.start()
        assert device.wait_connected(TIMEOUT)
        try:
            yield svc, device
        finally:
            device.stop()
            svc.stop()


def _open(home: Home) -> list[tuple[str, str, str]]:
    return [(a.device_id, a.name, a.version)
            for a in drift.alerts(home.coordinator.registry, state="open")]  # fmt: skip


def test_serve_raises_alerts_for_the_drifting_devices_only(
    home: Home, served: tuple[CoordinatorService, Link]
) -> None:
    svc, link = served
    _send(link, "dev-a", [0.01, 1.4, 0.6])  # drifts
    _send(link, "dev-b", [0.01, 0.02, 0.03])  # calm
    _send(link, "dev-c", [0.9, 0.9, 0.9], n=20)  # too few samples to count
    wait_until(lambda: _open(home), "the first drift alert")
    wait_until(lambda: svc.ingest.telemetry_stored == 3 and svc.drift.wait() is None,
               "all three reports stored and checked")  # fmt: skip
    assert _open(home) == [("dev-a", "m", "1")]
    (alert,) = drift.alerts(home.coordinator.registry)
    assert (alert.created, alert.threshold, alert.samples) == (T0 + 5, drift.DEFAULT_THRESHOLD, 600)
    assert alert.features == [[1, 1.4, 0.35], [2, 0.6, 0.15]]

    # dev-b drifts right after a check, then nothing else arrives: the service's own timer
    # checks it (no later message needed); dev-a's open alert is not raised twice.
    checks = svc.drift.checks
    _send(link, "dev-b", [0.5, 0.02, 0.03])
    _send(link, "dev-a", [0.01, 1.5, 0.6])
    wait_until(lambda: len(_open(home)) == 2, "dev-b's alert from the timed check")
    assert svc.drift.checks > checks
    assert sorted(_open(home)) == [("dev-a", "m", "1"), ("dev-b", "m", "1")]
    assert svc.drift.raised == 2


def test_the_watch_checks_only_what_it_was_told_and_everyone_past_its_bound(
    home: Home,
) -> None:
    registry = home.coordinator.registry
    now = [100.0]
    watch = drift.DriftWatch(registry, every=10, max_pending=2, clock=lambda: T0 + 5,
                             monotonic=lambda: now[0])  # fmt: skip
    assert watch.wait() is None and watch.run() == [] and watch.checks == 0
    watch.note(["dev-a"])
    assert watch.wait() == 0.0
    watch.run()
    assert watch.checks == 1 and watch.wait() is None
    watch.note(["dev-a"])
    assert watch.wait() == 10.0 and watch.run() == [] and watch.checks == 1  # not due yet
    watch.note(["dev-b", "dev-c"])  # three waiting > max_pending: the next check is fleet-wide
    assert watch._everyone and not watch._pending
    now[0] += 10
    watch.run()
    assert watch.checks == 2 and watch.wait() is None
    with pytest.raises(ValueError, match="every and threshold"):
        drift.DriftWatch(registry, every=0)


def test_a_failed_check_keeps_its_devices_for_the_next(
    home: Home, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = home.coordinator.registry
    now = [100.0]
    watch = drift.DriftWatch(registry, every=10, clock=lambda: T0 + 5, monotonic=lambda: now[0])
    seen: list[object] = []

    def locked(*_a: object, device_ids: object = None, **_k: object) -> list[object]:
        seen.append(device_ids)
        raise RuntimeError("database is locked")

    monkeypatch.setattr(drift, "check", locked)
    watch.note(["dev-a", "dev-b"])
    with pytest.raises(RuntimeError, match="locked"):
        watch.run()
    assert watch.wait() == 10.0  # still waiting, for the next check
    monkeypatch.undo()
    now[0] += 10
    watch.run()  # the real check, of the same devices
    assert seen == [["dev-a", "dev-b"]] and watch.checks == 2 and watch.wait() is None


def test_checks_at_the_same_time_record_one_alert(
    home: Home, served: tuple[CoordinatorService, Link]
) -> None:
    """serve's watch and a retraining trigger in one process check at once: one alert."""
    svc, link = served
    svc.drift.every = 3600.0  # the service checks once, then leaves it to the threads below
    _send(link, "dev-b", [0.01, 0.02, 0.03])
    wait_until(lambda: svc.drift.checks == 1, "the service's first check")
    _send(link, "dev-a", [0.01, 1.4, 0.6])
    wait_until(lambda: svc.ingest.telemetry_stored == 2, "the drifting report stored")
    start = threading.Barrier(6)
    raised: list[int] = []

    def check() -> None:
        start.wait(TIMEOUT)
        raised.append(len(drift.check(home.coordinator.registry, now=T0 + 5)))

    threads = [threading.Thread(target=check) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert sorted(raised) == [0, 0, 0, 0, 0, 1]
    assert _open(home) == [("dev-a", "m", "1")]
