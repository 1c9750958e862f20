"""Federated-learning commands: ``fl start|status|runs``, ``model history``, ``agent data
add``, ``sim fl``. Flower and scikit-learn are imported inside the commands that need them."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = ["agent_data_add", "fl_runs", "fl_start", "fl_status", "model_history", "sim_fl"]

BAR = 20  # characters of the per-round progress bar


def _coordinator(args: argparse.Namespace) -> Any:
    from edgefleet.coordinator.home import Coordinator

    from ._cli_coordinator import storage_key_from_env

    return Coordinator.open(args.home, broker=getattr(args, "broker", None),
                            storage_key=storage_key_from_env(args.home))  # fmt: skip


def _spec(args: argparse.Namespace) -> Any:
    from edgefleet.federated.runs import run_spec

    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param expects NAME=VALUE, got {item!r}")
        params[key] = float(value)
    return run_spec(
        name=args.name, rounds=args.rounds, run_id=args.run_id, min_clients=args.min_clients,
        quorum=args.quorum, fraction=args.fraction, params=params, family=args.family,
        hidden=tuple(args.hidden), features=args.features, classes=args.classes,
        strategy=args.strategy, local_epochs=args.local_epochs, lr=args.lr,
        optimizer=args.optimizer, round_timeout=args.round_timeout, seed=args.seed,
        max_update_norm=args.max_update_norm, dp_noise=args.dp_noise, dp_clip=args.dp_clip,
    )  # fmt: skip


def _round_line(record: Any, rounds: int, seconds: float | None = None) -> str:
    done = int(BAR * record.round / rounds)
    head = f"round {record.round}/{rounds} [{'#' * done:<{BAR}}]" + (
        "" if seconds is None else f" {seconds:.1f} s")
    if record.version is None:
        return f"{head} not aggregated: {record.skipped}"
    fl = record.lineage["fl"]
    metrics = {**fl["metrics"]["train"], **fl["metrics"]["eval"], **fl["metrics"]["central"]}
    shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
    return (f"{head} version {record.version}: {len(fl['contributors'])} devices, "
            f"{fl['num_examples']} samples, {len(fl['rejected'])} rejected; {shown}"
            + (f" eps={fl['dp']['epsilon']:.3g}" if fl.get("dp") and fl["dp"]["epsilon"]
               else ""))  # fmt: skip


def _quiet_flower(args: argparse.Namespace) -> None:
    """Flower logs every strategy step at INFO on its own handler; our round lines say what
    matters, so without ``-v`` only its warnings show."""
    from edgefleet.cli import verbosity

    if verbosity(args) == 0:
        import flwr.supercore.logger  # sets its logger to DEBUG on import: set ours after

        logging.getLogger(flwr.supercore.logger.LOGGER_NAME).setLevel(logging.WARNING)
        # scikit-learn on a device whose partition is smaller than a batch (sim fl trains here)
        warnings.filterwarnings("ignore", message="Got `batch_size` less than 1 or larger",
                                category=UserWarning)  # fmt: skip


class _RoundPrinter:
    """``on_round``: a progress line per round, with the seconds it took."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.restart()

    def restart(self) -> None:
        self.started = time.monotonic()

    def __call__(self, record: Any) -> None:
        now = time.monotonic()
        print(_round_line(record, self.rounds, now - self.started), flush=True)
        self.started = now


def _dp_text(dp: Any) -> str:
    return "" if dp is None else f", dp z={dp.noise_multiplier:g} C={dp.clipping_norm:g}"


def _resume_point(c: Any, spec: Any) -> Any:
    """The run's last registered version (None: a new run); a run id of another model is
    refused (``--run-id`` resumes the same run)."""
    versions = _runs(c).get(spec.run_id, [])
    if versions and (other := versions[-1].name) != spec.model_name:
        raise ValueError(f"run {spec.run_id!r} trains {other!r}, not {spec.model_name!r}: "
                         f"pass --name {other} to resume it, or another --run-id")  # fmt: skip
    return versions[-1] if versions else None


def _summary(spec: Any, outcome: Any) -> str:
    result = outcome.result
    registered = [r for r in result.rounds if r.version]
    line = (f"run {spec.run_id}: {len(registered)} of {len(result.rounds)} rounds registered; "
            f"final version {result.version}")  # fmt: skip
    if registered:
        fl = registered[-1].lineage["fl"]
        metrics = {**fl["metrics"]["eval"], **fl["metrics"]["central"]}
        acc = metrics.get("accuracy", metrics.get("eval-accuracy"))
        line += "" if acc is None else f"; accuracy {acc:.4f}"
        dp = fl.get("dp") or {}
        if dp.get("epsilon") is not None:
            line += f"; eps {dp['epsilon']:.3g} at delta {dp['delta']:g}"
    return line


def fl_start(args: argparse.Namespace) -> int:
    from edgefleet.coordinator.service import mqtt_config_for
    from edgefleet.federated.service import FlService, ReleasePolicy

    spec = _spec(args)
    if args.release_if_better and not args.release_to:
        raise ValueError("--release-if-better needs --release-to")
    policy = (ReleasePolicy(selector=args.release_to, if_better=args.release_if_better or "")
              if args.release_to else None)  # fmt: skip
    c = _coordinator(args)
    if not c.config.broker:
        raise ValueError("no broker: pass --broker mqtt://host:port or set broker in "
                         "coordinator.toml")  # fmt: skip
    last = _resume_point(c, spec)
    done = int(last.lineage["fl"]["round"]) if last is not None else 0
    if done >= spec.rounds:
        print(f"run {spec.run_id}: all {done} rounds already registered; final version "
              f"{last.version}")  # fmt: skip
        return 0
    mqtt = mqtt_config_for(c, client_id=f"fl-{os.getpid()}")
    _quiet_flower(args)
    if last is not None:
        print(f"run {spec.run_id}: resuming after round {done} of {spec.rounds} (version "
              f"{last.version})", flush=True)  # fmt: skip
    else:
        print(f"run {spec.run_id}: {spec.rounds} rounds of {spec.strategy.name} on "
              f"{spec.model_name}{_dp_text(spec.strategy.dp)}", flush=True)  # fmt: skip
    from edgefleet.coordinator import operations

    operations.audited(c, operations.cli_principal(), "fl.start", f"fl:{spec.run_id}", "cli",
                       lambda: None, lambda _: {"rounds": spec.rounds, "resumed_after": done})
    show = _RoundPrinter(spec.rounds)
    with FlService(c, mqtt, presence_window=args.presence) as service:
        show.restart()
        outcome = service.run(spec, on_round=show, release=policy, wait_devices=args.wait_devices)
    result = outcome.result
    registered = [r for r in result.rounds if r.version]
    print(_summary(spec, outcome), flush=True)
    if policy is not None:
        if outcome.released is None:
            print(f"not released: {outcome.release_note}")
        else:
            print(f"release {outcome.released.sequence}: {spec.model_name} "
                  f"{outcome.released_version} to "
                  f"{len(outcome.released.targets)} devices ({outcome.release_note})")
    return 0 if registered else 3


def _runs(c: Any) -> dict[str, list[Any]]:
    """run id -> its registered versions, by round (every version, not the API's newest)."""
    from edgefleet.console.views import fl_versions

    runs: dict[str, list[Any]] = fl_versions(c.registry.models())
    return runs


def _run_row(run_id: str, versions: list[Any]) -> dict[str, Any]:
    last = versions[-1]
    fl = last.lineage["fl"]
    return {
        "run_id": run_id,
        "model": last.name,
        "rounds_done": int(fl["round"]),
        "rounds": int(fl["rounds"]),
        "strategy": fl["strategy"]["name"],
        "last_version": last.version,
        "eval": fl["metrics"]["eval"],
        "created": last.created,
    }


def fl_runs(args: argparse.Namespace) -> int:
    rows = [_run_row(k, v) for k, v in _runs(_coordinator(args)).items()]
    rows.sort(key=lambda r: r["created"])
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no federated runs")
    for r in rows:
        acc = r["eval"].get("eval-accuracy")
        print(f"{r['run_id']}: {r['model']} rounds {r['rounds_done']}/{r['rounds']} "
              f"{r['strategy']}, version {r['last_version']}"
              + ("" if acc is None else f", eval-accuracy {acc:.4f}"))  # fmt: skip
    return 0


def fl_status(args: argparse.Namespace) -> int:
    runs = _runs(_coordinator(args))
    if not runs:
        raise LookupError("no federated runs registered")
    run_id = args.run_id or max(runs, key=lambda k: runs[k][-1].created)
    if run_id not in runs:
        raise LookupError(f"no federated run {run_id!r} (known: {', '.join(sorted(runs))})")
    row = _run_row(run_id, runs[run_id])
    if args.json:
        print(json.dumps({**row, "versions": [m.version for m in runs[run_id]]}, indent=2))
        return 0
    state = "complete" if row["rounds_done"] >= row["rounds"] else "incomplete (resumable)"
    print(f"{run_id}: {row['model']}, {row['strategy']}, round {row['rounds_done']} of "
          f"{row['rounds']}: {state}")  # fmt: skip
    for mv in runs[run_id]:
        print("  " + _history_line(mv))
    return 0


def _history_line(mv: Any) -> str:
    lineage = mv.lineage or {}
    fl = lineage.get("fl")
    parent = lineage.get("parent")
    head = f"{mv.name} {mv.version}" + (f" <- {parent}" if parent else "")
    if not fl:
        return f"{head}: registered" + (f", accuracy {mv.metrics['accuracy']:.4f}"
                                        if "accuracy" in (mv.metrics or {}) else "")
    metrics = {**fl["metrics"]["eval"], **fl["metrics"]["central"]}
    shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
    devices = ",".join(sorted(c["device_id"] for c in fl["contributors"]))
    dp = fl.get("dp")
    eps = (f" dp z={dp['noise_multiplier']} C={dp['clipping_norm']} eps="
           + ("-" if dp["epsilon"] is None else f"{dp['epsilon']:.3g}") if dp else "")  # fmt: skip
    return (f"{head}: run {fl['run_id']} round {fl['round']}/{fl['rounds']} "
            f"{fl['strategy']['name']}, {fl['num_examples']} samples from [{devices}]"
            f"{', ' + str(len(fl['rejected'])) + ' rejected' if fl['rejected'] else ''}; "
            f"{shown}{eps}")  # fmt: skip


def model_history(args: argparse.Namespace) -> int:
    versions = [m for m in _coordinator(args).registry.models() if m.name == args.name]
    if not versions:
        raise LookupError(f"no versions of model {args.name!r}")
    if args.json:
        print(json.dumps([{"version": m.version, "created": m.created, "metrics": m.metrics,
                           "lineage": m.lineage} for m in versions], indent=2))  # fmt: skip
        return 0
    for mv in versions:
        print(_history_line(mv))
    return 0


def agent_data_add(args: argparse.Namespace) -> int:
    import numpy as np

    from edgefleet.agent.config import AgentConfig
    from edgefleet.federated.agent import data_dir
    from edgefleet.federated.data import add_samples, load_dir

    config = AgentConfig.load(args.home)
    src: Path = args.file
    if src.suffix not in (".npz", ".csv"):
        raise ValueError(f"{src}: expected a .npz (arrays x, y) or .csv (label last) file")
    import tempfile

    from edgefleet.protocol.errors import ConfigError

    with tempfile.TemporaryDirectory() as tmp:  # read (and check) it as the trainer will
        copy = Path(tmp) / src.name
        copy.write_bytes(src.read_bytes())
        try:
            data = load_dir(Path(tmp), test_fraction=0.0)
        except ConfigError as exc:  # name the operator's file, not our copy
            raise ConfigError(str(exc).replace(str(copy), str(src))) from exc
    out = add_samples(data_dir(config), data.x_train, data.y_train)
    classes = np.unique(data.y_train)
    print(f"added {data.num_train} samples ({len(classes)} labels) to {out}")
    if not config.fl_enabled:
        print("note: fl_enabled is false in agent.toml; this device takes no part in rounds",
              file=sys.stderr)  # fmt: skip
    return 0


def sim_fl(args: argparse.Namespace) -> int:
    import tempfile

    from edgefleet.simulations.fl import FlSimConfig, epsilons, run_fl, write_report

    cfg = FlSimConfig(agents=args.agents, rounds=args.rounds, alpha=args.alpha, seed=args.seed,
                      broker=args.broker, strategy=args.strategy, hidden=args.hidden,
                      local_epochs=args.local_epochs, lr=args.lr, optimizer=args.optimizer,
                      round_timeout=args.round_timeout, dp_noise=args.dp_noise,
                      dp_clip=args.dp_clip)  # fmt: skip
    cfg.spec()  # bad DP flags: one line before any agent starts
    out: Path = args.out
    _quiet_flower(args)
    show = _RoundPrinter(cfg.rounds)
    with tempfile.TemporaryDirectory(prefix="edgefleet-simfl-") as work:
        result = run_fl(Path(work), cfg, on_round=show, on_start=show.restart)
    written = write_report(result, out)
    for path in written:
        print(f"wrote {path}")
    if len(written) < 2:
        print("note: no plot: matplotlib is not installed (pip install 'edgefleet[plots]')",
              file=sys.stderr)  # fmt: skip
    best = max(result.accuracy) if result.accuracy else 0.0
    print(f"centralized {result.centralized:.4f}; federated final "
          f"{result.accuracy[-1] if result.accuracy else 0:.4f}, best {best:.4f} "
          f"({best / result.centralized:.3f}x); served by {len(result.served)} agents: "
          f"{min(result.served.values(), default=0):.4f} accuracy"
          + (f"; eps {eps[-1]:.3g}" if (eps := epsilons(result)) and eps[-1] is not None
             else ""))  # fmt: skip
    return 0
