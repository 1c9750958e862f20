"""One release to a fleet of thin devices and a few real agents (``simulations.scale``).

A real mosquitto, ``edgefleet coordinator serve`` as its own process, the registry on SQLite
(the default run: 60 thin devices and an agent) or PostgreSQL (``-m slow``: 1,000 and three
agents). Every release reaches every device (each thin device verified every chunk, each
agent installed it), every final status is ingested (the registry shows each device on it),
and the coordinator's memory stays flat: its RSS, sampled throughout, grows by less than the
bounds its limits allow during a release, and not from one release to the next.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from edgefleet.coordinator.service import UNSENT_LIMIT, ServiceLimits
from edgefleet.simulations.homes import ModelFile
from edgefleet.simulations.scale import ScaleReport, run_scale

from tests.conftest import Digits

SEGMENT = 4096  # bytes: ~10 chunks per device
MB = 1024 * 1024
needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto") is None,
                                     reason="needs the mosquitto binary on PATH")  # fmt: skip


def _check(report: ScaleReport, devices: int) -> None:
    t = report.totals
    assert report.devices == devices and len(report.releases) == 2
    for r in report.releases:
        assert r.seconds > 0 and r.coordinator_cpu_s > 0 and r.thin_payload_bytes > 0
    want = sum(r.segments for r in report.releases) * report.thin
    assert t["fetched"] == want, t
    assert t["duplicates"] == 0 and t["bad_hash"] == 0 and t["rejected"] == 0, t
    # Flat memory: during a release the service may hold at most its queues' bounds (chunk
    # replies unsent in the link, statuses and telemetry waiting for ingest) plus per-device
    # bookkeeping; from one release to the next nothing may accumulate.
    limits = ServiceLimits()
    bound = (UNSENT_LIMIT + limits.status_bytes + limits.telemetry_bytes) / MB + 64
    peak = max(report.rss)
    assert peak - report.rss_before < bound, (report.rss_before, peak, bound)
    first, second = report.rss_after
    assert second - first < max(16.0, 0.1 * first), report.rss_after


@needs_mosquitto
@pytest.mark.timeout(300)
def test_sixty_thin_devices_and_an_agent(tmp_path: Path, digits_v1: Digits) -> None:
    model = ModelFile(name="digits", path=digits_v1.onnx, version="1")
    report = run_scale(tmp_path, thin=60, agents=["agent-0"], model=model,
                       segment_size=SEGMENT, processes=1)  # fmt: skip
    _check(report, 61)


@needs_mosquitto
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_thousand_devices_on_postgresql(tmp_path: Path, digits_v1: Digits,
                                          pg_url: str) -> None:  # fmt: skip
    model = ModelFile(name="digits", path=digits_v1.onnx, version="1")
    report = run_scale(tmp_path, thin=1000, agents=["agent-0", "agent-1", "agent-2"],
                       model=model, segment_size=SEGMENT, database=pg_url, processes=2)
    _check(report, 1003)
