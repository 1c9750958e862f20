"""Telemetry at fleet scale: many simulated devices reporting to one ``CoordinatorService``.

``run_load(work, devices=500, rate=1.0, seconds=60, broker="mosquitto")`` enrolls ``devices``
device ids (identities made in memory, as ``simulations.thin`` does), starts a broker and a
coordinator service in this process, and has thin publishers report for every device at
``rate`` Hz for ``seconds``: each report is a retained QoS 1 ``DeviceStatus`` (its
``active.version`` is the tick number) and a QoS 1 ``Telemetry`` with an ``agent`` and an
``inference`` namespace (``WINDOW_COUNT`` calls of ``digits@1`` per window) on the device's own
topics. The publishers are a few MQTT connections (``PUBLISHERS``) speaking for many devices:
on mosquitto they log in anonymously from a child process (their CPU is not the
coordinator's); on the in-memory broker they are links in this process.

When the publishers are done, ``run_load`` waits until the service has stored every telemetry
message, then checks what "nothing lost" means here: telemetry rows stored = messages sent,
the lifetime inference count per version = devices x ticks x ``WINDOW_COUNT``, and every
device's registry row shows its last tick (statuses are coalesced per device by design: only
the latest matters). It samples this process's RSS every second (``LoadResult.rss``). What the
broker itself dropped for the coordinator never reaches it, so no counter of the service can
show it: ``LoadResult.broker_drops`` has mosquitto's own log lines about it ("Outgoing messages
are being dropped for client ...").

``run_load(..., telemetry=False)`` sends statuses only and waits until every device's row shows
its last tick: the statuses/s figure of ``bench telemetry``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgefleet.coordinator.home import Coordinator
from edgefleet.coordinator.ingest import STATUS
from edgefleet.coordinator.service import CoordinatorService, mqtt_config_for
from edgefleet.coordinator.telemetry import version_totals
from edgefleet.infra.link import Delivery, InMemoryBroker, Link, LinkFactory, MqttConfig
from edgefleet.protocol import topics
from edgefleet.protocol.messages import ActiveModel, DeviceStatus, Telemetry

from .thin import enroll_thin

__all__ = [
    "PUBLISHERS", "WINDOW_COUNT", "LoadResult", "publish", "raw_delivery", "rss_bytes",
    "run_backlog", "run_load", "statuses_handled",
]

PUBLISHERS = 4  # MQTT connections speaking for all the devices
WINDOW_COUNT = 10  # predict calls in every inference window
BID = "ab" * 16
MIN_TICK_S = 0.1  # s: ticks closer than this are a flood, its messages built in advance


def rss_bytes() -> int:
    """This process's resident set size (Linux ``/proc``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _window(tick: int) -> dict[str, Any]:
    lat = [0] * 12 + [WINDOW_COUNT - 1, 1]
    return {"count": WINDOW_COUNT, "errors": tick % 2, "rows": WINDOW_COUNT, "lat": lat,
            "p50_ms": 0.07, "p95_ms": 0.1, "p99_ms": 0.12, "classes": {"3": 6, "7": 4},
            "conf": [0, 0, 0, 0, 0, 0, 1, 2, 3, 4], "conf_sum": 8.1, "conf_min": 0.6}  # fmt: skip


def messages(device: str, tick: int, now: int) -> tuple[bytes, bytes]:
    """One report of ``device`` at ``tick``: (status, telemetry)."""
    active = ActiveModel(name="digits", version=str(tick), sequence=1, format="onnx",
                         bundle_id=BID)  # fmt: skip
    st = DeviceStatus(device_id=device, time=now, state="idle", active=active, counter=tick)
    tel = Telemetry(device_id=device, time=now, metrics={
        "agent": {"state": "idle", "dropped": 0}, "inference": {"digits@1": _window(tick)}})
    return st.encode(), tel.encode()


def publish(
    factory: LinkFactory, url: str, devices: Sequence[str], rate: float, seconds: float,
    *, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    on_ready: Callable[[], None] | None = None, telemetry: bool = True, retain: bool = True,
) -> dict[str, Any]:
    """Report for ``devices`` through ``PUBLISHERS`` links at ``rate`` Hz for ``seconds``
    (without ``telemetry``: statuses only; ``retain``: statuses retained, as agents send
    them); returns what was sent and how late the ticks ran."""
    links: list[Link] = []
    for i in range(min(PUBLISHERS, len(devices))):
        link = factory(MqttConfig(url=url, client_id=f"telemetry-load-{i}", max_queued=0,
                                  clean_start=True, session_expiry=0), lambda *a: None)  # fmt: skip
        link.start()
        if not link.wait_connected(30):
            raise RuntimeError(f"publisher {i} not connected: {link.last_error}")
        links.append(link)
    ticks = max(1, round(seconds * rate))
    # A flood's messages are encoded before it starts, so what is measured is the coordinator,
    # not how fast this process builds JSON.
    built = {(t, d): messages(d, t, int(time.time())) for t in range(1, ticks + 1)
             for d in devices} if rate > 1 / MIN_TICK_S else {}  # fmt: skip
    if on_ready is not None:
        on_ready()
    start, late, sent = clock(), 0.0, 0
    last: list[Delivery | None] = [None] * len(links)
    for tick in range(1, ticks + 1):
        due = start + (tick - 1) / rate
        if (wait := due - clock()) > 0:
            sleep(wait)
        late = max(late, clock() - due)
        now = int(time.time())
        for i, device in enumerate(devices):
            link = links[i % len(links)]
            pre = built.pop((tick, device), None)
            status, tel = pre if pre is not None else messages(device, tick, now)
            last[i % len(links)] = link.publish(topics.up(device, "status"), status, qos=1,
                                                retain=retain)  # fmt: skip
            if telemetry:
                last[i % len(links)] = link.publish(topics.up(device, "telemetry"), tel, qos=1)
            sent += 1
    for d in last:
        if d is not None:
            d.wait(60)
    for link in links:
        link.stop()
    return {"ticks": ticks, "telemetry": sent if telemetry else 0, "statuses": sent,
            "late_s": late, "elapsed_s": clock() - start}  # fmt: skip


def _child(url: str, devices: list[str], rate: float, seconds: float, opts: dict[str, bool],
           out: Any) -> None:  # fmt: skip
    from edgefleet.infra.link.mqtt import MqttLink

    out.put(publish(MqttLink, url, devices, rate, seconds, on_ready=lambda: out.put("ready"),
                    telemetry=opts["telemetry"], retain=opts["retain"]))  # fmt: skip


@dataclass
class LoadResult:
    devices: int
    ticks: int
    sent: int  # telemetry messages (and as many statuses; with telemetry=False: statuses)
    stored: int  # telemetry messages stored (with telemetry=False: statuses handled)
    inference_count: int  # lifetime predict calls of digits@1 in inference_totals
    latest_ok: int  # devices whose registry row shows their last tick
    statuses_stored: int  # status updates written (coalesced per device and batch)
    statuses_received: int  # status messages that reached the service
    drops: dict[str, int]
    publish_late_s: float  # how far behind schedule the publishers ever ran
    drain_s: float  # s from the last publish until everything was stored
    ingest_s: float  # s from the first publish until everything was stored
    rss: list[int] = field(default_factory=list)  # bytes, sampled every second
    broker_drops: list[str] = field(default_factory=list)  # mosquitto's log lines about drops

    @property
    def lost(self) -> int:
        return self.sent - self.stored

    @property
    def rss_growth(self) -> int:
        """Bytes between the sample a quarter into the run and the last one."""
        if len(self.rss) < 4:
            return 0
        return self.rss[-1] - self.rss[len(self.rss) // 4]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(lost=self.lost, rss_growth=self.rss_growth)
        return d


def run_load(
    work: Path, *, devices: int = 500, rate: float = 1.0, seconds: float = 60.0,
    broker: Literal["mosquitto", "memory"] = "mosquitto", drain_timeout: float = 120.0,
    telemetry: bool = True,
) -> LoadResult:
    """See the module docstring."""
    coord = Coordinator.init(work / "coordinator")
    ids = [f"load-{i:04d}" for i in range(devices)]
    enroll_thin(coord, ids)
    if broker == "memory":
        return _measure(coord, ids, rate, seconds, drain_timeout, telemetry,
                        memory=InMemoryBroker())  # fmt: skip
    from edgefleet.infra.broker import EmbeddedBroker

    with EmbeddedBroker(data_dir=work / "broker", force_kind="mosquitto") as real:
        r = _measure(coord, ids, rate, seconds, drain_timeout, telemetry, url=real.url)
    return dataclasses.replace(r, broker_drops=_dropped_lines(work / "broker" / "mosquitto.log"))


def _dropped_lines(log: Path) -> list[str]:
    """mosquitto's warnings that it dropped messages queued for a client (read once it has
    stopped, so its log is complete)."""
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return [f"mosquitto log unreadable: {exc}"]
    return [line for line in text.splitlines() if "being dropped" in line]


def _measure(coord: Coordinator, ids: list[str], rate: float, seconds: float, drain: float,
             telemetry: bool, *, memory: InMemoryBroker | None = None, url: str = ""
             ) -> LoadResult:  # fmt: skip
    cfg = mqtt_config_for(coord, client_id="coordinator-load", broker=url or InMemoryBroker.url)
    svc = CoordinatorService(coord, cfg, link_factory=memory.link if memory else _mqtt())
    svc.start(timeout=30)
    rss: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(rss, stop), daemon=True)
    sampler.start()
    started: list[float] = []
    try:
        if memory is not None:
            sent = publish(memory.link, memory.url, ids, rate, seconds, telemetry=telemetry,
                           on_ready=lambda: started.append(time.monotonic()))  # fmt: skip
        else:
            sent = _in_child(url, ids, rate, seconds, started, telemetry=telemetry)
        t0 = started[0]
        t_sent = time.monotonic()
        deadline = t_sent + drain
        want, done = _done(svc, sent, telemetry)
        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
        t_done = time.monotonic()
        stop.set()
        sampler.join()
        devices = {d.device_id: d for d in coord.registry.devices()}
        totals = version_totals(coord.registry).get("digits@1", {})
        drops: dict[str, int] = {}
        for (_, reason), n in svc.drops.items():
            drops[reason] = drops.get(reason, 0) + n
        return LoadResult(
            devices=len(ids), ticks=sent["ticks"], sent=want, stored=_stored(svc, telemetry),
            inference_count=totals.get("count", 0),
            latest_ok=sum(1 for d in ids if devices[d].active_version == str(sent["ticks"])),
            statuses_stored=svc.ingest.statuses, statuses_received=svc.received[STATUS],
            drops=drops,
            publish_late_s=sent["late_s"], drain_s=t_done - t_sent, ingest_s=t_done - t0,
            rss=rss,
        )  # fmt: skip
    finally:
        stop.set()
        svc.stop()
        if memory is not None:
            memory.close()
        coord.registry.engine.dispose()


def _stored(svc: CoordinatorService, telemetry: bool) -> int:
    return svc.ingest.telemetry_stored if telemetry else statuses_handled(svc)


def statuses_handled(svc: CoordinatorService) -> int:
    """Statuses the service is done with: through a written batch (stored, or coalesced into
    a newer one of the device), or superseded in its queue by a newer one (``drops``)."""
    superseded = sum(n for (_, why), n in list(svc.drops.items()) if why == "status superseded")
    return svc.ingest.status_messages + superseded


def _done(svc: CoordinatorService, sent: dict[str, Any], telemetry: bool
          ) -> tuple[int, Callable[[], bool]]:  # fmt: skip
    """(messages to wait for, whether they are all in): every telemetry message stored, or
    without telemetry every status handled (the devices' last ones stored)."""
    want = sent["telemetry"] if telemetry else sent["statuses"]
    return want, lambda: _stored(svc, telemetry) >= want


def _in_child(url: str, ids: list[str], rate: float, seconds: float, started: list[float],
              **opts: bool) -> dict[str, Any]:  # fmt: skip
    """``publish`` in a child process (``opts``: its ``telemetry`` and ``retain``)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    opts = {"telemetry": True, "retain": True, **opts}
    child = ctx.Process(target=_child, args=(url, ids, rate, seconds, opts, out))
    child.start()
    try:
        assert out.get(timeout=120) == "ready"
        started.append(time.monotonic())
        sent: dict[str, Any] = out.get(timeout=seconds * 3 + 600)
        return sent
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()


def raw_delivery(work: Path, *, devices: int, rate: float, seconds: float,
                 telemetry: bool = True) -> dict[str, Any]:  # fmt: skip
    """The baseline: the same publishers to a bare subscriber on mosquitto that only counts
    what arrives (no decoding, no registry). Returns reports sent, messages received and the
    time from the publishers' start until the last one arrived."""
    from edgefleet.infra.broker import EmbeddedBroker
    from edgefleet.infra.link.mqtt import MqttLink

    ids = [f"load-{i:04d}" for i in range(devices)]
    counted = _Counted()
    with EmbeddedBroker(data_dir=work / "raw-broker", force_kind="mosquitto") as real:
        sub = MqttLink(MqttConfig(url=real.url, client_id="raw-sub", clean_start=True,
                                  session_expiry=0), counted.on_message)  # fmt: skip
        sub.subscribe(topics.up_all("status"), qos=1)
        sub.subscribe(topics.up_all("telemetry"), qos=1)
        sub.start()
        assert sub.wait_connected(30), sub.last_error
        retained = counted.wait(0, 0)
        started: list[float] = []
        sent = _in_child(real.url, ids, rate, seconds, started, telemetry=telemetry)
        want = retained + sent["statuses"] + sent["telemetry"]
        received = counted.wait(want, 120) - retained
        done = time.monotonic()
        sub.stop()
    return {"sent": sent["statuses"], "received": received, "seconds": done - started[0]}


def run_backlog(work: Path, *, devices: int = 500, ticks: int = 18, raw: bool = False,
                drain_timeout: float = 120.0) -> dict[str, Any]:  # fmt: skip
    """How fast one coordinator service drains statuses, its publishers out of the way:
    mosquitto queues ``devices`` x ``ticks`` statuses (QoS 1, kept under its 10,000 per
    client) for the service's session while it is away, then the service connects and takes
    them. With ``raw``: a bare counting subscriber in its place (the baseline). Returns the
    statuses, seconds from connecting until the last was handled (its batch written), and
    statuses/s."""
    from edgefleet.infra.broker import EmbeddedBroker
    from edgefleet.infra.link.mqtt import MqttLink

    coord = Coordinator.init(work / "coordinator")
    ids = [f"load-{i:04d}" for i in range(devices)]
    enroll_thin(coord, ids)
    with EmbeddedBroker(data_dir=work / "broker", force_kind="mosquitto") as real:
        cfg = dataclasses.replace(mqtt_config_for(coord, client_id="coordinator-load",
                                                  broker=real.url),
                                  clean_start=False, session_expiry=600)  # fmt: skip
        away = MqttLink(cfg, lambda *a: None)  # makes the session the statuses queue in
        away.subscribe(topics.up_all("status"), qos=1)
        away.start()
        assert away.wait_connected(30), away.last_error
        away.stop()
        sent = _in_child(real.url, ids, 1000.0, ticks / 1000.0, [], telemetry=False,
                         retain=False)["statuses"]  # fmt: skip
        t0 = time.monotonic()
        got, how = (_drain_raw if raw else _drain_service)(coord, cfg, sent, drain_timeout)
        seconds = time.monotonic() - t0
    latest = {d.device_id: d.active_version for d in coord.registry.devices()}
    coord.registry.engine.dispose()
    return {"statuses": sent, "handled": got, "seconds": seconds, "per_s": got / seconds,
            "latest_ok": sum(latest.get(d) == str(ticks) for d in ids), **how,
            "broker_drops": _dropped_lines(work / "broker" / "mosquitto.log")}  # fmt: skip


def _drain_service(coord: Coordinator, cfg: MqttConfig, want: int, timeout: float
                   ) -> tuple[int, dict[str, int]]:  # fmt: skip
    """Statuses handled, and how: written, coalesced in a batch, superseded in the queue."""
    svc = CoordinatorService(coord, cfg, link_factory=_mqtt())
    svc.start(timeout=30)
    try:
        deadline = time.monotonic() + timeout
        while statuses_handled(svc) < want and time.monotonic() < deadline:
            time.sleep(0.01)
        got = statuses_handled(svc)
        ing = svc.ingest
        return got, {"written": ing.statuses, "coalesced": ing.coalesced,
                     "superseded": got - ing.status_messages}  # fmt: skip
    finally:
        svc.stop()


def _drain_raw(_coord: Coordinator, cfg: MqttConfig, want: int, timeout: float
               ) -> tuple[int, dict[str, int]]:  # fmt: skip
    from edgefleet.infra.link.mqtt import MqttLink

    counted = _Counted()
    sub = MqttLink(cfg, counted.on_message)
    sub.subscribe(topics.up_all("status"), qos=1)
    sub.start()
    try:
        return counted.wait(want, timeout), {}
    finally:
        sub.stop()


class _Counted:
    """A bare subscriber's callback: counts what arrives, nothing else."""

    def __init__(self) -> None:
        self._got = threading.Condition()
        self._count = 0

    def on_message(self, topic: str, payload: bytes, props: Any) -> None:
        with self._got:
            self._count += 1
            self._got.notify_all()

    def wait(self, want: int, timeout: float) -> int:
        """The count once it reaches ``want`` or ``timeout`` s passed."""
        with self._got:
            self._got.wait_for(lambda: self._count >= want, timeout)
            return self._count


def _mqtt() -> LinkFactory:
    from edgefleet.infra.link.mqtt import MqttLink

    return MqttLink


def _sample(out: list[int], stop: threading.Event) -> None:
    while True:
        out.append(rss_bytes())
        if stop.wait(1.0):
            return
