"""The retraining trigger: drift alerts (or a schedule) start an FL run released to a canary.

The closed loop, in one pipeline: ``coordinator.drift.check`` turns the devices' drift
telemetry into alerts; when at least ``min_devices`` devices have an open alert for the
watched model (or ``schedule`` seconds passed since the last run), and ``cooldown`` seconds
passed since the last run, ``RetrainTrigger.tick`` starts a run through the FL service
(``FlService.run``, the same path as ``edgefleet fl start``) with its ``ReleasePolicy``: the
last round, or with ``if_better`` the best round if it beats what that selector runs, goes to
the canary selector through the signed release path. The alerts the run took are marked
handled with its run id. Here because the layers allow it: ``federated`` may import
``coordinator`` (whose ``drift`` module knows nothing of FL).

``decide`` is the pure part (alerts, times and the policy in; a reason or None out).
``edgefleet fl retrain-on-drift`` runs the trigger (``--once`` for one check, else a loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgefleet.coordinator import drift

if TYPE_CHECKING:
    from edgefleet.coordinator.home import Coordinator

    from .runs import RunSpec
    from .service import FlOutcome, FlService, ReleasePolicy

__all__ = ["RetrainPolicy", "RetrainTrigger", "decide"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RetrainPolicy:
    name: str  # the deployed model whose drift is watched
    threshold: float = drift.DEFAULT_THRESHOLD  # drift score (PSI) above which a device drifts
    min_samples: float = drift.MIN_SAMPLES  # rows behind a device's report for it to count
    min_devices: int = 1  # devices with an open alert that start a run
    cooldown: float = 3600.0  # s after a run before a drift-triggered run
    schedule: float | None = None  # s: also run this often without drift (None: never)
    window: int = drift.WINDOW  # s of reports looked at

    def __post_init__(self) -> None:
        if self.min_devices < 1 or self.cooldown < 0 or self.threshold <= 0:
            raise ValueError("retrain policy: min_devices >= 1, cooldown >= 0, threshold > 0")
        if self.schedule is not None and self.schedule <= 0:
            raise ValueError(f"retrain policy: schedule must be above 0 s, got {self.schedule}")


def decide(
    open_alerts: Sequence[Any], policy: RetrainPolicy, *, last_run: float | None, now: float
) -> str | None:
    """Why a run starts now, or None. ``open_alerts``: the watched model's open alerts."""
    devices = sorted({a.device_id for a in open_alerts})
    since = None if last_run is None else now - last_run
    if len(devices) >= policy.min_devices and (since is None or since >= policy.cooldown):
        return f"drift on {len(devices)} devices ({', '.join(devices[:8])})"
    if policy.schedule is not None and (since is None or since >= policy.schedule):
        return f"schedule: every {policy.schedule:g} s"
    return None


class RetrainTrigger:
    def __init__(
        self,
        coordinator: Coordinator,
        service: FlService,
        *,
        spec_for: Callable[[str], RunSpec],  # run id -> the run to start
        release: ReleasePolicy,
        policy: RetrainPolicy,
        wait_devices: float = 30.0,  # s for the run's devices to be eligible
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str], None] | None = None,  # one line per decision (the CLI)
    ) -> None:
        self.coordinator, self.service = coordinator, service
        self.spec_for, self.release, self.policy = spec_for, release, policy
        self.wait_devices, self.clock = wait_devices, clock
        self.on_event = on_event or (lambda line: None)
        self.last_run: float | None = None
        self.runs: list[FlOutcome] = []

    def _say(self, line: str) -> None:
        log.info("retrain: %s", line)
        self.on_event(line)

    def tick(self) -> FlOutcome | None:
        """Raise new alerts, decide, and run (blocking) if due; the run's outcome or None."""
        now = self.clock()
        p = self.policy
        for a in drift.check(self.coordinator.registry, threshold=p.threshold,
                             min_samples=p.min_samples, name=p.name, now=int(now),
                             window=p.window):  # fmt: skip
            self._say(f"alert {a.id}: {a.device_id} runs {a.name}@{a.version}, drift "
                      f"{a.score:.3f} on features {[int(f[0]) for f in a.features]}")  # fmt: skip
        open_alerts = drift.alerts(self.coordinator.registry, state="open", name=p.name)
        reason = decide(open_alerts, p, last_run=self.last_run, now=now)
        if reason is None:
            return None
        spec = self.spec_for(f"{p.name}-retrain-{int(now)}")
        self._say(f"starting run {spec.run_id} ({reason}): {spec.rounds} rounds of "
                  f"{spec.model_name}, release to {self.release.selector}")  # fmt: skip
        outcome = self.service.run(spec, release=self.release, wait_devices=self.wait_devices)
        self.last_run = now  # a run that raised is tried again on the next tick
        drift.mark_handled(self.coordinator.registry, [a.id for a in open_alerts], spec.run_id)
        self.runs.append(outcome)
        if outcome.released is None:
            self._say(f"run {spec.run_id}: not released: {outcome.release_note}")
        else:
            done = outcome.released
            self._say(f"run {spec.run_id}: released {spec.model_name} "
                      f"{outcome.released_version} as release {done.sequence} to "
                      f"{len(done.targets)} devices ({outcome.release_note})")  # fmt: skip
        return outcome

    def run_forever(self, *, interval: float = 60.0, stop: threading.Event | None = None) -> None:
        """``tick`` every ``interval`` seconds until ``stop`` is set (or KeyboardInterrupt).
        A run that fails (too few devices, a broker error) is logged and retried next tick."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.tick()
            except (TimeoutError, ConnectionError, LookupError, ValueError) as exc:
                self._say(f"run not completed: {exc}")
            stop.wait(interval)
