"""The operator API under load: 50 viewers polling the fleet page of a 1,000-device fleet.

A coordinator home with 1,000 enrolled devices (quick: 100), each with a reported version and
a last-seen time, served by ``edgefleet console serve`` in its own process (uvicorn, one
worker). 50 viewers (quick: 5), each its own thread and keep-alive connection with a viewer
token, poll ``GET /api/v1/devices`` (what the dashboard's fleet page loads every 5 s) as fast
as the answers come, 40 requests each (quick: 10). Baseline, same run, same machine: a bare
FastAPI app on uvicorn in its own process answering one route with the same JSON body, read
from a file at start (no auth, no database, no serialization of rows), polled the same way.
Repetitions interleave baseline and ours; the p50/p95 of every request's latency is reported.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
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


def _poll(url: str, headers: dict[str, str], viewers: int, requests: int) -> list[float]:
    import httpx

    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(viewers)

    def viewer() -> None:
        mine = []
        with httpx.Client(headers=headers, timeout=60) as client:
            client.get(url).raise_for_status()  # connect first
            start.wait()
            for _ in range(requests):
                t0 = time.perf_counter()
                client.get(url).raise_for_status()
                mine.append(time.perf_counter() - t0)
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
            base: list[float] = []
            for _ in range(reps):
                base += _poll(bare_url, {}, viewers, requests)
                mine += _poll(ours_url, auth, viewers, requests)
        finally:
            for proc in (ours, bare):
                if proc is not None:
                    proc.terminate()
                    proc.wait(10)
    what = f"{viewers} viewers polling the fleet page of {devices} devices"
    note = f"{len(body) // 1024} KiB per answer; {len(mine)} requests each"
    return [
        Row(key="fleet_page_p95_ms", metric=f"GET /api/v1/devices p95, {what}",
            value=_q(mine, 0.95) * 1e3, unit="ms", baseline="bare FastAPI route, same body",
            baseline_value=_q(base, 0.95) * 1e3, note=note),
        Row(key="fleet_page_p50_ms", metric=f"GET /api/v1/devices p50, {what}",
            value=_q(mine, 0.50) * 1e3, unit="ms", baseline="bare FastAPI route, same body",
            baseline_value=_q(base, 0.50) * 1e3),
    ]  # fmt: skip
