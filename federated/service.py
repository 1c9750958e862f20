"""The coordinator-side FL driver: a ``FederatedRun`` on an ``MqttGrid`` over the fleet link.

``FlService(coordinator, mqtt).start()`` opens one link (the coordinator's broker account)
subscribed to every device's ``up/fl`` (fed to the grid) and ``up/status`` (presence). Then
``run(spec)`` executes the run (Flower's strategy loop, ``runs.FederatedRun``) and, with a
``ReleasePolicy``, releases the last (or best) round through the signed release path
(``coordinator.release``) on the same link; agents fetch it from ``coordinator serve``.

Who is sampled (``Presence``): enrolled, not revoked, opted in — its newest status seen on
this link (retained ones arrive on subscribe) carries the ``fl`` capability, which the agent
sets from ``fl_enabled`` in ``agent.toml``; a status without it (an agent that has not opted
in, or predates the field) is never sampled — not reported ``offline``, and seen within
``presence_window`` seconds: the newest of the registry's ``last_seen`` (ingested by
``coordinator serve``) and the ``time`` of the statuses this link sees. A device that left an
instruction unanswered is not sampled again until a status of it arrives after the miss (so a
dead device is out of the next round without waiting for its presence to age). Since opt-in
is only in the status, ``run`` first waits (at most ``SETTLE`` s) until every device the
registry saw recently has shown its (retained) status on this link.

Determinism: devices are offered to Flower in id order, Flower's node sampling
(``random.sample`` in ``strategy_utils``) is seeded from the run's seed for the run's length,
and replies are handed to the strategy sorted by node id, so the same seeds give bit-identical
weights on any broker whatever order replies arrive in.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgefleet.infra.link import Link, LinkFactory, MessageProps, MqttConfig
from edgefleet.protocol import topics
from edgefleet.protocol.errors import EdgeFleetError
from edgefleet.protocol.messages import DeviceStatus

from . import wire
from .grid import MqttGrid
from .runs import CoordinatorRegistrar, FederatedRun, RoundRecord, RunResult, RunSpec

if TYPE_CHECKING:
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.coordinator.registry import Registry
    from edgefleet.coordinator.release import Released
    from flwr.app import Message

    from .runs import CentralEval

__all__ = [
    "FlOutcome",
    "FlService",
    "NotEnoughDevicesError",
    "Presence",
    "ReleasePolicy",
    "metric_of",
]

log = logging.getLogger(__name__)

PRESENCE_WINDOW = 120.0  # s: 4 default heartbeats (30 s) of an agent
SETTLE = 5.0  # s at most for the retained statuses of the devices the registry saw recently


class NotEnoughDevicesError(TimeoutError):
    """Fewer eligible devices than the run needs within the wait (the CLI: one line)."""


class Presence:
    """Eligible devices, from the registry and the statuses seen on the FL link."""

    def __init__(
        self,
        registry: Registry,
        *,
        window: float = PRESENCE_WINDOW,  # s since a device was last seen
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry, self.window = registry, window
        self.clock, self.monotonic = clock, monotonic
        self._cond = threading.Condition()
        self._seen: dict[str, tuple[int, str, bool]] = {}  # device -> (time, state, opted in)
        self._arrived: dict[str, float] = {}  # device -> monotonic arrival of a live status
        self._missed: dict[str, float] = {}  # device -> monotonic time it missed a reply

    def status(self, device_id: str, payload: bytes, *, retained: bool) -> None:
        try:
            st = DeviceStatus.decode(payload)
        except EdgeFleetError as exc:
            log.debug("fl: status from %s ignored: %s", device_id, exc)
            return
        if st.device_id != device_id:
            return
        with self._cond:
            self._seen[device_id] = (st.time, st.state, DeviceStatus.FL in st.capabilities)
            if not retained:
                self._arrived[device_id] = self.monotonic()
            self._cond.notify_all()

    def missed(self, device_ids: Iterable[str]) -> None:
        with self._cond:
            for d in device_ids:
                self._missed[d] = self.monotonic()
                log.warning("fl: %s missed a reply: not sampled until it is seen again", d)

    def eligible(self) -> list[str]:
        """Device ids, sorted."""
        now = self.clock()
        out = []
        with self._cond:
            seen, arrived, missed = dict(self._seen), dict(self._arrived), dict(self._missed)
        for d in self.registry.devices():
            if d.revoked:
                continue
            status_time, state, opted_in = seen.get(d.device_id, (0, d.state, False))
            last = max(status_time, d.last_seen or 0)
            if not opted_in or state == "offline" or now - last > self.window:
                continue
            if d.device_id in missed and arrived.get(d.device_id, -1.0) <= missed[d.device_id]:
                continue
            out.append(d.device_id)
        return sorted(out)

    def settle(self, timeout: float) -> bool:
        """Until every device the registry saw within the window has shown a status on this
        link (the broker's retained ones arrive just after subscribing), at most ``timeout``
        s: opt-in is only in the status, so sampling before that would miss devices."""
        deadline = self.monotonic() + timeout
        while True:
            now = self.clock()
            with self._cond:
                missing = [d.device_id for d in self.registry.devices()
                           if not d.revoked and now - (d.last_seen or 0) <= self.window
                           and d.device_id not in self._seen]  # fmt: skip
                left = deadline - self.monotonic()
                if not missing or left <= 0:
                    return not missing
                self._cond.wait(min(left, 0.5))

    def wait(self, n: int, timeout: float) -> list[str]:
        """Until ``n`` devices are eligible (re-checked on every status); the last list seen."""
        deadline = self.monotonic() + timeout
        while len(devices := self.eligible()) < n:
            left = deadline - self.monotonic()
            if left <= 0:
                return devices
            with self._cond:
                self._cond.wait(min(left, 1.0))  # registry presence changes without a status
        return devices


class _FleetGrid(MqttGrid):
    """``MqttGrid`` with the service's presence: misses recorded, replies in node order, and
    a clear error instead of Flower's endless wait when too few devices are left."""

    def __init__(self, link: Link, *, presence: Presence, min_nodes: int, **kwargs: Any) -> None:
        super().__init__(link, devices=presence.eligible, **kwargs)
        self.presence, self.min_nodes = presence, min_nodes

    def get_node_ids(self) -> list[int]:
        ids = super().get_node_ids()
        if len(ids) < self.min_nodes:
            self.presence.wait(self.min_nodes, self.round_timeout)
            ids = super().get_node_ids()
            if len(ids) < self.min_nodes:
                raise NotEnoughDevicesError(
                    f"{len(ids)} eligible devices after {self.round_timeout:g} s, the run "
                    f"needs {self.min_nodes}"
                )
        return ids

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        sent = list(messages)
        replies = super().send_and_receive(sent, timeout=timeout)
        answered = {m.metadata.src_node_id for m in replies}
        self.presence.missed(
            d
            for m in sent
            if m.metadata.dst_node_id not in answered
            and (d := self.device_of(m.metadata.dst_node_id)) is not None
        )
        return sorted(replies, key=lambda m: m.metadata.src_node_id)

@dataclass(frozen=True, kw_only=True)
class ReleasePolicy:
    """Release a run's model to ``selector`` when it ends: the last round, or with
    ``if_better`` the best round by that metric, only if it beats the model last released to
    the same selector (``*loss*`` metrics: lower is better)."""

    selector: str  # group:G | device:ID[,ID…] | all
    if_better: str = ""

    def __post_init__(self) -> None:
        if not self.selector:
            raise ValueError("a release needs a selector (group:G, device:ID, all)")


@dataclass(frozen=True, kw_only=True)
class FlOutcome:
    result: RunResult
    released: Released | None
    released_version: str | None  # the model version released
    release_note: str  # why it was (not) released
    round_seconds: tuple[float, ...]  # wall time of each round, s


def metric_of(lineage: dict[str, Any], metrics: dict[str, Any], name: str) -> float | None:
    """``name`` from a version's FL metrics (central, then eval, then train), else its
    registered metrics; ``accuracy`` also finds ``eval-accuracy``."""
    fl = lineage.get("fl") or {}
    parts = fl.get("metrics") or {}
    for part in ("central", "eval", "train"):
        values = parts.get(part) or {}
        for key in (name, f"{part}-{name}"):
            if key in values:
                return float(values[key])
    value = metrics.get(name)
    return None if value is None else float(value)


class FlService:
    def __init__(
        self,
        coordinator: Coordinator,
        mqtt: MqttConfig,
        *,
        link_factory: LinkFactory | None = None,
        presence_window: float = PRESENCE_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if link_factory is None:
            from edgefleet.infra.link.mqtt import MqttLink

            link_factory = MqttLink
        self.coordinator = coordinator
        self.presence = Presence(coordinator.registry, window=presence_window, clock=clock)
        self.clock = clock
        self.grid: _FleetGrid | None = None
        self.link = link_factory(mqtt, self._on_message)
        self.link.subscribe(wire.REPLY_FILTER, qos=1)
        self.link.subscribe(topics.up_all("status"), qos=1)

    def start(self, timeout: float = 15.0) -> None:
        self.link.start()
        if not self.link.wait_connected(timeout):
            self.link.stop()
            raise ConnectionError(f"cannot reach the broker: {self.link.last_error}")

    def stop(self) -> None:
        """Stop the service; a run in progress ends at once with ``RunInterrupted``."""
        grid = self.grid
        if grid is not None:
            grid.interrupt()
        self.link.stop()

    def __enter__(self) -> FlService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_message(self, topic: str, payload: bytes, props: MessageProps) -> None:
        where = topics.device_of(topic)
        if where is None:
            return
        device_id, kind = where
        if kind == "up/fl":
            grid = self.grid
            if grid is not None:
                grid.handle(device_id, payload)
        elif kind == "up/status":
            self.presence.status(device_id, payload, retained=props.retain)

    # -- a run ------------------------------------------------------------------------------
    def run(
        self,
        spec: RunSpec,
        *,
        central_eval: CentralEval | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        release: ReleasePolicy | None = None,
        wait_devices: float = 30.0,  # s to wait for min_available_nodes eligible devices
    ) -> FlOutcome:
        need = max(spec.strategy.min_available_nodes, spec.policy.quorum)
        self.presence.settle(SETTLE)
        devices = self.presence.wait(need, wait_devices)
        if len(devices) < need:
            raise NotEnoughDevicesError(
                f"{len(devices)} eligible devices (enrolled, online, opted in) after "
                f"{wait_devices:g} s: "
                f"{', '.join(devices) or 'none'}; the run needs {need}"
            )
        grid = _FleetGrid(
            self.link,
            presence=self.presence,
            min_nodes=spec.strategy.min_available_nodes,
            signer=self.coordinator.keys.release,
            device_keys=self._device_key,
            round_timeout=spec.round_timeout,
            clock=self.clock,
        )
        times: list[float] = []
        started = [time.perf_counter()]

        def round_done(record: RoundRecord) -> None:
            now = time.perf_counter()
            times.append(now - started[0])
            started[0] = now
            if on_round is not None:
                on_round(record)

        run = FederatedRun(
            spec,
            registrar=CoordinatorRegistrar(self.coordinator),
            central_eval=central_eval,
            on_round=round_done,
        )
        self.grid = grid
        try:
            grid.start_run(uuid.uuid4().int >> 66)  # a fresh Flower run id: devices' replay
            with wire.seeded_sampling(spec.seed):  # guards know nothing of an earlier attempt
                result = run.execute(grid)
        finally:
            self.grid = None
        log.info("fl run %s: done, grid %s", spec.run_id, grid.stats)
        released, version, note = self._release(spec, run, result, release)
        return FlOutcome(result=result, released=released, released_version=version,
                         release_note=note, round_seconds=tuple(times))  # fmt: skip

    def _device_key(self, device_id: str) -> bytes | None:
        d = self.coordinator.registry.device(device_id)
        return None if d is None or d.revoked else bytes(d.sign_public)

    def _release(
        self, spec: RunSpec, run: FederatedRun, result: RunResult, policy: ReleasePolicy | None
    ) -> tuple[Released | None, str | None, str]:
        if policy is None:
            return None, None, "no release asked for"
        history = run.history()
        if not history:
            return None, None, "nothing registered: nothing to release"
        pick = history[-1]
        if policy.if_better:
            pick, note = self._better(spec, history, policy)
            if pick is None:
                log.warning("fl run %s: not released: %s", spec.run_id, note)
                return None, None, note
        else:
            note = f"last round {pick.lineage['fl']['round']}"
        from edgefleet.coordinator import release as releases

        done = releases.release(
            self.coordinator, self.link, spec.model_name, pick.version, policy.selector
        )
        log.info("fl run %s: released %s %s as release %d (%s)", spec.run_id,
                 spec.model_name, pick.version, done.sequence, note)  # fmt: skip
        return done, pick.version, note

    def _better(self, spec: RunSpec, history: list[Any], policy: ReleasePolicy) -> tuple[Any, str]:
        name = policy.if_better
        lower = "loss" in name
        scored: list[tuple[float, Any]] = [
            (s, v) for v in history if (s := metric_of(dict(v.lineage), {}, name)) is not None
        ]
        if not scored:
            return None, f"no round has metric {name!r}"
        best_score, best = (min if lower else max)(scored, key=lambda sv: sv[0])
        current = self._released_metric(policy.selector, name)
        if current is not None and not (best_score < current if lower else best_score > current):
            return None, f"best {name} {best_score:.4f} does not beat the released {current:.4f}"
        was = "nothing released before" if current is None else f"released had {current:.4f}"
        return best, f"round {best.lineage['fl']['round']}: {name} {best_score:.4f}, {was}"

    def _released_metric(self, selector: str, name: str) -> float | None:
        releases = [r for r in self.coordinator.registry.releases() if r.selector == selector]
        if not releases:
            return None
        mv = max(releases, key=lambda r: r.sequence).model
        return metric_of(dict(mv.lineage or {}), dict(mv.metrics or {}), name)
