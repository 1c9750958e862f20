"""``python -m bench [--quick] [--out DIR] [NAME ...]``: run benchmarks, print and save results.

Prints the machine line and one markdown table per benchmark (plus its notes), and writes
``<out>/latest.json`` and ``<out>/latest.md`` (default ``bench/results/``; not committed).
Exits 1 if a benchmark raised (the others still run); an aim that is not met is reported,
not an error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import discover
from ._util import machine, machine_line, markdown_table

RESULTS = Path(__file__).resolve().parent / "results"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    mods = discover()
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", metavar="NAME",
                    help=f"benchmarks to run (default: all of {', '.join(mods)})")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes and few iterations (smoke test; figures are rough)")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="directory for latest.json and latest.md (default: %(default)s)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    if args.list:
        for name, mod in mods.items():
            print(f"{name}\t{(mod.__doc__ or '').strip().splitlines()[0]}")
        return 0
    unknown = [n for n in args.names if n not in mods]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(mods)}")
    selected = args.names or list(mods)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    info = machine()
    started = time.time()
    doc: dict[str, Any] = {"machine": info, "machine_line": machine_line(info),
                           "quick": args.quick, "started": int(started), "benchmarks": {}}
    md = [f"# EdgeFleet benchmarks{' (quick)' if args.quick else ''}", "",
          f"Machine: {machine_line(info)}", ""]
    print(md[-2], flush=True)
    failed = []
    for name in selected:
        mod = mods[name]
        t0 = time.perf_counter()
        entry: dict[str, Any] = {}
        try:
            rows = mod.run(args.quick)
            notes = list(getattr(mod, "notes", list)())
            entry = {"rows": [r.to_dict() for r in rows], "notes": notes}
            body = markdown_table(rows) + ("\n\n" + "\n".join(f"    {n}" for n in notes)
                                           if notes else "")
        except Exception:
            failed.append(name)
            tb = traceback.format_exc()
            entry = {"error": tb}
            body = "FAILED:\n\n```\n" + tb + "```"
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        doc["benchmarks"][name] = entry
        section = f"## {name} ({entry['seconds']:.1f} s)\n\n{body}\n"
        md.append(section)
        print("\n" + section, flush=True)
    doc["seconds"] = round(time.time() - started, 2)

    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "latest.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    _write(args.out / "latest.md", "\n".join(md))
    print(f"wrote {args.out / 'latest.json'} and {args.out / 'latest.md'} "
          f"({doc['seconds']:.0f} s)")
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
