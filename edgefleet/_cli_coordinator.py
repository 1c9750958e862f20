"""``edgefleet coordinator|model|bundle build …`` handlers (coordinator extra)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefleet.coordinator.fleet import FleetRow
    from edgefleet.coordinator.home import Coordinator
    from edgefleet.coordinator.vault import StorageKey


def _open(home: Path) -> Coordinator:
    from edgefleet.coordinator.home import Coordinator

    return Coordinator.open(home, storage_key=storage_key_from_env(home))


def storage_key_from_env(home: Path) -> StorageKey | None:
    """The storage key from the environment variable ``coordinator.toml`` names
    (``storage_key_env``), if it names one and it is set: the CLI is what reads os.environ."""
    import os

    from edgefleet.coordinator.config import CoordinatorConfig
    from edgefleet.coordinator.vault import StorageKey

    name = CoordinatorConfig.load(home).storage_key_env
    value = os.environ.get(name) if name else None
    return StorageKey.decode(value, source=f"${name}") if value else None


def init(args: argparse.Namespace) -> int:
    from edgefleet.coordinator.home import Coordinator

    c = Coordinator.init(args.home, database=args.database)
    print(
        f"coordinator home {args.home}: root key {c.keys.keyring.root_keyid}, "
        f"release key {c.keys.release.keyid}"
    )
    print(f"agents pin {args.home / 'root.pub'} (edgefleet agent init --trust …)")
    return 0


def enroll(args: argparse.Namespace) -> int:
    from edgefleet.protocol.device import DevicePublic

    public = DevicePublic.decode(args.public_key.read_bytes())
    if public.device_id != args.device_id:
        raise ValueError(
            f"{args.public_key} is for device {public.device_id!r}, not {args.device_id!r}"
        )
    from edgefleet.coordinator import operations

    c = _open(args.home)
    operations.enroll(c, operations.cli_principal(), "cli", public, args.group)
    print(f"enrolled {public.device_id} ({public.kem.kem})")
    from edgefleet.coordinator.brokerconf import sync_enrolled

    print(sync_enrolled(c, public.device_id))
    return 0


def train(args: argparse.Namespace) -> int:
    from edgefleet.models.digits import write_digits_artifacts

    art = write_digits_artifacts(args.out, seed=args.seed, hidden=args.hidden)
    print(
        f"digits: test accuracy {art.accuracy:.4f}; wrote {art.onnx_path}, {art.tflite_path}, "
        f"{art.test_path}, {art.metadata_path}"
    )
    return 0


def register(args: argparse.Namespace) -> int:
    stats = None
    if getattr(args, "reference_data", None) is not None:
        from edgefleet.models.refstats import stats_from_file

        stats = stats_from_file(args.reference_data)
    from edgefleet.coordinator import operations

    mv = operations.register_model(
        _open(args.home), operations.cli_principal(), "cli", args.name, args.file,
        version=args.version, meta_path=args.meta, reference_stats=stats,
    )
    print(mv.version)
    return 0


def list_models(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = [
        {
            "name": m.name,
            "version": m.version,
            "format": m.format,
            "size": m.size,
            "sha256": m.blob,
            "metrics": m.metrics,
        }
        for m in _open(args.home).registry.models()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    for r in [] if args.json else rows:
        print(
            f"{r['name']}\t{r['version']}\t{r['format']}\t{r['size']}\t{r['sha256'][:12]}\t{r['metrics']}"
        )
    return 0


def build(args: argparse.Namespace) -> int:
    from edgefleet.protocol.manifest import MAX_TARGETS

    c = _open(args.home)
    # a side-load file carries one manifest, so it names every device the file is for
    release, built = c.build(args.name, args.version, args.to, shard_size=MAX_TARGETS)
    c.write_bundle(built, args.out)
    print(
        f"{args.out}: release {release.sequence}, {args.name} {args.version}, "
        f"{len(built.envelopes)} devices, {built.manifest.payload_size} bytes payload"
    )
    return 0


def group_add(args: argparse.Namespace) -> int:
    from edgefleet.coordinator import operations

    operations.group_add(_open(args.home), operations.cli_principal(), "cli", args.group,
                         args.devices)  # fmt: skip
    print(f"group {args.group}: added {', '.join(args.devices)}")
    return 0


def group_list(args: argparse.Namespace) -> int:
    for name, members in _open(args.home).registry.groups().items():
        print(f"{name}\t{', '.join(members)}")
    return 0


def broker_config(args: argparse.Namespace) -> int:
    from edgefleet.coordinator.brokerconf import write_broker_config

    c = _open(args.home)
    files = write_broker_config(
        c, args.out or args.home / "broker", port=args.port, bind=args.bind, run_as=args.run_as
    )
    print(f"wrote {files.config}, {files.dynsec} (dynamic-security plugin: accounts, ACL)")
    if files.run_as is not None and args.run_as is None:
        print(
            f"running as root: the config says `user {files.run_as}` so mosquitto can read "
            "these 0600 files (pass --run-as USER to run it as the files' owner instead)"
        )
    print(f"run: mosquitto -c {files.config}")
    print(
        f"device passwords: {args.home / 'secrets' / 'devices'}/<device>.password "
        "(copy to the device, set password_file in its agent.toml)"
    )
    return 0


STALE_AFTER = 120  # s: no status for this long (4 default agent heartbeats) means no ingest


def fleet_status(args: argparse.Namespace) -> int:
    import sys
    import time

    from edgefleet.coordinator import fleet

    rows = fleet.rows(_open(args.home).registry, int(time.time()))
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    from rich import box
    from rich.console import Console
    from rich.table import Table

    behind = [r for r in rows if not r.revoked and not r.in_sync]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for name in ("device", "groups", "state", "model", "running"):
        table.add_column(name, no_wrap=True)
    if behind:  # desired vs actual, only when it says something
        table.add_column("desired", no_wrap=True)
    shadowed = any(r.candidate for r in rows)
    if shadowed:  # a shadow / A/B candidate beside the active model
        table.add_column("candidate", no_wrap=True)
    table.add_column("last seen", no_wrap=True)
    table.add_column("last result", overflow="fold")
    for r in rows:
        cells = [r.device, ",".join(r.groups) or "-", "revoked" if r.revoked else r.state,
                 r.model or "-", _release(r.sequence, r.version)]  # fmt: skip
        if behind:
            cells.append(_desired(r))
        if shadowed:
            c = r.candidate or {}
            cells.append(f"{c.get('mode')} {_release(c.get('sequence'), c.get('version'))}"
                         if c else "-")  # fmt: skip
        cells += [_ago(r.last_seen_s), r.last_result or "-"]
        table.add_row(*cells, style="dim" if r.revoked else None)
    Console().print(table)
    print(_summary(rows, behind))
    note = _stale(rows)
    if note:
        print(note, file=sys.stderr)
    return 0


def _release(sequence: int | None, version: str | None) -> str:
    return "-" if sequence is None else f"{sequence} (v{version})"


def _desired(row: FleetRow) -> str:
    """The newest release for the device, if it does not run it yet."""
    if row.revoked:
        return "-"
    return "in sync" if row.in_sync else _release(row.desired_sequence, row.desired_version)


def _duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _ago(seconds: int | None) -> str:
    """Never negative: a clock ahead of this one reads as "just now"."""
    if seconds is None:
        return "never"
    return "just now" if seconds <= 0 else f"{_duration(seconds)} ago"


def _summary(rows: list[FleetRow], behind: list[FleetRow]) -> str:
    revoked = sum(1 for r in rows if r.revoked)
    synced = len(rows) - revoked - len(behind)
    return f"{len(rows)} devices: {synced} in sync, {len(behind)} behind, {revoked} revoked"


def _stale(rows: list[FleetRow]) -> str | None:
    """A warning when nothing was ingested lately: the statuses above may be old."""
    live = [r for r in rows if not r.revoked]
    seen = [max(0, r.last_seen_s) for r in live if r.last_seen_s is not None]
    if not live:
        return None
    if not seen:
        return "no device status ingested yet — is `coordinator serve` running?"
    if min(seen) > STALE_AFTER:
        return f"no status ingested for {_duration(min(seen))} — is `coordinator serve` running?"
    return None


def revoke(args: argparse.Namespace) -> int:
    from edgefleet.coordinator import operations
    from edgefleet.coordinator.brokerconf import sync_revoked

    c = _open(args.home)
    operations.revoke(c, operations.cli_principal(), "cli", args.device_id)
    print(f"revoked {args.device_id}: no future release includes it")
    print(sync_revoked(c, args.device_id))
    return 0


def rotate_key(args: argparse.Namespace) -> int:
    import time

    keys = _open(args.home).keys.rotate(now=int(time.time()))
    print(
        f"release key {keys.release.keyid} in keyring v{keys.keyring.version}; "
        "agents adopt it with the next release and refuse the old key from then on"
    )
    return 0


def rotate_storage_key(args: argparse.Namespace) -> int:
    import os

    from edgefleet.coordinator.vault import StorageKey
    from edgefleet.protocol.errors import ConfigError

    new = None
    if args.new_key_env:
        value = os.environ.get(args.new_key_env)
        if not value:
            raise ConfigError(f"${args.new_key_env} is not set (--new-key-env)")
        new = StorageKey.decode(value, source=f"${args.new_key_env}")
    c = _open(args.home)
    keyid = c.rotate_storage_key(new)
    where = (
        f"now set ${c.config.storage_key_env} to the value of ${args.new_key_env}"
        if c.config.storage_key_env
        else f"the old key is removed from {c.config.storage_key_path}"
    )
    print(f"storage key {keyid}: every content key and model blob is sealed under it; {where}")
    return 0
