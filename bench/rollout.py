"""Rollouts: what one controller step costs at fleet scale, against ``fleet status``'s query.

A coordinator registry (SQLite, on tmpfs where there is one) with ``devices`` enrolled (500;
quick: 10), each running m 1 and having sent 10 ``inference`` telemetry messages for m 1 and
10 for m 2 through the real ingest path. One rollout of m 2 is baking a 100% wave (every
device judged, long bake: each step is a ``wait`` with the full evidence). Timed, interleaved:

* ``Rollouts.tick``: fleet rows, ``telemetry.version_health`` for the candidate and the
  baseline, ``rollout.decide`` over every device, the last recorded decision;
* baseline: ``coordinator.fleet.rows`` (what ``fleet status`` reads per call);
* ``rollout.decide`` alone on the same rows and evidence (the pure controller).

So the controller's share is visible, and a tick interval can be chosen (``--interval``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ._util import Row, interleaved, median

NAME = "rollout"


def _registry(root: Path, devices: int) -> tuple[object, int]:
    import json

    from edgefleet.coordinator import rollout as ctl
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.coordinator.ingest import TELEMETRY, Ingest
    from edgefleet.coordinator.rollouts import RolloutStore
    from edgefleet.protocol.device import DevicePublic
    from edgefleet.protocol.keys import SigningKey, generate_kem_key
    from edgefleet.protocol.messages import Telemetry

    c = Coordinator.init(root / "coordinator")
    meta = {"input": {"name": "x", "dtype": "float32", "shape": [None, 4]},
            "output": {"name": "y", "dtype": "float32", "shape": [None, 3]}}  # fmt: skip
    for v in ("1", "2"):
        path = root / f"m{v}.onnx"
        path.write_bytes(b"opaque model " + v.encode())
        path.with_suffix(".json").write_text(json.dumps(meta))
        c.register_model("m", path, version=v, check=False)
    ids = [f"dev-{i:04d}" for i in range(devices)]
    for d in ids:
        c.enroll(DevicePublic(device_id=d, sign_public=SigningKey.generate().public_raw,
                              kem=generate_kem_key("x25519").public()))  # fmt: skip
    now = int(time.time())
    c.registry.update_devices({d: {"active_name": "m", "active_version": "1",
                                   "active_sequence": 1, "state": "idle", "last_seen": now}
                               for d in ids})  # fmt: skip
    ingest = Ingest(c.registry)
    window = {"count": 20, "errors": 0, "rows": 20, "lat": [0, 15, 5], "classes": {"0": 12,
              "1": 8}}  # fmt: skip
    for k in range(10):
        for d in ids:
            metrics = {"inference": {"m@1": window, "m@2": window}}
            ingest.add(d, TELEMETRY, Telemetry(device_id=d, time=now - k, metrics=metrics).encode())
        ingest.flush()
    spec = ctl.RolloutSpec(name="m", version="2", canary=ctl.Stage.parse("100%"),
                           waves=(ctl.Stage.parse("100%"),),
                           gates=tuple(ctl.Gate.parse(g) for g in ("error_rate<0.01",
                                       "p95_latency<1.5x", "class_shift<0.25")),
                           bake=86400, min_samples=50)  # fmt: skip
    store = RolloutStore(c.registry)
    rid = store.create(spec, now - 60)
    baking = ctl.RolloutState(phase="baking", wave=0, wave_devices=tuple(ids),
                              released=tuple(ids), previous=dict.fromkeys(ids, "1"),
                              sequence=1, since=now - 30)  # fmt: skip
    r = store.get(rid)
    store.save(r, baking, now)
    return c, rid


def run(quick: bool) -> list[Row]:
    from edgefleet.coordinator import fleet
    from edgefleet.coordinator import rollout as ctl
    from edgefleet.coordinator.rollouts import Rollouts, TelemetryEvidence, fleet_rows

    devices, reps = (10, 3) if quick else (500, 15)
    # the registry on tmpfs where there is one: the step's cost, not the disk's fsync latency
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="bench-rollout-", dir=shm) as tmp:
        c, rid = _registry(Path(tmp), devices)
        ro = Rollouts(c, None)  # type: ignore[arg-type]
        r = ro.store.get(rid)
        now = time.time()
        rows = fleet_rows(ro.registry, r.spec, now)
        evidence = TelemetryEvidence()(ro.registry, r, now)
        assert ro.tick(rid).action == "wait"
        times = interleaved({
            "tick": lambda: ro.tick(rid),
            "rows": lambda: fleet.rows(ro.registry, int(time.time())),
            "decide": lambda: ctl.decide(r.spec, r.state, rows, evidence, now),
        }, reps)  # fmt: skip
        ro.registry.engine.dispose()
    tick, base, pure = (median(times[k]) * 1e3 for k in ("tick", "rows", "decide"))
    return [
        Row(key="rollout.tick_ms", metric=f"Rollouts.tick, {devices} devices judged, 3 gates",
            value=tick, unit="ms", baseline="fleet.rows (fleet status)", baseline_value=base,
            note="one controller step at fleet scale; the interval default is 2 s"),
        Row(key="rollout.decide_ms", metric=f"rollout.decide alone, {devices} devices",
            value=pure, unit="ms", baseline="Rollouts.tick", baseline_value=tick,
            note="the pure controller's share of a step"),
    ]  # fmt: skip
