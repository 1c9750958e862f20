"""``edgefleet coordinator|model|bundle build …`` handlers (coordinator extra)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgefleet.coordinator.fleet import FleetRow
    from edgefleet.coordinator.home import Coordinator


def _open(home: Path) -> Coordinator:
    from edgefleet.coordinator.home import Coordinator

    return Coordinator.open(home)


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
    c = _open(args.home)
    c.enroll(public)
    for g in args.group:
        c.registry.add_to_group(g, [public.device_id])
    print(f"enrolled {public.device_id} ({public.kem.kem})")
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
    mv = _open(args.home).register_model(
        args.name, args.file, version=args.version, meta_path=args.meta
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
    c = _open(args.home)
    release, built = c.build(args.name, args.version, args.to)
    c.write_bundle(built, args.out)
    print(
        f"{args.out}: release {release.sequence}, {args.name} {args.version}, "
        f"{len(built.envelopes)} devices, {built.manifest.payload_size} bytes payload"
    )
    return 0


def group_add(args: argparse.Namespace) -> int:
    _open(args.home).registry.add_to_group(args.group, args.devices)
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
    print(f"wrote {files.config}, {files.passwords}, {files.acl}")
    print(f"run: mosquitto -c {files.config}")
    print(
        f"device passwords: {args.home / 'secrets' / 'devices'}/<device>.password "
        "(copy to the device, set password_file in its agent.toml)"
    )
    return 0


def fleet_status(args: argparse.Namespace) -> int:
    import time

    from edgefleet.coordinator import fleet

    rows = fleet.rows(_open(args.home).registry, int(time.time()))
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "device", "groups", "state", "model", "version", "seq", "last seen", "last result",
        "desired",
    )  # fmt: skip
    for r in rows:
        seen = "never" if r.last_seen_s is None else f"{r.last_seen_s} s ago"
        table.add_row(
            r.device,
            ",".join(r.groups) or "-",
            r.state,
            r.model or "-",
            r.version or "-",
            str(r.sequence or "-"),
            seen,
            r.last_result or "-",
            _desired(r),
        )
    Console().print(table)
    return 0


def _desired(row: FleetRow) -> str:
    """The newest release for the device, and whether the device was revoked."""
    want = (
        "-" if row.desired_sequence is None else f"{row.desired_sequence} (v{row.desired_version})"
    )
    return f"{want}, revoked" if row.revoked else want


def revoke(args: argparse.Namespace) -> int:
    _open(args.home).revoke(args.device_id)
    print(
        f"revoked {args.device_id}: no future release includes it; re-run "
        "`coordinator broker-config` to drop its broker password"
    )
    return 0


def rotate_key(args: argparse.Namespace) -> int:
    import time

    keys = _open(args.home).keys.rotate(now=int(time.time()))
    print(
        f"release key {keys.release.keyid} in keyring v{keys.keyring.version}; "
        "agents adopt it with the next release and refuse the old key from then on"
    )
    return 0
