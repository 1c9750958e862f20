"""Telemetry at fleet scale on one coordinator service: nothing lost, memory flat.

Default run: 50 simulated devices at 1 Hz for 5 s on the in-memory broker and (where it is
installed) a real mosquitto. ``-m slow``: 500 devices at 1 Hz for 60 s on mosquitto. The
devices are thin publishers (``simulations.telemetry_load``: a few MQTT connections speaking
for every enrolled device, from a child process on mosquitto), not full agents: what is under
test is the coordinator's ingest.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from edgefleet.simulations.telemetry_load import WINDOW_COUNT, run_backlog, run_load

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO

RSS_BOUND = 40 * 1024 * 1024  # bytes the coordinator process may grow after warm-up


def _check(r: object, devices: int, ticks: int) -> None:
    from edgefleet.simulations.telemetry_load import LoadResult

    assert isinstance(r, LoadResult)
    assert (r.devices, r.ticks, r.sent) == (devices, ticks, devices * ticks)
    # the broker's own drops (its log) never reach the service's counters: checked apart
    assert r.lost == 0 and r.drops == {} and r.broker_drops == [], r.to_dict()
    assert r.inference_count == devices * ticks * WINDOW_COUNT  # every window summed once
    assert r.latest_ok == devices  # each device's newest status is what the registry shows
    assert r.rss_growth < RSS_BOUND, r.rss


@pytest.mark.parametrize("broker", [
    "memory",
    pytest.param("mosquitto", marks=pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)),
])
def test_fifty_devices_for_five_seconds(tmp_path: Path, broker: str) -> None:
    r = run_load(tmp_path, devices=50, rate=1.0, seconds=5, broker=broker)  # type: ignore[arg-type]
    _check(r, 50, 5)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)
def test_five_hundred_devices_at_one_hertz_for_a_minute(tmp_path: Path) -> None:
    r = run_load(tmp_path, devices=500, rate=1.0, seconds=60, broker="mosquitto")
    _check(r, 500, 60)


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)
def test_a_backlog_larger_than_one_read_is_drained_whole(tmp_path: Path) -> None:
    """9,000 statuses (~2.7 MB) queued by mosquitto while the service was away arrive faster
    than the link reads per loop iteration (8 x 256 KiB): all of them are handled, none is
    dropped by the broker, every device's newest status shows. (That buffered bytes are parsed
    at once rather than at the socket's next byte is pinned without timing by
    ``tests/infra/test_mqtt_reads.py``; a time limit here would race a loaded machine.)"""
    r = run_backlog(tmp_path, devices=500, ticks=18, drain_timeout=120.0)
    assert (r["statuses"], r["handled"], r["broker_drops"]) == (9000, 9000, []), r
    assert r["latest_ok"] == 500  # every device's newest status is what the registry shows
