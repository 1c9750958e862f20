"""Fan-out as a fleet would see it: thin protocol-faithful devices against raw MQTT baselines.

One mosquitto (``EmbeddedBroker``, persistence off), a real ``CoordinatorService`` in this
process, and the same ~5 MB ONNX model as ``bench delivery`` (quick: ~1 MB) in 256 KiB
segments. The devices are thin pullers (``simulations.thin``: each its own connection and
credentials; verify the offer, unwrap the envelope, pull with the agent's window and timeout,
hash every chunk, report statuses), run in one spawned child process, plus one real
``AgentDaemon`` (threads of this process: verify, decrypt, write, fsync, load, smoke-test).
Every repetition interleaves, in rotating order:

- **thin + agent**: 49 thin pullers + 1 full agent (quick: 4 + 1), from ``release(seq)``
  until every thin device verified every chunk and the agent installed — the headline,
  against **raw push**: raw paho, one publisher pushing the same ciphertext segments, QoS 1,
  to 50 subscribers (one topic each), timed until every subscriber has every byte;
- **transport only**: 50 thin pullers, no agent (installs stubbed), against **raw pull**:
  50 raw paho clients each pulling the same segments by request/response (QoS 1 request,
  QoS 0 reply, the agent's window of 8) from one raw server client.

Also from the transport-only runs: devices per second, the coordinator's CPU seconds per
device-MB (this process's CPU; the raw clients idle meanwhile), and the MQTT payload bytes
per device (offer, chunk frames, requests, statuses; MQTT and TCP framing not counted) ÷ the
model size. And the first-offer latency during a fan-out: a release to one probe device
(its own thin process) published once 20 % of a transport-only fan-out's chunks are out,
through the main link (as before: behind the chunk replies) and through the offer link,
alternately first; timed from the publish call to the probe's offer arrival (monotonic
clocks, same machine). A profile of the coordinator's threads during one extra
transport-only fan-out goes into the notes.
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._util import Row, median
from .delivery import _big_mlp, _Raw, _raw_push, _raw_req, _rig

NAME = "fleet"
_NOTES: list[str] = []
TIMEOUT = 180.0  # s: a fan-out that takes longer is a failure, not a figure
MB = 1e6


def notes() -> list[str]:
    return list(_NOTES)


class _RawPullFan:
    """Raw paho request/response to many clients: each asks for segment i (4-byte index) on
    its own request topic; one server client answers from its network thread on the
    client's chunk topic, QoS 0; ``window`` requests in flight per client."""

    def __init__(self, server: _Raw, clients: list[tuple[_Raw, str]], window: int) -> None:
        self.server, self.window = server, window
        self.clients = {u: c for c, u in clients}
        self.segments: tuple[bytes, ...] = ()
        self._next: dict[str, int] = {}
        self._lock = threading.Lock()

    def hooks(self, on: bool) -> None:
        """Serve and ask (on), or leave the clients to ``_raw_push`` (off)."""
        self.server.hook = self._serve if on else None
        for u, c in self.clients.items():
            c.hook = (lambda _m, u=u: self._ask(u)) if on else None  # type: ignore[misc]

    def _serve(self, msg: Any) -> None:
        user = msg.topic.split("/")[2]
        i = int.from_bytes(msg.payload, "big")
        self.server.client.publish(f"ef/v1/dev/{user}/chunk", self.segments[i], qos=0)

    def _ask(self, user: str) -> None:
        with self._lock:
            i = self._next[user]
            self._next[user] = i + 1
        if i < len(self.segments):
            self.clients[user].client.publish(_raw_req(user), i.to_bytes(4, "big"), qos=1)

    def __call__(self, segments: tuple[bytes, ...]) -> float:
        self.segments = segments
        total = sum(len(s) for s in segments)
        for u, c in self.clients.items():
            c.arm(total)
            self._next[u] = 0
        self.server.arm(1 << 62)
        t0 = time.perf_counter()
        for u in self.clients:
            for _ in range(self.window):
                self._ask(u)
        deadline = time.monotonic() + TIMEOUT
        for c in self.clients.values():
            if not c.done.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"raw pull fan-out: a client got {c.got} of {total} bytes")
        return time.perf_counter() - t0


def _profiled(target: Callable[[], Any]) -> tuple[Any, str]:
    """Run ``target`` with every thread started meanwhile profiled; (result, top lines)."""
    profiles: list[cProfile.Profile] = []
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        p = cProfile.Profile()
        profiles.append(p)
        p.enable()
        try:
            original(self)
        finally:
            p.disable()

    threading.Thread.run = run  # type: ignore[method-assign]
    try:
        result = target()
    finally:
        threading.Thread.run = original  # type: ignore[method-assign]
    return result, _top(profiles)


def _top(profiles: list[cProfile.Profile]) -> str:
    out = io.StringIO()
    live = [p for p in profiles if p.getstats()]
    if not live:
        return "(nothing profiled)"
    stats = pstats.Stats(live[0], stream=out)
    for p in live[1:]:
        stats.add(p)
    stats.sort_stats("tottime").print_stats(14)
    lines = out.getvalue().splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(f"    {line.strip()[:150]}" for line in lines[start:] if line.strip())


def run(quick: bool) -> list[Row]:
    from edgefleet.infra.broker import EmbeddedBroker

    _NOTES.clear()
    try:
        EmbeddedBroker(force_kind="mosquitto", data_dir=Path(tempfile.gettempdir()))
    except RuntimeError as exc:
        _NOTES.append(f"skipped: {exc} (a fleet figure needs a real broker)")
        return []
    root = Path(tempfile.mkdtemp(prefix="edgefleet-bench-fleet-"))
    stops: list[Callable[[], None]] = []
    try:
        return _run(root, quick, stops)
    finally:
        for stop in reversed(stops):
            try:
                stop()
            except Exception:  # clean-up must not hide the benchmark's own error
                pass
        shutil.rmtree(root, ignore_errors=True)


def _run(root: Path, quick: bool, stops: list[Callable[[], None]]) -> list[Row]:
    from edgefleet.coordinator import release as releases
    from edgefleet.protocol.keys import decode_public_key
    from edgefleet.protocol.manifest import Manifest
    from edgefleet.simulations.scale import cpu_seconds
    from edgefleet.simulations.thin import ThinProcess, enroll_thin, thin_specs

    from .delivery import _Agents

    n = 5 if quick else 50
    reps = 1 if quick else 3
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    model = _big_mlp(root / "models" / "fleet", (512, 448) if quick else (1024, 1152))
    agent_id, raw_names = "full-000", [f"raw-{i:03d}" for i in range(n)]
    thin_ids = [f"thin-{i:03d}" for i in range(n)]
    # the thin identities are enrolled before the rig writes the broker's passwords
    rig = _rig(root, [agent_id], raw_names, before_broker=lambda c: enroll_thin(
        c, [*thin_ids, "probe-000"]))
    stops.append(rig.close)
    identities = rig.extra
    mv = rig.coord.register_model("bench-fleet", model)
    specs = thin_specs(identities, rig.users)
    probe_spec = [s for s in specs if s.device_id == "probe-000"]
    fan_specs = [s for s in specs if s.device_id != "probe-000"]
    root_public = decode_public_key((rig.coord.home / "root.pub").read_bytes())
    thin = ThinProcess(fan_specs, root_public, "127.0.0.1", rig.port)
    probe = ThinProcess(probe_spec, root_public, "127.0.0.1", rig.port)
    stops += [thin.stop, probe.stop]
    thin.ready()
    probe.ready()
    agent = _Agents([rig.homes[agent_id]])
    stops.append(agent.stop)
    agent.start()
    port, svc = rig.port, rig.svc
    pub = _Raw(port, "bench-raw-pub", "coordinator", rig.users["coordinator"],
               tuple(_raw_req(u) for u in raw_names))  # fmt: skip
    subs = [(_Raw(port, f"bench-{u}", u, rig.users[u], (f"ef/v1/dev/{u}/chunk",)),
             f"ef/v1/dev/{u}/chunk") for u in raw_names]  # fmt: skip
    stops.append(pub.stop)
    stops.extend(c.stop for c, _ in subs)
    for c in [pub, *(c for c, _ in subs)]:
        c.wait_ready()
    _NOTES.append(f"set-up (model, homes, {n} thin devices, broker, raw clients): "
                  f"{time.perf_counter() - t0:.1f} s; load average before: "
                  f"{load0[0]:.1f} {load0[1]:.1f} {load0[2]:.1f} on {os.cpu_count()} cores")

    fan = _RawPullFan(pub, [(c, u) for (c, _t), u in zip(subs, raw_names, strict=True)], 8)
    me = os.getpid()

    times: dict[str, list[float]] = {"push": [], "thin+agent": [], "pull": [], "thin": []}
    cpu_per_mb: list[float] = []
    wire: list[float] = []
    offer_ms: dict[str, list[float]] = {"main link": [], "offer link": []}
    busy: dict[str, list[float]] = {}
    raw_cpu: dict[str, list[float]] = {}  # CPU s of every process taking part, per fan-out
    fanout_ids = ",".join(thin_ids)

    def thin_run(with_agent: bool, r: int) -> float:
        sel = fanout_ids + (f",{agent_id}" if with_agent else "")
        release, _ = rig.coord.build(mv.name, mv.version, sel)
        if with_agent:
            agent.arm()
        pids = [me, rig.broker_pid, thin.pid]
        c0, io0, sent0 = [cpu_seconds(p) for p in pids], _payload(thin), svc.chunks.sent_chunks
        t = time.perf_counter()
        svc.release(release.sequence)
        if not with_agent:
            _probe(release, r, sent0)
        if not thin.wait_sequence(release.sequence, TIMEOUT):
            raise RuntimeError(f"thin fan-out: not done within {TIMEOUT} s: {thin.totals()}")
        if with_agent:
            agent.wait(TIMEOUT)
        dt = time.perf_counter() - t
        used = [cpu_seconds(p) - c for p, c in zip(pids, c0, strict=True)]
        key = "thin+agent" if with_agent else "thin"
        busy.setdefault(key, []).append(sum(used) / dt)
        if r:
            raw_cpu.setdefault(key, []).append(sum(used))
            raw_cpu.setdefault(f"{key}: its bench process", []).append(used[0])
            _NOTES.append(f"  rep {r}, {key}: {dt:.2f} s; CPU s: bench process (coordinator"
                          f"{' + agent' if with_agent else ''}) {used[0]:.2f}, mosquitto "
                          f"{used[1]:.2f}, thin process {used[2]:.2f}")  # fmt: skip
            if not with_agent:
                cpu_per_mb.append(used[0] / (n * mv.size / MB))
                wire.append((_payload(thin) - io0) / n)
        return dt

    def _probe(fanout: Any, r: int, sent0: int) -> None:
        want = max(1, int(0.2 * n * Manifest.decode(fanout.manifest).segments))
        deadline = time.monotonic() + 30
        while svc.chunks.sent_chunks - sent0 < want and time.monotonic() < deadline:
            time.sleep(0.005)
        order = ["offer link", "main link"] if r % 2 else ["main link", "offer link"]
        for how in order:
            rel, _ = rig.coord.build(mv.name, mv.version, "probe-000")
            link = svc.offer_link if how == "offer link" else svc.link
            t = time.monotonic()
            releases.publish_sequence(svc.registry, link, rel.sequence)
            arrived = None
            while arrived is None and time.monotonic() < t + 30:
                arrived = probe.times(rel.sequence)[0][1]
                time.sleep(0.002)
            if arrived is not None and r:
                offer_ms[how].append((arrived - t) * 1e3)

    names = list(times)
    segments: tuple[bytes, ...] = ()
    for r in range(reps + 1):  # rep 0: warm-up (page cache, first ORT session), discarded
        k = r % len(names)
        order = names[k:] + names[:k]
        for what in order if r % 2 == 0 else order[::-1]:
            if what in ("push", "pull"):
                _, built = rig.coord.build(mv.name, mv.version, fanout_ids)
                segments = built.segments
                fan.hooks(what == "pull")
                pids = [me, rig.broker_pid]
                c0, s0 = [cpu_seconds(p) for p in pids], _thread_cpu(pub)
                dt = _raw_push(pub, subs, segments) if what == "push" else fan(segments)
                used = [cpu_seconds(p) - c for p, c in zip(pids, c0, strict=True)]
                server = _thread_cpu(pub) - s0
                busy.setdefault(what, []).append(sum(used) / dt)
                if r:
                    raw_cpu.setdefault(what, []).append(sum(used))
                    raw_cpu.setdefault(f"{what}: its server thread", []).append(server)
                    _NOTES.append(f"  rep {r}, raw {what}: {dt:.2f} s; CPU s: bench process "
                                  f"(raw server + clients) {used[0]:.2f}, of which the server's "
                                  f"network thread {server:.2f}; mosquitto {used[1]:.2f}")
            else:
                dt = thin_run(what == "thin+agent", r)
            if r:
                times[what].append(dt)
    _, profile = _profiled(lambda: _profile_run(rig, mv, fanout_ids, thin))
    load1 = os.getloadavg()
    _NOTES.append("fan-out, s: " + "; ".join(
        f"{k} " + ", ".join(f"{t:.2f}" for t in v) for k, v in times.items()))  # fmt: skip
    _NOTES.append("busy cores during the fan-outs (CPU s ÷ wall s of the bench process, "
                  "mosquitto and the thin process): " + ", ".join(
                      f"{k} {median(v):.2f}" for k, v in busy.items()))  # fmt: skip
    _NOTES.append("CPU s of a whole fan-out, all processes (median): " + ", ".join(
        f"{k} {median(v):.2f}" for k, v in raw_cpu.items()) + " (the bench process of a thin "
        "fan-out is the coordinator, and the agent with it; the thin devices' own work is "
        "their process's); when the cores are busy throughout, wall time follows this work, "
        "not the protocol's waiting")  # fmt: skip
    _NOTES.append("first offer during a fan-out, ms: " + "; ".join(
        f"{k} " + ", ".join(f"{t:.0f}" for t in v) for k, v in offer_ms.items()))  # fmt: skip
    _NOTES.append(f"load average after: {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f}")
    _NOTES.append("coordinator profile (one extra transport-only fan-out, all its threads, "
                  "by own time; waits in select/acquire are idle time):\n" + profile)
    return _rows(n, mv.size, len(segments), reps, times, cpu_per_mb, wire, offer_ms)


def _thread_cpu(raw: Any) -> float:
    """CPU seconds of a raw client's paho network thread (Linux ``/proc``)."""
    tid = raw.client._thread.native_id
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _payload(thin: Any) -> int:
    """MQTT payload bytes the thin devices received and sent so far."""
    t = thin.totals()
    return int(t["bytes_in"] + t["bytes_out"])


def _profile_run(rig: Any, mv: Any, ids: str, thin: Any) -> None:
    """A fan-out through a second service started (and so profiled) inside ``_profiled``."""
    import dataclasses

    from edgefleet.coordinator.service import CoordinatorService, mqtt_config_for

    rig.svc.stop()  # the profiled one takes over the shared subscription
    cfg = mqtt_config_for(rig.coord, client_id="coordinator-bench-prof", broker=rig.broker.url,
                          password=rig.users["coordinator"], protocol=rig.broker.protocol)
    svc = CoordinatorService(rig.coord, dataclasses.replace(cfg, keepalive=60))
    svc.start()
    try:
        release, _ = rig.coord.build(mv.name, mv.version, ids)
        svc.release(release.sequence)
        thin.wait_sequence(release.sequence, TIMEOUT)
    finally:
        svc.stop()
        rig.closers.remove(rig.svc.stop)


def _rows(n: int, size: int, segs: int, reps: int, times: dict[str, list[float]],
          cpu_per_mb: list[float], wire: list[float],
          offer_ms: dict[str, list[float]]) -> list[Row]:  # fmt: skip
    mb = size / MB
    push, pull = median(times["push"]), median(times["pull"])
    thin_agent, thin = median(times["thin+agent"]), median(times["thin"])
    label = f"{mb:.1f} MB model, {segs} chunks"
    rows = [
        Row(key="thin_fanout_s",
            metric=f"{n - 1} thin pullers + 1 full agent: release → all verified, agent "
                   f"installed ({label})",
            value=thin_agent, unit="s",
            baseline=f"raw paho push of the same bytes to {n} subscribers, QoS 1",
            baseline_value=push, aim="<= 1.3", note=f"median of {reps}"),
        Row(key="transport_s",
            metric=f"{n} thin pullers, transport only (installs stubbed)",
            value=thin, unit="s",
            baseline=f"raw paho request/response fan-out to {n} clients, window 8",
            baseline_value=pull, aim="<= 1.2", note=f"median of {reps}"),
        Row(key="devices_per_s", metric="devices served per second (transport only)",
            value=n / thin, unit="devices/s"),
        Row(key="coord_cpu_s_per_device_mb",
            metric="coordinator CPU seconds per device-MB (transport only)",
            value=median(cpu_per_mb), unit="CPU s/MB"),
        Row(key="wire_per_device",
            metric="MQTT payload bytes per device (offer, chunks, requests, statuses) ÷ model "
                   "size",
            value=median(wire) / size, unit="x", note=f"{median(wire):,.0f} B per device"),
    ]  # fmt: skip
    if offer_ms["main link"] and offer_ms["offer link"]:
        rows.append(Row(
            key="first_offer_ms", metric="first offer during a fan-out: offer link",
            value=median(offer_ms["offer link"]), unit="ms",
            baseline="the same offer on the chunk link (before)",
            baseline_value=median(offer_ms["main link"]), note=f"median of {reps}"))  # fmt: skip
    return rows
