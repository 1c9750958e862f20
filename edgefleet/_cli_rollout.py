"""``edgefleet rollout start|run|status|pause|resume|abort|rollback`` (coordinator extra).

``start`` records a rollout and, with ``--follow``, drives it in the foreground like ``run``:
every ``--interval`` seconds one controller step (``coordinator.rollouts.Rollouts.tick``) over
a publishing link of its own, one line per recorded decision. Exit codes of a followed
rollout: 0 done, 2 halted and rolled back (the gates rejected the model), 1 aborted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefleet.coordinator.rollout import Decision
    from edgefleet.coordinator.rollouts import Rollout, Rollouts

_DURATION = re.compile(r"^([0-9]*\.?[0-9]+)\s*(ms|s|m|min|h)?$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def duration(text: str) -> float:
    """``10m``, ``30s``, ``1h``, ``1.5`` (seconds) -> seconds; ValueError in one line."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise ValueError(f"duration {text!r}: expected a number with s, m or h (e.g. 10m)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def _spec(args: argparse.Namespace) -> Any:
    from edgefleet.coordinator.rollout import Gate, RolloutSpec, Stage

    waves = [w for w in args.waves.split(",") if w.strip()]
    return RolloutSpec(
        name=args.name, version=args.version, canary=Stage.parse(args.canary),
        waves=tuple(Stage.parse(w) for w in waves),
        gates=tuple(Gate.parse(g) for g in args.gate), bake=duration(args.bake),
        min_samples=args.min_samples, wave_timeout=duration(args.wave_timeout),
        min_labels=args.min_labels)  # fmt: skip


@contextmanager
def _rollouts(args: argparse.Namespace, *, publish: bool) -> Iterator[Rollouts]:
    from edgefleet.coordinator import release
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.coordinator.rollouts import Rollouts
    from edgefleet.coordinator.service import mqtt_config_for

    from ._cli_coordinator import storage_key_from_env

    c = Coordinator.open(args.home, broker=getattr(args, "broker", None),
                         storage_key=storage_key_from_env(args.home))  # fmt: skip
    if not publish:
        yield Rollouts(c, None)
        return
    if not c.config.broker:
        raise ValueError("no broker: pass --broker mqtt://host:port or set broker in "
                         "coordinator.toml")  # fmt: skip
    with release.connect(mqtt_config_for(c, client_id=f"rollout-{os.getpid()}")) as link:
        yield Rollouts(c, link)


def _id(ro: Rollouts, given: int | None) -> int:
    return ro.store.latest().id if given is None else ro.store.get(given).id


def start(args: argparse.Namespace) -> int:
    spec = _spec(args)  # bad gate or stage syntax: one line, before touching anything
    from edgefleet.coordinator import operations

    with _rollouts(args, publish=args.follow) as ro:
        rid = operations.rollout_start(ro.coordinator, operations.cli_principal(), "cli", spec)
        print(f"rollout {rid}: {spec.name} {spec.version}, canary {spec.canary}, waves "
              f"{','.join(map(str, spec.waves))}, gates {' '.join(map(str, spec.gates)) or '-'}, "
              f"bake {spec.bake:g} s")  # fmt: skip
        if not args.follow:
            print(f"drive it with: edgefleet rollout run {rid}")
            return 0
        return _follow(ro, rid, args.interval)


def run(args: argparse.Namespace) -> int:
    with _rollouts(args, publish=True) as ro:
        return _follow(ro, _id(ro, args.id), args.interval)


def _follow(ro: Rollouts, rid: int, interval: float) -> int:
    last: list[tuple[str, str]] = []

    tty = sys.stderr.isatty()

    def show(d: Decision) -> None:
        if tty and d.action == "wait":  # progress of the wave, redrawn in place
            ready = len(d.devices) - len(d.evidence.get("not_ready") or {})
            baked = d.evidence.get("baked_s")
            sys.stderr.write(f"\r  wave {d.wave}: {d.reason}, {ready}/{len(d.devices)} devices "
                             f"healthy" + (f", baked {baked:.0f} s" if baked is not None
                                           else "") + "   ")  # fmt: skip
            sys.stderr.flush()
        if d.action == "none" or last[-1:] == [(d.action, d.reason)]:
            return
        if tty:
            sys.stderr.write("\n")
        last.append((d.action, d.reason))
        devices = f" [{', '.join(d.devices[:6])}{', …' if len(d.devices) > 6 else ''}]"
        print(f"rollout {rid} wave {d.wave}: {d.action}: {d.reason}"
              + (devices if d.devices and d.action != "wait" else ""), flush=True)  # fmt: skip

    stop = threading.Event()
    try:
        r = ro.follow(rid, interval=interval, stop=stop, on_decision=show)
    except KeyboardInterrupt:
        stop.set()
        print(f"stopped following rollout {rid}; it stays where it is "
              f"(edgefleet rollout run {rid} continues it)", file=sys.stderr)  # fmt: skip
        return 130
    return {"done": 0, "rolled_back": 2}.get(r.state.phase, 1)


def status(args: argparse.Namespace) -> int:
    with _rollouts(args, publish=False) as ro:
        r = ro.store.get(_id(ro, args.id))
        decisions = ro.store.decisions(r.id)
    if args.json:
        print(json.dumps({"id": r.id, "spec": r.spec.to_dict(), "state": r.state.to_dict(),
                          "decisions": decisions}, indent=2))  # fmt: skip
        return 0
    _print_status(r, decisions[-args.last :] if args.last else decisions)
    return 0


def _print_status(r: Rollout, decisions: list[dict[str, Any]]) -> None:
    st = r.state
    stages = [str(r.spec.canary), *map(str, r.spec.waves)]
    where = "-" if st.wave < 0 else f"{'canary' if st.wave == 0 else f'wave {st.wave}'} " \
        f"({stages[st.wave]}) of {len(stages)} stages"  # fmt: skip
    print(f"rollout {r.id}: {r.spec.name} {r.spec.version} — {st.phase.replace('_', ' ')}"
          f"{' (paused)' if st.paused else ''}, {where}")  # fmt: skip
    labels = any(g.metric == "accuracy" for g in r.spec.gates)
    print(f"  gates {' '.join(map(str, r.spec.gates)) or '-'}; bake {r.spec.bake:g} s; "
          f"min samples {r.spec.min_samples}"
          + (f"; min labels {r.spec.min_labels}" if labels else "")
          + f"; wave timeout {r.spec.wave_timeout:g} s")  # fmt: skip
    print(f"  on the candidate: {len(st.released)} devices; this wave: "
          f"{', '.join(st.wave_devices) or '-'}" + (f"; release {st.sequence}" if st.sequence
                                                    else ""))  # fmt: skip
    if st.reason:
        print(f"  reason: {st.reason}")
    for d in decisions:
        seq = f" releases {d['sequences']}" if d["sequences"] else ""
        print(f"  {d['at']} wave {d['wave']} {d['action']}: {d['reason']}{seq}")
        for g in (
            d["evidence"].get("gates", []) if d["action"] in ("halt", "promote", "done") else []
        ):
            mark = "ok  " if g["passed"] else "FAIL"
            of = f" ({g['labelled']} labels)" if "labelled" in g else ""
            print(f"      {mark} {g['device']} {g['gate']}: {g['value']:.4g}{of}")
        for dev, why in (d["evidence"].get("not_ready") or {}).items():
            print(f"      not healthy: {dev} {why}")


def _operate(args: argparse.Namespace, what: str) -> int:
    from edgefleet.coordinator import operations

    who = operations.cli_principal()
    with _rollouts(args, publish=what == "rollback") as ro:
        rid = _id(ro, args.id)
        if what == "rollback":
            assert ro.link is not None
            d = operations.rollout_rollback(ro.coordinator, who, "cli", ro.link, rid)
            seqs = ro.store.decisions(rid)[-1]["sequences"]
            print(f"rollout {rid}: rolled back {len(d.devices)} devices to their previous "
                  f"version (releases {', '.join(map(str, seqs)) or 'none'})")  # fmt: skip
            return 0
        r = operations.rollout_control(ro.coordinator, who, "cli", rid, what)
        print(f"rollout {rid}: {r.state.phase.replace('_', ' ')}"
              f"{' (paused)' if r.state.paused else ''}")  # fmt: skip
    return 0


def pause(args: argparse.Namespace) -> int:
    return _operate(args, "pause")


def resume(args: argparse.Namespace) -> int:
    return _operate(args, "resume")


def abort(args: argparse.Namespace) -> int:
    return _operate(args, "abort")


def rollback(args: argparse.Namespace) -> int:
    return _operate(args, "rollback")
