"""Issue 7, the coordinator's side, on real brokers: one device's chunk-request flood (a full
window per request, random bundle ids) cannot stop a release to the others, an oversize
upstream message never reaches the coordinator, the retained offer is the newest release
whatever the publish order, and a locked SQLite registry is one clear line, never a traceback
(``serve`` waits for it)."""

from __future__ import annotations

import os
import queue
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest
from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.service import MAX_INCOMING
from edgefleet.infra.broker import EmbeddedBroker
from edgefleet.protocol import topics
from edgefleet.protocol.messages import ChunkRequest, DeviceStatus
from sqlalchemy import event
from sqlalchemy.engine import Engine

from edgefleet.cli import main
from tests.conftest import Digits

from .brokers import HAVE_MOSQUITTO, NEED_MOSQUITTO
from .fleet import BROKERS, TIMEOUT, open_fleet, wait_until

pytestmark = pytest.mark.timeout(180)


@contextmanager
def release_queries() -> Iterator[list[str]]:
    """Every SQL statement that reads a release by bundle id, on any engine, while open."""
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM releases" in statement and "bundle_id" in statement:
            seen.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", count)


@BROKERS
def test_one_devices_chunk_flood_cannot_stop_a_release_to_the_others(
        tmp_path: Path, digits_v1: Digits, kind: str) -> None:
    """Items 1 and 3: 300 requests x 16 indexes for a release that targets the flooder, then
    1,500 with random bundle ids; three other devices still install, the flooder's queued
    chunk bytes stay within one window, and registry lookups stay bounded."""
    devices = ["dev-a", "dev-b", "dev-c", "dev-d"]
    with open_fleet(tmp_path, digits_v1, devices, kind=kind) as fleet, \
            release_queries() as queries:
        fleet.coordinator.update_config(segment_size=1024)  # ~39 segments: 16 per request
        svc = fleet.start_service()
        release = fleet.release("1", "all")
        rogue, _ = fleet.client("dev-a", "rogue-a", max_queued=0)  # the flood queues whole
        up = topics.up("dev-a", "chunkreq")
        full = ChunkRequest(bundle_id=release.bundle_id, indexes=tuple(range(16)),
                            reply_to=topics.chunk("dev-a"), corr="amp").encode()
        for _ in range(300):
            rogue.publish(up, full, qos=1)
        agents = [fleet.start_agent(d) for d in devices[1:]]
        for n in range(1500):
            rogue.publish(up, ChunkRequest(bundle_id=secrets.token_hex(16), indexes=(n % 16,),
                                           reply_to=topics.chunk("dev-a"),
                                           corr=f"r{n}").encode(), qos=1)
        for a in agents:
            assert a.daemon.installed.wait(TIMEOUT * 3), a.device_id
        fleet.wait_active(devices[1:], release.sequence, timeout=TIMEOUT * 3)
        wait_until(lambda: svc.received["up/chunkreq"] >= 1800, "the flood to arrive")
        assert svc.peak_chunk_bytes("dev-a") <= 16 * 1024
        assert svc.chunk_drops("dev-a") > 0
        assert all(svc.chunk_drops(d) == 0 for d in devices[1:])
        # One lookup for the real release; the random ids get the flooder's small budget.
        budget = svc.limits.lookup_burst + 60 * svc.limits.lookup_rate
        assert svc.chunks.lookups <= 1 + budget < 1500
        assert len(queries) <= 2 + budget, len(queries)  # all engines, the build's check too
        print(f"{kind}: 1,800 flood requests -> {svc.chunks.lookups} chunk-path lookups, "
              f"{len(queries)} queries by bundle id, {svc.chunk_drops('dev-a')} dropped")


@BROKERS
def test_releases_published_out_of_order_leave_the_newest_retained(
        tmp_path: Path, digits_v1: Digits, kind: str) -> None:
    """Item 8: built concurrently, published newest first; a device that comes back with no
    session installs the newer one."""
    with open_fleet(tmp_path, digits_v1, ["dev-a", "dev-b"], kind=kind) as fleet:
        svc = fleet.start_service()
        older = fleet.build("1", "all")
        newer = fleet.build("2", "all")
        svc.release(newer.sequence)
        svc.release(older.sequence)  # the "wrong" order
        _, inbox = fleet.client("coordinator", "fresh", ["ef/v1/dev/+/release"])
        assert inbox.wait_for(lambda ms: len(ms) >= 2, TIMEOUT)
        assert {m.payload for m in inbox.messages} == {
            fleet.offer(newer, d).encode() for d in ("dev-a", "dev-b")}
        agent = fleet.start_agent("dev-a")
        assert agent.daemon.installed.wait(TIMEOUT)
        fleet.wait_active(["dev-a"], newer.sequence)


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)
def test_a_200_mb_telemetry_message_never_reaches_the_coordinator(
        tmp_path: Path, digits_v1: Digits) -> None:
    """Item 5: the coordinator announces MAX_INCOMING; mosquitto drops larger messages for it
    (the rest of the device's messages still arrive, in order)."""
    with open_fleet(tmp_path, digits_v1, ["dev-a"], kind="mosquitto") as fleet:
        svc = fleet.start_service()
        rogue, _ = fleet.client("dev-a", "rogue-a", default_max_packet=256 << 20)
        huge = rogue.publish(topics.up("dev-a", "telemetry"), b"x" * (200 << 20), qos=1)
        assert huge.wait(TIMEOUT * 3)
        status = DeviceStatus(device_id="dev-a", time=0, state="idle").encode()
        rogue.publish(topics.up("dev-a", "status"), status, qos=1)
        assert svc.status_event.wait(TIMEOUT)
        assert svc.received["up/telemetry"] == 0 and svc.largest_received <= MAX_INCOMING


# -- a locked registry ------------------------------------------------------------------------


@contextmanager
def locked(coordinator: Coordinator) -> Iterator[None]:
    """Another process's exclusive lock on the SQLite registry (a second connection)."""
    conn = sqlite3.connect(coordinator.config.database_url.removeprefix("sqlite:///"),
                           timeout=0)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


class Lines:
    """A process's output lines, read on a thread; ``wait_for`` blocks on the next ones."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.seen: list[str] = []
        self._q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self._q.put(raw.decode(errors="replace"))

    def wait_for(self, text: str, timeout: float = TIMEOUT) -> str:
        while True:
            try:
                line = self._q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line with {text!r}; saw {self.seen}") from None
            self.seen.append(line)
            if text in line:
                return line


@pytest.mark.skipif(not HAVE_MOSQUITTO, reason=NEED_MOSQUITTO)
def test_serve_started_during_a_lock_waits_for_the_registry(
        tmp_path: Path, broker: EmbeddedBroker) -> None:
    coordinator = Coordinator.init(tmp_path / "c")
    with locked(coordinator):
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "coordinator", "serve", "--home",
             str(coordinator.home), "--broker", broker.url],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert proc.stdout is not None
            out = Lines(proc.stdout)
            line = out.wait_for("is locked by another process")
            assert "waiting" in line and "Traceback" not in "".join(out.seen)
            assert proc.poll() is None
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    try:
        out.wait_for("coordinator serving on")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not [line for line in out.seen if "Traceback" in line]


def test_model_release_on_a_locked_registry_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    coordinator = Coordinator.init(tmp_path / "c")
    os.environ.pop("EDGEFLEET_STORAGE_KEY", None)
    with locked(coordinator):
        code = main(["model", "release", "--home", str(coordinator.home), "--broker",
                     "mqtt://127.0.0.1:9", "--name", "m", "--version", "1", "--to", "all"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "is locked by another process" in err, err
