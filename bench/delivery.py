"""Release delivery over MQTT: fleet fan-out time and single-agent chunk throughput.

Everything runs on loopback against one mosquitto (``EmbeddedBroker``: password file, the
EdgeFleet ACL, persistence off) started for this benchmark, with a real
``CoordinatorService`` (its own coordinator home, 256 KiB segments) and real ``AgentDaemon`` s,
each with its own agent home.

**Fan-out.** A real model: an ONNX MLP (64 → 1024 → 1152 → 10, ~5 MB; quick: ~1 MB) whose
layers were fitted briefly on digits and then replaced by larger random weights, with a
sidecar of tensor specs and smoke vectors computed by onnxruntime on that very model, so every
agent loads it and passes its smoke test. 50 agents (quick: 5) are spread over 4 (quick: 2)
spawned processes, threads within each: the main figure. Beside the coordinator in one process
they are GIL-bound; the second row runs another 50 that way. Timed: from
``CoordinatorService.release(seq)`` (offers published) until every daemon's
``installed`` event is set (downloaded by windowed chunk pulls, verified, decrypted, stored,
loaded, smoke-tested, activated). Baseline, same broker, same run: raw paho-mqtt, one
publisher (the coordinator's broker user) publishing the same ciphertext segments, QoS 1, to
one topic per subscriber (``ef/v1/dev/raw-NNN/chunk``, users ``raw-NNN`` under the same ACL
pattern as devices), 50 subscriber clients with their own network threads, TCP_NODELAY on
every socket; timed until every subscriber has received every byte. Repetitions interleave
baseline and both agent layouts; medians are reported, and the notes give the CPU seconds
of this process, mosquitto and the agent processes per repetition. Also: coordinator bytes
sent per device (its offer plus ``ChunkServer.sent_bytes``) ÷ the model's plaintext size.

**Single agent.** A ~20 MB model (quick: ~4 MB), 78 chunks, to one agent (a thread of this
process, the coordinator's too): timed from
``release(seq)`` until the daemon's progress callback reports the last chunk written (the
download only, not the install) → MB/s of plaintext. Baseline: raw paho publish → subscribe
of the same bytes in the same chunks through the same broker. A second baseline is raw paho
request/response with the agent's window (8 requests in flight, a reply per request), the
floor of the pull design itself.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._util import Row, median

NAME = "delivery"
_NOTES: list[str] = []
TIMEOUT = 120.0  # s: a delivery that takes longer is a failure, not a figure
MB = 1e6


def notes() -> list[str]:
    return list(_NOTES)


# -- the model ----------------------------------------------------------------------------
def _big_mlp(out: Path, hidden: tuple[int, ...], seed: int = 0) -> Path:
    """An ONNX MLP of the given hidden sizes that loads and passes its own smoke test.

    Fitted briefly on digits (a real sklearn model), then its weights replaced by random ones
    of the requested shapes (He-scaled, so the softmax is not saturated). Writes
    ``<out>.onnx`` and the sidecar ``<out>.json`` (specs, smoke vectors, feature stats).
    """
    import json

    import numpy as np
    import onnxruntime as ort
    from edgefleet.models.digits import INPUT_NAME, N_FEATURES, OUTPUT_NAME, load_digits_split
    from edgefleet.models.onnx_export import mlp_to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier
    from threadpoolctl import threadpool_limits

    split = load_digits_split(seed)
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=20, random_state=seed)
    # one BLAS thread, as models.digits trains: idle OpenBLAS workers must not spin later
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(split.X_train, split.y_train)
    rng = np.random.default_rng(seed)
    sizes = [N_FEATURES, *hidden, len(clf.classes_)]
    clf.coefs_ = [
        (rng.standard_normal((a, b), dtype=np.float32) * np.sqrt(2.0 / a)).astype(np.float32)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    clf.intercepts_ = [rng.standard_normal(b, dtype=np.float32) * 0.01 for b in sizes[1:]]
    clf.hidden_layer_sizes = hidden
    clf.n_layers_ = len(sizes)
    data = mlp_to_onnx(clf, input_name=INPUT_NAME, output_name=OUTPUT_NAME)

    opts = ort.SessionOptions()  # as the agent's OrtRuntime makes its sessions
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
    smoke = []
    for x in split.X_test[:3]:
        p = sess.run(None, {INPUT_NAME: x[None, :]})[0]
        smoke.append({"input": [x.tolist()], "expected": [p[0].tolist()], "atol": 1e-4})
    meta = {
        "input": {"name": INPUT_NAME, "dtype": "float32", "shape": [None, N_FEATURES]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, len(clf.classes_)]},
        "hidden_layer_sizes": list(hidden),
        "smoke": smoke,
        "feature_stats": {
            "mean": split.X_train.astype(np.float64).mean(axis=0).tolist(),
            "std": split.X_train.astype(np.float64).std(axis=0).tolist(),
        },
    }
    path = out.with_suffix(".onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    out.with_suffix(".json").write_text(json.dumps(meta))
    return path


# -- the rig: coordinator, broker, agent homes --------------------------------------------
@dataclass
class _Rig:
    root: Path
    coord: Any  # Coordinator
    broker: Any  # simulations.brokers.SimBroker (an embedded mosquitto)
    users: dict[str, str]
    homes: dict[str, Path]
    svc: Any = None  # CoordinatorService
    closers: list[Callable[[], None]] = field(default_factory=list)
    extra: Any = None  # what ``_rig``'s ``before_broker`` returned

    @property
    def port(self) -> int:
        return int(self.broker.embedded.port)

    @property
    def broker_pid(self) -> int:
        proc = self.broker.embedded._proc
        return proc.pid if proc is not None else 0

    def close(self) -> None:
        for close in reversed(self.closers):
            try:
                close()
            except Exception:  # clean-up must not hide the benchmark's own error
                logging.getLogger(__name__).exception("clean-up failed")


def _raw_req(user: str) -> str:
    """Where a raw baseline client sends its requests (not an EdgeFleet topic)."""
    return f"bench/raw/{user}/req"


def _rig(
    root: Path,
    devices: list[str],
    raw_users: list[str],
    before_broker: Callable[[Any], Any] | None = None,
) -> _Rig:
    """The fleet from ``simulations`` on a real mosquitto, plus broker accounts for the raw
    paho baselines (``raw_users``); ``before_broker(coordinator)`` runs (e.g. enrolls more
    devices) before the broker's passwords are written."""
    import dataclasses
    import secrets

    from edgefleet.coordinator.brokerconf import credentials
    from edgefleet.coordinator.service import CoordinatorService, mqtt_config_for
    from edgefleet.simulations.brokers import start_broker
    from edgefleet.simulations.homes import point_agents_at, provision_fleet

    fleet = provision_fleet(root / "agents", devices, coordinator_home=root / "coordinator")
    coord = fleet.coordinator
    made = before_broker(coord) if before_broker is not None else None
    users = {**credentials(coord), **{u: secrets.token_urlsafe(16) for u in raw_users}}
    # The raw baselines' request topic is outside the EdgeFleet tree: devices may write only
    # their own upstream topics, which the coordinator serves.
    extra = "".join(f"\nuser {u}\ntopic write {_raw_req(u)}\n" for u in raw_users)
    extra += "\nuser coordinator\ntopic read bench/raw/#\n"
    broker = start_broker(
        "mosquitto", users=users, data_dir=root / "broker", persistence=False, extra_acl=extra
    )
    rig = _Rig(root, coord, broker, users, fleet.homes, extra=made)
    rig.closers.append(broker.close)
    rig.closers.append(coord.registry.engine.dispose)
    point_agents_at(coord, fleet.homes, broker.url, broker.protocol)
    mqtt = mqtt_config_for(
        coord,
        client_id="coordinator-bench",
        broker=broker.url,
        password=users["coordinator"],
        protocol=broker.protocol,
    )
    rig.svc = CoordinatorService(coord, dataclasses.replace(mqtt, keepalive=60))
    rig.svc.start()
    rig.closers.append(rig.svc.stop)
    if not rig.svc.link.wait_connected(30):
        raise RuntimeError(f"coordinator not connected: {rig.svc.link.last_error}")
    return rig


# -- agents -------------------------------------------------------------------------------
class _Agents:
    """``AgentDaemon`` s as threads of this process, each with its own agent home."""

    def __init__(
        self, homes: list[Path], progress: Callable[[str, int, int], None] | None = None
    ) -> None:
        from edgefleet.agent.agent import Agent
        from edgefleet.agent.daemon import AgentDaemon, mqtt_config_for

        self.agents = [Agent.open(h) for h in homes]
        self.daemons = [AgentDaemon(a, mqtt_config_for(a), progress=progress) for a in self.agents]

    def start(self, timeout: float = 60.0) -> None:
        for d in self.daemons:
            d.start()
        deadline = time.monotonic() + timeout
        for d in self.daemons:
            if not d.link.wait_connected(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{d.device_id} not connected: {d.link.last_error}")

    def arm(self) -> None:
        for d in self.daemons:
            d.installed.clear()

    def wait(self, timeout: float) -> list[int | None]:
        deadline = time.monotonic() + timeout
        for d in self.daemons:
            if not d.installed.wait(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"{d.device_id}: not installed within {timeout} s")
        return self.sequences()

    def sequences(self) -> list[int | None]:
        return [None if a.active is None else a.active.manifest.sequence for a in self.agents]

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()
        for a in self.agents:
            a.close()


def _agent_process(homes: list[str], conn: Any) -> None:
    """Child process: run ``AgentDaemon`` s for ``homes``; obey "arm" / "wait" / "stop"."""
    import traceback

    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s [agents]: %(message)s"
    )
    agents = None
    try:
        agents = _Agents([Path(h) for h in homes])
        agents.start()
        conn.send(("ready", None))
        while True:
            cmd, arg = conn.recv()
            if cmd == "arm":
                agents.arm()
                conn.send(("armed", None))
            elif cmd == "wait":
                conn.send(("done", agents.wait(arg)))
            elif cmd == "stop":
                break
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        if agents is not None:
            agents.stop()
        conn.close()


class _AgentProcs:
    """The same daemons spread over ``n`` spawned child processes (threads within each)."""

    def __init__(self, homes: list[Path], n: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # never fork a process with threads
        self.kids = []
        for k in range(n):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=_agent_process,
                args=([str(h) for h in homes[k::n]], theirs),
                name=f"bench-agents-{k}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.kids.append((proc, mine))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p, _ in self.kids if p.pid is not None]

    def _recv(self, conn: Any, want: str, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise RuntimeError(f"agent process: no {want!r} within {timeout} s")
        what, arg = conn.recv()
        if what != want:
            raise RuntimeError(f"agent process: {what}: {arg}")
        return arg

    def start(self, timeout: float = 120.0) -> None:
        for _, conn in self.kids:
            self._recv(conn, "ready", timeout)

    def arm(self) -> None:
        for _, conn in self.kids:
            conn.send(("arm", None))
        for _, conn in self.kids:
            self._recv(conn, "armed", 30)
        for _, conn in self.kids:  # they now wait for the installs the release will cause
            conn.send(("wait", TIMEOUT))

    def wait(self, timeout: float) -> list[int | None]:
        return [s for _, conn in self.kids for s in self._recv(conn, "done", timeout + 5)]

    def stop(self) -> None:
        for _proc, conn in self.kids:
            try:
                conn.send(("stop", None))
            except OSError:
                pass
        for proc, conn in self.kids:
            proc.join(20)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            conn.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux ``/proc``; 0 elsewhere)."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


# -- raw paho clients (the baselines) -----------------------------------------------------
def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Raw:
    """A plain paho-mqtt 2.x client (MQTT v5, TCP_NODELAY, 20 in flight, own network thread)
    that counts the bytes it receives and can call a hook per message."""

    def __init__(
        self, port: int, client_id: str, user: str, password: str, subscribe: tuple[str, ...] = ()
    ) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.expect = 0
        self.got = 0
        self.done = threading.Event()
        self.hook: Callable[[Any], None] | None = None
        self._subs = subscribe
        self._ready = threading.Event()
        c = self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        c.username_pw_set(user, password)
        c.on_socket_open = _nodelay
        c.max_inflight_messages_set(20)
        c.on_connect = self._on_connect
        c.on_subscribe = lambda *_a: self._ready.set()
        c.on_message = self._on_message
        c.connect("127.0.0.1", port, keepalive=60, clean_start=True)
        c.loop_start()

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        if self._subs:
            client.subscribe([(t, 1) for t in self._subs])
        else:
            self._ready.set()

    def _on_message(self, _client: Any, _u: Any, msg: Any) -> None:
        self.got += len(msg.payload)
        if self.hook is not None:
            self.hook(msg)
        if self.got >= self.expect:
            self.done.set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self._ready.wait(timeout):
            raise RuntimeError("raw paho client did not connect and subscribe")

    def arm(self, expect: int) -> None:
        self.got, self.expect = 0, expect
        self.done.clear()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _raw_push(pub: _Raw, subs: list[tuple[_Raw, str]], segments: tuple[bytes, ...]) -> float:
    """Publish every segment to every subscriber's topic (chunk-major); seconds until all
    subscribers have every byte."""
    total = sum(len(s) for s in segments)
    for sub, _topic in subs:
        sub.arm(total)
    publish = pub.client.publish
    t0 = time.perf_counter()
    for seg in segments:
        for _sub, topic in subs:
            publish(topic, seg, qos=1)
    deadline = time.monotonic() + TIMEOUT
    for sub, _topic in subs:
        if not sub.done.wait(max(0.0, deadline - time.monotonic())):
            raise RuntimeError(f"raw push: a subscriber got {sub.got} of {total} bytes")
    return time.perf_counter() - t0


class _RawPull:
    """Raw paho request/response: the subscriber asks for chunk i (4-byte index) on its
    ``up/rawreq`` topic, the server client answers on its chunk topic from its network
    thread; ``window`` requests in flight. Not a topic the coordinator listens to."""

    def __init__(
        self, server: _Raw, device: _Raw, user: str, segments: tuple[bytes, ...], window: int
    ) -> None:
        self.server, self.device, self.segments, self.window = server, device, segments, window
        self.req_topic = _raw_req(user)
        self.chunk_topic = f"ef/v1/dev/{user}/chunk"
        self._next = 0
        self._lock = threading.Lock()
        server.hook = self._serve
        device.hook = self._received

    def _serve(self, msg: Any) -> None:
        i = int.from_bytes(msg.payload, "big")
        self.server.client.publish(self.chunk_topic, self.segments[i], qos=1)

    def _ask(self) -> None:
        with self._lock:
            i, self._next = self._next, self._next + 1
        if i < len(self.segments):
            self.device.client.publish(self.req_topic, i.to_bytes(4, "big"), qos=1)

    def _received(self, _msg: Any) -> None:
        self._ask()

    def __call__(self) -> float:
        total = sum(len(s) for s in self.segments)
        self.device.arm(total)
        self.server.arm(1 << 62)
        self._next = 0
        t0 = time.perf_counter()
        for _ in range(self.window):
            self._ask()
        if not self.device.done.wait(TIMEOUT):
            raise RuntimeError(f"raw pull: got {self.device.got} of {total} bytes")
        return time.perf_counter() - t0


# -- the benchmarks -----------------------------------------------------------------------
def _fanout(
    rig: _Rig,
    fleets: dict[str, list[str]],
    model: tuple[str, str],
    plaintext: int,
    reps: int,
    raw_names: list[str],
    procs: int,
) -> list[Row]:
    stops: list[Callable[[], None]] = []
    try:
        return _fanout_run(rig, fleets, model, plaintext, reps, raw_names, procs, stops)
    finally:
        for stop in reversed(stops):
            stop()


def _fanout_run(
    rig: _Rig,
    fleets: dict[str, list[str]],
    model: tuple[str, str],
    plaintext: int,
    reps: int,
    raw_names: list[str],
    procs: int,
    stops: list[Callable[[], None]],
) -> list[Row]:
    import os

    n = len(fleets["procs"])
    t0 = time.perf_counter()
    modes: dict[str, Any] = {
        "procs": _AgentProcs([rig.homes[d] for d in fleets["procs"]], procs),
        "threads": _Agents([rig.homes[d] for d in fleets["threads"]]),
    }
    for m in modes.values():
        stops.append(m.stop)
    for m in modes.values():
        m.start()
    _NOTES.append(
        f"fan-out: {n} agents as threads of {procs} spawned processes (the main "
        f"figure), and {n} more as threads of this process, beside the coordinator "
        f"(started and connected in {time.perf_counter() - t0:.1f} s)"
    )
    port, svc = rig.port, rig.svc
    pub = _Raw(port, "bench-raw-pub", "coordinator", rig.users["coordinator"])
    subs = [
        (
            _Raw(port, f"bench-{u}", u, rig.users[u], (f"ef/v1/dev/{u}/chunk",)),
            f"ef/v1/dev/{u}/chunk",
        )
        for u in raw_names[:n]
    ]
    stops.append(pub.stop)
    stops.extend(c.stop for c, _ in subs)
    for c in [pub, *(c for c, _ in subs)]:
        c.wait_ready()
    me, broker_pid = os.getpid(), rig.broker_pid

    times: dict[str, list[float]] = {"raw": [], "procs": [], "threads": []}
    cpu: dict[str, list[float]] = {}
    per_device: list[float] = []
    offer_ms: list[float] = []
    names = list(times)
    for r in range(reps + 1):  # rep 0: warm-up (first ORT sessions, page cache), discarded
        k = r % len(names)
        order = names[k:] + names[:k]
        for what in order if r % 2 == 0 else order[::-1]:
            # the raw series pushes the ciphertext of a release built for the same fleet
            release, built = rig.coord.build(*model, ",".join(fleets.get(what, fleets["procs"])))
            if what == "raw":
                dt = _raw_push(pub, subs, built.segments)
                if r:
                    times["raw"].append(dt)
                continue
            agents = modes[what]
            pids = [me, broker_pid, *(agents.pids if what == "procs" else [])]
            agents.arm()
            c0 = [_cpu_seconds(p) for p in pids]
            sent0 = svc.chunks.sent_bytes
            t0 = time.perf_counter()
            offer_bytes = svc.release(release.sequence)
            t_offers = time.perf_counter() - t0
            seqs = agents.wait(TIMEOUT)
            dt = time.perf_counter() - t0
            c1 = [_cpu_seconds(p) for p in pids]
            if seqs != [release.sequence] * n:
                raise AssertionError(f"active sequences {seqs}, wanted {release.sequence}")
            per_device.append((offer_bytes + svc.chunks.sent_bytes - sent0) / n)
            if r:
                times[what].append(dt)
                offer_ms.append(t_offers * 1e3)
                used = [b - a for a, b in zip(c0, c1, strict=True)]
                cpu.setdefault(what, []).append(sum(used) / dt)
                _NOTES.append(
                    f"  rep {r}, {what}: {dt:.2f} s; CPU s: bench process "
                    f"{used[0]:.2f}, mosquitto {used[1]:.2f}"
                    + (f", agent processes {sum(used[2:]):.2f}" if used[2:] else "")
                )
    _NOTES.append(
        "fan-out, s: "
        + "; ".join(f"{k} " + ", ".join(f"{t:.2f}" for t in v) for k, v in times.items())
    )
    _NOTES.append(
        f"offers published and acknowledged after {median(offer_ms):.0f} ms (median); "
        f"busy cores during delivery (CPU s ÷ wall s, of {os.cpu_count()}): "
        + ", ".join(f"{k} {median(v):.2f}" for k, v in cpu.items())
    )
    mb = plaintext / MB
    label = f"{n} agents, {mb:.1f} MB model, {len(built.segments)} chunks"
    base = f"raw paho push of the same bytes to {n} subscribers, QoS 1"
    raw = median(times["raw"])
    ours = median(times["procs"])
    return [
        Row(
            key="fanout_s",
            metric=f"stress: deliver + activate a real ONNX model on {n} full agents sharing "
            f"this machine's cores ({label}; agents in {procs} processes; the fleet figure is "
            "bench fleet's)",
            value=ours,
            unit="s",
            baseline=base,
            baseline_value=raw,
            note=f"median of {reps}; no aim: every agent's install shares the same cores",
        ),
        Row(
            key="fanout_threads_s",
            metric="same, agents as threads of the coordinator's process",
            value=median(times["threads"]),
            unit="s",
            baseline=base,
            baseline_value=raw,
            note=f"median of {reps}",
        ),
        Row(
            key="fanout_mb_s",
            metric="fan-out goodput (plaintext × agents ÷ time)",
            value=n * mb / ours,
            unit="MB/s",
            baseline="raw paho push",
            baseline_value=n * mb / raw,
        ),
        Row(
            key="bytes_per_device",
            metric="coordinator bytes sent per device (offer + chunk data) ÷ plaintext size",
            value=median(per_device) / plaintext,
            unit="x",
            note=f"{median(per_device):,.0f} B per device",
        ),
    ]


def _single(
    rig: _Rig, device: str, model: tuple[str, str], plaintext: int, reps: int, raw_user: str
) -> list[Row]:
    stops: list[Callable[[], None]] = []
    try:
        return _single_run(rig, device, model, plaintext, reps, raw_user, stops)
    finally:
        for stop in reversed(stops):
            stop()


def _single_run(
    rig: _Rig,
    device: str,
    model: tuple[str, str],
    plaintext: int,
    reps: int,
    raw_user: str,
    stops: list[Callable[[], None]],
) -> list[Row]:
    done = threading.Event()
    stamp: list[float] = [0.0, 0.0]  # first chunk written, last chunk written (perf_counter)

    def progress(phase: str, got: int, total: int) -> None:
        if phase != "download":
            return
        if not stamp[0]:
            stamp[0] = time.perf_counter()
        if got == total:
            stamp[1] = time.perf_counter()
            done.set()

    agents = _Agents([rig.homes[device]], progress=progress)
    stops.append(agents.stop)
    agents.start()
    port, svc = rig.port, rig.svc
    topic = f"ef/v1/dev/{raw_user}/chunk"
    pub = _Raw(
        port,
        "bench-raw-pub1",
        "coordinator",
        rig.users["coordinator"],
        (_raw_req(raw_user),),
    )
    sub = _Raw(port, f"bench-{raw_user}-1", raw_user, rig.users[raw_user], (topic,))
    stops += [pub.stop, sub.stop]
    pub.wait_ready()
    sub.wait_ready()
    window = agents.agents[0].config.window

    ours: list[float] = []
    first: list[float] = []
    push: list[float] = []
    pull: list[float] = []
    for r in range(reps + 1):  # rep 0: warm-up, discarded
        release, built = rig.coord.build(*model, device)
        names = ["ours", "push", "pull"]
        k = r % 3
        order = names[k:] + names[:k]
        for what in order if r % 2 == 0 else reversed(order):
            if what == "push":
                pub.hook = sub.hook = None
                dt = _raw_push(pub, [(sub, topic)], built.segments)
                if r:
                    push.append(dt)
            elif what == "pull":
                dt = _RawPull(pub, sub, raw_user, built.segments, window)()
                pub.hook = sub.hook = None
                if r:
                    pull.append(dt)
            else:
                agents.arm()
                done.clear()
                stamp[:] = [0.0, 0.0]
                t0 = time.perf_counter()
                svc.release(release.sequence)
                if not done.wait(TIMEOUT):
                    raise RuntimeError("single-agent download did not finish")
                agents.wait(TIMEOUT)  # let the install finish before the next series runs
                if r:
                    ours.append(stamp[1] - t0)
                    first.append(stamp[0] - t0)
    mb = plaintext / MB
    segs = len(built.segments)
    _NOTES.append(
        f"single agent, s: ours {', '.join(f'{t:.3f}' for t in ours)} (first chunk "
        f"written after {median(first) * 1e3:.0f} ms median); raw push "
        f"{', '.join(f'{t:.3f}' for t in push)}; raw pull "
        f"{', '.join(f'{t:.3f}' for t in pull)}"
    )
    label = f"{mb:.1f} MB in {segs} chunks of {built.manifest.segment_size // 1024} KiB"
    return [
        Row(
            key="single_mb_s",
            metric=f"one agent: release → last chunk written ({label})",
            value=mb / median(ours),
            unit="MB/s",
            baseline="raw paho publish → subscribe, same chunks, QoS 1",
            baseline_value=mb / median(push),
            note=f"median of {reps}",
        ),
        Row(
            key="single_vs_pull_mb_s",
            metric="one agent vs the pull pattern's floor",
            value=mb / median(ours),
            unit="MB/s",
            baseline=f"raw paho request/response, window {window}",
            baseline_value=mb / median(pull),
        ),
    ]


def run(quick: bool) -> list[Row]:
    from edgefleet.infra.broker import EmbeddedBroker

    _NOTES.clear()
    try:  # raises at once, before touching the disk, when there is no mosquitto binary
        EmbeddedBroker(force_kind="mosquitto", data_dir=Path(tempfile.gettempdir()))
    except RuntimeError as exc:
        _NOTES.append(
            f"skipped: {exc} (amqtt, the fallback, is a demo broker: MQTT 3.1.1, "
            "no ACLs; its figures would say nothing about a deployment)"
        )
        return []
    n = 5 if quick else 50
    reps = 1 if quick else 3
    procs = 2 if quick else 4
    fleets = {mode: [f"{mode[0]}{i:03d}" for i in range(n)] for mode in ("procs", "threads")}
    solo = "solo-000"
    raw_names = [f"raw-{i:03d}" for i in range(n)]
    root = Path(tempfile.mkdtemp(prefix="edgefleet-bench-delivery-"))
    rig: _Rig | None = None
    try:
        t0 = time.perf_counter()
        small = _big_mlp(root / "models" / "fanout", (512, 448) if quick else (1024, 1152))
        large = _big_mlp(root / "models" / "single", (1024, 896) if quick else (2048, 2400))
        rig = _rig(root, [*fleets["procs"], *fleets["threads"], solo], raw_names)
        models = {}
        for name, path in (("fanout", small), ("single", large)):
            mv = rig.coord.register_model(f"bench-{name}", path)
            models[name] = ((mv.name, mv.version), mv.size)
        _NOTES.append(f"set-up (models, homes, broker): {time.perf_counter() - t0:.1f} s")
        rows = _fanout(
            rig, fleets, models["fanout"][0], models["fanout"][1], reps, raw_names, procs
        )
        rows += _single(rig, solo, models["single"][0], models["single"][1], reps + 2, raw_names[0])
        return rows
    finally:
        if rig is not None:
            rig.close()
        shutil.rmtree(root, ignore_errors=True)
