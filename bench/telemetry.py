"""Telemetry: the cost of recording predictions, and how fast the coordinator ingests reports.

1. ``Agent.predict`` through ``agent.observe.Recorder`` (what the HTTP API and ``inference``
   telemetry use) against plain ``Agent.predict`` on the same agent, model (digits MLP, ONNX)
   and input (batch 1), timed call by call in alternating blocks with the garbage collector
   off, as ``bench/predict.py`` does. Aim: p50 and p99 ratios <= 1.10.
2. Ingest, one ``CoordinatorService`` on mosquitto and SQLite (``simulations.telemetry_load``).
   Statuses/s (aim >= 5,000, issue 10): mosquitto holds 9,000 statuses of 500 devices for the
   service's session while it is away (``run_backlog``), then the service connects and drains
   them: statuses / (connect to the last one handled, its batch written); the same backlog to a
   bare counting subscriber in the note (median of 3 runs; quick: 1). Python publishers on
   this 2-core machine cannot send 5,000/s beside the service, hence the backlog. Reports/s:
   thin publishers flood a status and a telemetry message per device and tick; reports sent /
   (first publish to the last telemetry row stored), against the bare subscriber. And the paced
   run: ``devices`` at 1 Hz (500 for 60 s; quick: 50 for 5 s): lost messages (aim 0) and the
   coordinator's RSS growth after warm-up. Skipped without mosquitto.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ._util import Row, alternate, fleet, median, percentile

NAME = "telemetry"
_NOTES: list[str] = []


def notes() -> list[str]:
    return list(_NOTES)


def _recording(calls: int, block: int) -> list[Row]:
    import numpy as np
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.observe import Recorder

    fl = fleet()
    agent = Agent.open(fl.installed_agent("onnx", "bench-telemetry-onnx"))
    try:
        rec = Recorder(agent)
        x = np.ascontiguousarray(fl.test_inputs()[:1])
        ours, plain = alternate(rec.predict, agent.predict, x, calls, block)
        recorded = sum(t["count"] for t in rec.totals().values())
    finally:
        agent.close()
    _NOTES.append(f"recording: {len(ours)} calls each side in blocks of {block}; "
                  f"{recorded} recorded (incl. warm-up); mean with {np.mean(ours) / 1e3:.2f} µs,"
                  f" without {np.mean(plain) / 1e3:.2f} µs")  # fmt: skip
    o50, o99, p50, p99 = (percentile(ours, 50), percentile(ours, 99),
                          percentile(plain, 50), percentile(plain, 99))  # fmt: skip
    return [
        Row(key="record_p50_us", metric="Agent.predict with recording p50, ONNX, batch 1",
            value=o50 / 1e3, unit="µs", baseline="Agent.predict without", baseline_value=p50 / 1e3,
            aim="<= 1.10"),
        Row(key="record_p99_us", metric="Agent.predict with recording p99, ONNX, batch 1",
            value=o99 / 1e3, unit="µs", baseline="Agent.predict without", baseline_value=p99 / 1e3,
            aim="<= 1.10"),
    ]  # fmt: skip


def _ingest(quick: bool) -> list[Row]:
    from edgefleet.simulations.telemetry_load import raw_delivery, run_backlog, run_load

    # a flood of 500 x 8 = 8,000 messages fits mosquitto's 10,000 queued for one client
    devices, ticks, runs = (50, 10, 1) if quick else (500, 8, 3)
    paced = (50, 5.0) if quick else (500, 60.0)
    work = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    try:
        st = [run_backlog(work / f"st{i}", devices=500, ticks=18) for i in range(runs)]
        st_raw = [run_backlog(work / f"raw{i}", devices=500, ticks=18, raw=True)
                  for i in range(runs)]  # fmt: skip
        flood = run_load(work / "flood", devices=devices, rate=1000.0, seconds=ticks / 1000.0)
        raw = raw_delivery(work / "raw", devices=devices, rate=1000.0, seconds=ticks / 1000.0)
        run = run_load(work / "paced", devices=paced[0], rate=1.0, seconds=paced[1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    statuses = median([r["per_s"] for r in st])
    st_base = median([r["per_s"] for r in st_raw])
    _NOTES.append("statuses: backlog of 9,000 from 500 devices, service drained "
                  + ", ".join(f"{r['handled']} in {r['seconds']:.2f} s ({r['written']} written, "
                              f"{r['coalesced']} coalesced in a batch, {r['superseded']} "
                              f"superseded queued; {r['latest_ok']}/500 devices show their "
                              "last)" for r in st)
                  + "; bare subscriber " + ", ".join(f"{r['handled']} in {r['seconds']:.2f} s"
                                                     for r in st_raw)
                  + f"; broker drops {[d for r in st + st_raw for d in r['broker_drops']]}")
    ours = flood.stored / flood.ingest_s
    base = raw["received"] / 2 / raw["seconds"]  # a report is a status and a telemetry message
    _NOTES.append(f"flood: {flood.sent} reports from {devices} devices in {flood.ingest_s:.2f} s"
                  f" ({flood.statuses_stored} status updates written, coalesced), lost "
                  f"{flood.lost}, drops {flood.drops}; raw subscriber: {raw['received']} "
                  f"messages in {raw['seconds']:.2f} s")  # fmt: skip
    _NOTES.append(f"paced: {paced[0]} devices x {run.ticks} ticks at 1 Hz: lost {run.lost}, "
                  f"drops {run.drops}, drained {run.drain_s:.2f} s after the last publish, "
                  f"publishers at most {run.publish_late_s:.2f} s late; coordinator RSS "
                  f"{run.rss[0] / 2**20:.0f} -> {run.rss[-1] / 2**20:.0f} MB")  # fmt: skip
    return [
        Row(key="ingest_statuses_per_s", metric="statuses ingested/s by one coordinator service "
            "on SQLite, a 9,000-status backlog of 500 devices (mosquitto)", value=statuses,
            unit="/s", aim=">= 5000", note=f"bare counting subscriber, same backlog: "
            f"{st_base:.0f}/s"),
        Row(key="ingest_reports_per_s", metric=f"reports ingested/s, {devices} devices flooding "
            "(status + telemetry each, mosquitto)", value=ours, unit="/s",
            baseline="bare counting subscriber, same publishers", baseline_value=base),
        Row(key="paced_lost", metric=f"messages lost, {paced[0]} devices at 1 Hz for "
            f"{paced[1]:g} s", value=float(run.lost), unit="", aim="== 0"),
        Row(key="paced_rss_growth_mb", metric="coordinator RSS growth after warm-up (paced run)",
            value=run.rss_growth / 2**20, unit="MB"),
    ]  # fmt: skip


def run(quick: bool) -> list[Row]:
    _NOTES.clear()
    calls, block = (4_000, 200) if quick else (40_000, 500)
    rows = _recording(calls, block)
    if shutil.which("mosquitto") is None:
        _NOTES.append("ingest rows skipped: no mosquitto on PATH")
        return rows
    try:
        return rows + _ingest(quick)
    except Exception as exc:  # a stalled broker run must not lose the recording rows
        _NOTES.append(f"ingest rows failed: {type(exc).__name__}: {exc}")
        return rows
