"""Drift commands: ``fleet drift`` (the fleet's drift per version, group and device, alerts)
and ``fl retrain-on-drift`` (the retraining trigger: drift alerts start FL runs whose model is
released to a canary group)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

__all__ = ["fleet_drift", "fl_retrain_on_drift"]


def _check_threshold(args: argparse.Namespace) -> None:
    if not args.threshold > 0:
        raise ValueError(f"--threshold must be above 0 (a PSI), got {args.threshold}")
    if args.min_samples < 1:
        raise ValueError(f"--min-samples must be at least 1, got {args.min_samples}")


def fleet_drift(args: argparse.Namespace) -> int:
    from edgefleet.coordinator import drift

    from ._cli_coordinator import _open

    _check_threshold(args)
    c = _open(args.home)
    now = int(time.time())
    reports = drift.latest(c.registry, since=now - args.window, name=args.name or None)
    view = drift.view(reports, c.registry.groups(), threshold=args.threshold,
                      min_samples=args.min_samples)  # fmt: skip
    new = drift.check(c.registry, threshold=args.threshold, min_samples=args.min_samples,
                      name=args.name or None, now=now, window=args.window)  # fmt: skip
    open_ = drift.alerts(c.registry, state="open", name=args.name or None)
    if args.json:
        print(json.dumps({"view": [a.to_dict() for a in view],
                          "alerts": [_alert_dict(a) for a in open_],
                          "new_alerts": [a.id for a in new]}, indent=2))  # fmt: skip
        return 0
    if not view:
        print(f"no drift reports with at least {args.min_samples:g} samples in the last "
              f"{args.window} s" + (f" for {args.name}" if args.name else ""))  # fmt: skip
    else:
        _print_view(view, args.threshold)
    fresh = {a.id for a in new}
    for a in open_:
        print(("new " if a.id in fresh else "") + _alert_line(a))
    return 0


def _print_view(view: list[Any], threshold: float) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("scope", "of", "model", "devices", "drifting", "max", "median", "samples"):
        table.add_column(col, no_wrap=True)
    table.add_column("features (devices)", overflow="fold")
    for a in view:
        of = a.key.split(" ")[0] if a.scope == "group" else (a.key if a.scope == "device" else "")
        hot = a.drifting > 0
        table.add_row(a.scope, of, f"{a.name}@{a.version}", str(a.devices), str(a.drifting),
                      f"{a.max_score:.3f}", f"{a.median_score:.3f}", f"{a.samples:.0f}",
                      " ".join(f"{i}({n})" for i, n in a.features) or "-",
                      style="bold red" if hot else None)  # fmt: skip
    Console().print(table)
    print(f"drift = max(PSI per feature, output PSI); threshold {threshold:g}")


def _alert_dict(a: Any) -> dict[str, Any]:
    return {"id": a.id, "created": a.created, "device_id": a.device_id, "name": a.name,
            "version": a.version, "score": a.score, "threshold": a.threshold,
            "samples": a.samples, "output_psi": a.output_psi, "features": a.features,
            "state": a.state, "run_id": a.run_id}  # fmt: skip


def _alert_line(a: Any) -> str:
    feats = ", ".join(f"#{int(i)} psi {p:.3f} ks {k:.3f}" for i, p, k in a.features) or "outputs"
    out = "" if a.output_psi is None else f", output psi {a.output_psi:.3f}"
    return (f"alert {a.id}: {a.device_id} runs {a.name}@{a.version}: drift {a.score:.3f} > "
            f"{a.threshold:g} on {a.samples:.0f} samples ({feats}{out})")


def fl_retrain_on_drift(args: argparse.Namespace) -> int:
    from edgefleet.coordinator.service import mqtt_config_for
    from edgefleet.federated.retrain import RetrainPolicy, RetrainTrigger
    from edgefleet.federated.service import FlService, ReleasePolicy

    from ._cli_fl import _coordinator, _spec

    _check_threshold(args)
    if not args.release_to.startswith(("group:", "device:")) and args.release_to != "all":
        raise ValueError(f"--release-to: expected group:G, device:ID[,ID…] or all, got "
                         f"{args.release_to!r}")  # fmt: skip
    policy = RetrainPolicy(
        name=args.drift_name or args.name,
        threshold=args.threshold,
        min_samples=args.min_samples,
        min_devices=args.min_devices,
        cooldown=args.cooldown,
        schedule=args.schedule,
        window=args.window,
    )
    release = ReleasePolicy(selector=args.release_to, if_better=args.release_if_better)
    c = _coordinator(args)
    if not c.config.broker:
        raise ValueError("no broker: pass --broker mqtt://host:port or set broker in "
                         "coordinator.toml")  # fmt: skip

    def spec_for(run_id: str) -> Any:
        return _spec(argparse.Namespace(**{**vars(args), "run_id": run_id}))

    mqtt = mqtt_config_for(c, client_id=f"fl-retrain-{os.getpid()}")
    with FlService(c, mqtt, presence_window=args.presence) as service:
        trigger = RetrainTrigger(c, service, spec_for=spec_for, release=release, policy=policy,
                                 wait_devices=args.wait_devices,
                                 on_event=lambda line: print(line, flush=True))  # fmt: skip
        if args.once:
            outcome = trigger.tick()
            return 0 if outcome is None or outcome.released is not None else 3
        print(f"watching drift of {policy.name} every {args.interval:g} s (threshold "
              f"{policy.threshold:g}); Ctrl-C stops", file=sys.stderr, flush=True)  # fmt: skip
        trigger.run_forever(interval=args.interval)
    return 0
