"""The operator API under load: 50 viewers polling the fleet page of a 1,000-device fleet.

A coordinator home with 1,000 enrolled devices (quick: 100), each with a reported version and
a last-seen time, served by ``edgefleet console serve`` in its own process (uvicorn, one
worker). 50 viewers (quick: 5), each its own thread and keep-alive connection with a viewer
token, poll ``GET /api/v1/devices`` (what the dashboard's fleet page loads every 5 s) as fast
as the answers come, 40 requests each (quick: 10). Baseline, same run, same machine: a bare
FastAPI app on uvicorn in its own process answering one route with the same JSON body, read
from a file at start (no auth, no database, no serialization of rows), polled the same way.
Repetitions interleave baseline and ours; the p50/p95 of every request's latency is reported.

Three ways of polling ours: plain GETs (the API serves its cached body while the registry's
generation holds); conditional GETs with the ETag of the last answer (what the dashboard's
browser sends: 304 while nothing changed); and plain GETs while a writer changes one device's
last seen every 0.2 s, as the ingest of a live fleet does (each change is a new body: the rows
are built again, once per change, not once per request).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ._util import Row

NAME = "console"

BARE = """
import json, sys
import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response
body = open(sys.argv[1], "rb").read()
app = FastAPI()
@app.get("/bare")
def bare() -> Response:
    return Response(body, media_type="application/json")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _fleet(work: Path, devices: int) -> tuple[Path, str]:
    """A coordinator home with ``devices`` enrolled, reporting devices; a viewer token."""
    from edgefleet.coordinator import access
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.protocol.device import DevicePublic
    from edgefleet.protocol.keys import SigningKey, generate_kem_key

    c = Coordinator.init(work / "coordinator")
    sign, kem = SigningKey.generate().public_raw, generate_kem_key("x25519").public()
    now = int(time.time())
    for i in range(devices):
        c.enroll(DevicePublic(device_id=f"dev-{i:05d}", sign_public=sign, kem=kem))
    c.registry.update_devices({
        f"dev-{i:05d}": {"last_seen": now - i % 90, "state": "idle", "active_name": "digits",
                         "active_version": "1", "active_sequence": 1,
                         "last_result": {"code": "ok"}}
        for i in range(devices)
    })  # fmt: skip
    for g in range(10):
        c.registry.add_to_group(f"site-{g}", [f"dev-{i:05d}" for i in range(g, devices, 10)])
    token = access.create_token(c.registry, name="bench", role="viewer", by="bench")
    c.registry.engine.dispose()
    return c.home, token


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within 60 s")


def _poll(url: str, headers: dict[str, str], viewers: int, requests: int,
          conditional: bool = False) -> list[float]:  # fmt: skip
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(viewers)

    def viewer() -> None:
        mine = []
        with httpx.Client(headers=headers, timeout=60) as client:
            etag = client.get(url).raise_for_status().headers.get("etag")  # connect first
            start.wait()
            for _ in range(requests):
                asked = {"If-None-Match": etag} if conditional and etag else {}
                t0 = time.perf_counter()
                r = client.get(url, headers=asked)
                mine.append(time.perf_counter() - t0)
                if r.status_code != 304:
                    etag = r.raise_for_status().headers.get("etag")
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=viewer) for _ in range(viewers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def _q(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def run(quick: bool) -> list[Row]:
    import httpx

    devices, viewers, requests, reps = (100, 5, 10, 1) if quick else (1000, 50, 40, 2)
    with tempfile.TemporaryDirectory(prefix="bench-console-") as tmp:
        work = Path(tmp)
        home, token = _fleet(work, devices)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        ours_port, bare_port = _port(), _port()
        ours = subprocess.Popen(
            [sys.executable, "-m", "edgefleet", "console", "serve", "--home", str(home),
             "--listen", f"127.0.0.1:{ours_port}"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        bare = None
        try:
            ours_url = f"http://127.0.0.1:{ours_port}/api/v1/devices"
            auth = {"Authorization": f"Bearer {token}"}
            _wait_up(f"http://127.0.0.1:{ours_port}/healthz", ours)
            body = httpx.get(ours_url, headers=auth, timeout=60).content
            assert len(json.loads(body)["devices"]) == devices
            (work / "body.json").write_bytes(body)
            bare = subprocess.Popen([sys.executable, "-c", BARE, str(work / "body.json"),
                                     str(bare_port)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)  # fmt: skip
            bare_url = f"http://127.0.0.1:{bare_port}/bare"
            _wait_up(bare_url, bare)
            mine: list[float] = []
            revalidated: list[float] = []
            live: list[float] = []
            base: list[float] = []
            for _ in range(reps):
                base += _poll(bare_url, {}, viewers, requests)
                mine += _poll(ours_url, auth, viewers, requests)
                revalidated += _poll(ours_url, auth, viewers, requests, conditional=True)
                with _changing(home) as changes:
                    live += _poll(ours_url, auth, viewers, requests)
        finally:
            for proc in (ours, bare):
                if proc is not None:
                    proc.terminate()
                    proc.wait(10)
    what = f"{viewers} viewers polling the fleet page of {devices} devices"
    note = f"{len(body) // 1024} KiB per answer; {len(mine)} requests each"
    against, bare95 = "bare FastAPI route, same body", _q(base, 0.95) * 1e3
    return [
        Row(key="fleet_page_p95_ms", metric=f"GET /api/v1/devices p95, {what}",
            value=_q(mine, 0.95) * 1e3, unit="ms", baseline="bare FastAPI route, same body",
            baseline_value=_q(base, 0.95) * 1e3, note=note),
        Row(key="fleet_page_p50_ms", metric=f"GET /api/v1/devices p50, {what}",
            value=_q(mine, 0.50) * 1e3, unit="ms", baseline="bare FastAPI route, same body",
            baseline_value=_q(base, 0.50) * 1e3),
        Row(key="fleet_page_304_p95_ms", value=_q(revalidated, 0.95) * 1e3, unit="ms",
            metric=f"GET /api/v1/devices with If-None-Match (the dashboard's poll) p95, {what}",
            note="304 while nothing changed", baseline=against, baseline_value=bare95),
        Row(key="fleet_page_live_p95_ms", value=_q(live, 0.95) * 1e3, unit="ms",
            metric=f"GET /api/v1/devices p95 while a device reports every 0.2 s, {what}",
            note=f"{changes[0]} changes during the polls", baseline=against,
            baseline_value=bare95),
    ]  # fmt: skip


@contextlib.contextmanager
def _changing(home: Path, every: float = 0.2) -> Iterator[list[int]]:
    """A thread that writes one device's last seen every ``every`` seconds (what ingest does
    for a status), round the fleet; yields the count of changes, final once it stopped."""
    from edgefleet.coordinator.home import Coordinator

    c = Coordinator.open(home)
    ids = [d.device_id for d in c.registry.devices()]
    count, stop = [0], threading.Event()

    def write() -> None:
        while not stop.wait(every):
            device = ids[count[0] % len(ids)]
            c.registry.update_devices({device: {"last_seen": int(time.time())}})
            count[0] += 1

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join()
        c.registry.engine.dispose()
