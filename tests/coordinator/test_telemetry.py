"""Telemetry in the registry without a broker: ingest stores every namespace of every accepted
message, keeps inference totals, bounds retention; ``recent`` and ``version_health`` read it
back; the offline will sets the state only; the coordinator's ``/metrics`` parses."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
from edgefleet.coordinator import telemetry
from edgefleet.coordinator.ingest import STATUS, TELEMETRY, Ingest, TelemetryRetention
from edgefleet.coordinator.metrics import FleetCollector, parse_address, serve_metrics
from edgefleet.coordinator.tables.telemetry import InferenceTotalRow, TelemetryRow
from edgefleet.protocol.messages import LATENCY_BOUNDS_MS, ActiveModel, DeviceStatus, Telemetry
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from .homes import T0, Home, make_home

BID = "ab" * 16


def window(count: int, errors: int = 0, bucket: int = 10, classes: dict[str, int] | None = None
           ) -> dict[str, Any]:
    return {"count": count, "errors": errors, "rows": count, "lat": [0] * bucket + [count],
            "classes": classes or {"3": count}, "conf": [], "conf_sum": 0.9 * count}


def tele(device: str, t: int, **namespaces: Any) -> bytes:
    return Telemetry(device_id=device, time=t, metrics=namespaces).encode()


def status(device: str, state: str = "idle", version: str = "1") -> bytes:
    active = ActiveModel(name="m", version=version, sequence=3, format="onnx", bundle_id=BID)
    return DeviceStatus(device_id=device, time=T0, state=state,
                        active=None if state == "offline" else active).encode()


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return make_home(tmp_path)


class Clock:
    def __init__(self) -> None:
        self.now = float(T0 + 1000)

    def __call__(self) -> float:
        return self.now


def test_every_namespace_is_stored_and_read_back(home: Home) -> None:
    reg, clock = home.coordinator.registry, Clock()
    ing = Ingest(reg, clock=clock)
    ing.add("dev-a", TELEMETRY, tele("dev-a", T0 + 10, inference={"m@1": window(5)},
                                     drift={"psi": 0.1}))  # fmt: skip
    ing.add("dev-b", TELEMETRY, tele("dev-b", T0 + 20, inference={"m@1": window(7, errors=1)}))
    ing.add("dev-b", TELEMETRY, tele("dev-b", T0 + 5000, agent={"n": 1}))  # clock ahead: clamped
    ing.add("dev-z", TELEMETRY, tele("dev-z", T0 + 30, agent={"n": 2}))  # not enrolled
    ing.add("dev-a", TELEMETRY, tele("dev-b", T0 + 30, agent={"n": 3}))  # names another device
    ing.flush()
    assert (ing.telemetry_stored, ing.dropped, ing.unknown) == (3, 1, 1)
    assert telemetry.recent(reg, namespace="drift", since=0) == [("dev-a", T0 + 10, {"psi": 0.1})]
    assert telemetry.recent(reg, namespace="agent", since=0) == [("dev-b", T0 + 1000, {"n": 1})]
    inf = telemetry.recent(reg, namespace="inference", since=T0 + 15)
    assert [(d, t) for d, t, _ in inf] == [("dev-b", T0 + 20)]
    assert telemetry.recent(reg, namespace="inference", since=0, device_ids=["dev-a"])[0][0] == \
        "dev-a"


def test_version_health_merges_windows_and_knows_who_is_online(home: Home) -> None:
    reg, clock = home.coordinator.registry, Clock()
    ing = Ingest(reg, clock=clock)
    for dev in ("dev-a", "dev-b"):
        ing.add(dev, STATUS, status(dev))
    ing.add("dev-a", TELEMETRY, tele("dev-a", T0 + 900, inference={"m@1": window(90)}))
    ing.add("dev-a", TELEMETRY, tele("dev-a", T0 + 950, inference={
        "m@1": window(10, errors=2, bucket=20, classes={"1": 10}), "m@2": window(3)}))
    ing.add("dev-b", TELEMETRY, tele("dev-b", T0 + 950, inference={"m@1": window(4)}))
    ing.flush()
    ing.add("dev-b", STATUS, status("dev-b", "offline"))  # its will
    ing.flush()
    h = telemetry.version_health(reg, name="m", version="1", since=T0, now=T0 + 1000)
    a, b = h["dev-a"], h["dev-b"]
    assert (a.count, a.errors, a.error_rate, a.class_counts) == (100, 2, 0.02, {"3": 90, "1": 10})
    assert LATENCY_BOUNDS_MS[9] < a.p50_ms <= LATENCY_BOUNDS_MS[10]  # type: ignore[operator]
    assert LATENCY_BOUNDS_MS[19] < a.p99_ms <= LATENCY_BOUNDS_MS[20]  # type: ignore[operator]
    assert (a.online, a.healthy) == (True, True)
    assert (b.count, b.online, b.healthy, b.state) == (4, False, False, "offline")
    d = reg.device("dev-b")
    assert d is not None and (d.active_version, d.last_seen) == ("1", T0 + 1000)  # kept
    # a window: since excludes the older message; stale devices are offline
    h = telemetry.version_health(reg, name="m", version="1", since=T0 + 920, now=T0 + 1000)
    assert h["dev-a"].count == 10
    stale = telemetry.version_health(reg, name="m", version="1", since=T0, now=T0 + 5000)
    assert not stale["dev-a"].online
    assert telemetry.version_totals(reg)["m@1"] == {"count": 104, "errors": 2, "rows": 104,
                                                    "devices": 2}  # fmt: skip
    with reg.session() as s:
        row = s.get(InferenceTotalRow, ("dev-a", "m@1"))
        assert row is not None and row.count == 100 and row.classes == {"3": 90, "1": 10}


def test_malformed_windows_are_skipped_not_trusted(home: Home) -> None:
    reg = home.coordinator.registry
    ing = Ingest(reg, clock=Clock())
    ing.add("dev-a", STATUS, status("dev-a"))
    bad = {"count": -5, "errors": "x", "lat": [True, -1, 3], "classes": {"1": 1.5}}
    ing.add("dev-a", TELEMETRY, tele("dev-a", T0, inference={"m@1": bad, "m@2": [1, 2]}))
    ing.flush()
    h = telemetry.version_health(reg, name="m", version="1", since=0, now=T0 + 1000)
    assert (h["dev-a"].count, h["dev-a"].errors, h["dev-a"].class_counts) == (0, 0, {"1": 0})


def test_retention_bounds_rows_per_device_and_age(home: Home) -> None:
    reg, clock = home.coordinator.registry, Clock()
    ing = Ingest(reg, clock=clock,
                 retention=TelemetryRetention(rows_per_device=5, max_age=100, prune_every=1))
    for i in range(12):
        ing.add("dev-a", TELEMETRY, tele("dev-a", T0 + i, agent={"i": i}))
    ing.add("dev-b", TELEMETRY, tele("dev-b", T0, agent={"i": 0}))
    ing.flush()
    kept = telemetry.recent(reg, namespace="agent", since=0, device_ids=["dev-a"])
    assert [p["i"] for _, _, p in kept] == [7, 8, 9, 10, 11]  # the newest 5
    clock.now += 101
    ing.add("dev-b", TELEMETRY, tele("dev-b", int(clock.now), agent={"i": 1}))
    ing.flush()
    with reg.session() as s:
        left = s.execute(select(TelemetryRow.device_id, func.count())
                         .group_by(TelemetryRow.device_id)).all()  # fmt: skip
    assert dict(left) == {"dev-b": 1}  # everything older than max_age went
    assert ing.telemetry_pruned == 7 + 6


def test_the_coordinator_metrics_parse(home: Home) -> None:
    reg, clock = home.coordinator.registry, Clock()
    ing = Ingest(reg, clock=clock)
    ing.add("dev-a", STATUS, status("dev-a"))
    ing.add("dev-b", STATUS, status("dev-b", version="2"))
    ing.add("dev-a", TELEMETRY, tele("dev-a", T0, inference={"m@1": window(9, errors=1)}))
    ing.flush()

    class FakeService:  # the counters a running CoordinatorService has
        registry = reg
        ingest = ing
        received = {"up/status": 2, "up/telemetry": 1}
        drops = {("dev-c", "telemetry queue full"): 3}
        ingest_queue = (0, 4)
        ingest_bytes = 123

    collector = FleetCollector(FakeService(), clock=clock)  # type: ignore[arg-type]
    text = _scrape(collector)
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
    assert got[("edgefleet_devices", (("state", "online"),))] == 2
    assert got[("edgefleet_devices", (("state", "offline"),))] == len(reg.devices()) - 2
    assert got[("edgefleet_devices_running", (("model", "m@2"),))] == 1
    assert got[("edgefleet_fleet_inference_calls_total", (("model", "m@1"),))] == 9
    assert got[("edgefleet_fleet_inference_errors_total", (("model", "m@1"),))] == 1
    assert got[("edgefleet_dropped_messages_total", (("reason", "telemetry queue full"),))] == 3
    assert got[("edgefleet_ingest_queue", (("unit", "telemetry"),))] == 4
    assert got[("edgefleet_ingested_total", (("what", "telemetry"),))] == 1
    # served over HTTP on loopback by prometheus-client
    server = serve_metrics(FakeService(), "127.0.0.1:0", clock=clock)  # type: ignore[arg-type]
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            served = resp.read().decode()
        assert any(f.name == "edgefleet_devices" for f in text_string_to_metric_families(served))
    finally:
        server.shutdown()


def _scrape(collector: FleetCollector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


@pytest.mark.parametrize("bad", ["0.0.0.0:9108", "10.1.2.3:80", "9108", "127.0.0.1:x",
                                 "[::1]:9108", "example.com:1"])
def test_metrics_bind_loopback_only(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_address(bad)
    assert parse_address("localhost:9108") == ("127.0.0.1", 9108)
