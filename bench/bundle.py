"""Open-bundle throughput and one device's install, each against the floor of its work.

A random payload (32 MB; quick: 2 MB) is registered at a real coordinator and built for one
device (segment size 256 KiB), then written as an ``.efb``. Rows (ratios = ours / floor,
repetitions interleaved with their floors, medians):

- crypto of an open: ``SegmentOpener.open`` (the product's per-segment check: one SHA-256
  against the signed hash + one AES-GCM open) over every segment from memory, against the
  one-core crypto floor (raw ``hashlib.sha256`` + raw ``AESGCM.decrypt`` per segment; on one
  core the plaintext digest is taken later, from the file, while it is fsynced). With two
  workers (``open_into``, segments written to ``/dev/null``; this includes the plaintext
  digest, which the calling thread takes beside the workers) against the same one-core floor.
- open with a durable write: what ``Updater.install_file`` does before loading a model (parse
  the header, verify keyring and manifest, envelope checks, HPKE ``unwrap_key``, then
  ``Updater._write``: open every segment into the staged file, fsync the version's three files
  while the plaintext digest is checked by reading the file back, fsync the staged directory,
  rename, fsync ``versions/``), sequential and with two workers, against the I/O floor (pread +
  SHA-256 + decrypt + write of each segment into a new file, one fsync). The committed version
  is discarded, untimed, so the same bundle opens again. A random payload cannot be loaded by
  a runtime, which keeps ONNX loading out of this figure.
- one device's install: ``Agent.install_file`` of the digits model (both formats: verify,
  decrypt, store, load, smoke test, atomic switch, prune) against its raw local floor: decrypt
  the same segments from memory, write them to a new file, fsync it, load it in the raw
  runtime and run it once. The same again for a wide digits MLP (8,192 hidden units, ~2.4 MB
  per format; quick: 2,048): the size-independent work of an install (keyring and manifest
  signatures, the manifest decode with its reference statistics, the envelope's HPKE unwrap, the
  smoke test, the store's bookkeeping and its 7 fsyncs) is what ours - floor shows at both
  sizes, and the ratio falls as the model grows.

Also the fsyncs of one install, counted, and cProfile of one open and one install.
"""

from __future__ import annotations

import cProfile
import hashlib
import logging
import os
import pstats
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._util import Fleet, Row, fleet, interleaved, median

NAME = "bundle"
SEGMENT = 256 * 1024
_NOTES: list[str] = []


def notes() -> list[str]:
    return list(_NOTES)


def _open_bundle(updater: Any, path: Path) -> Any:
    """``Updater.install_file`` up to and including ``_write``; returns the staged version."""
    from edgefleet.agent.updater import FileSource
    from edgefleet.protocol.container import HEADER_SIZE, decode_envelopes, parse_header
    from edgefleet.protocol.envelope import unwrap_key
    from edgefleet.protocol.messages import ReleaseOffer
    from edgefleet.protocol.verify import check_envelopes, select_envelope

    size = path.stat().st_size
    with open(path, "rb") as f:
        layout = parse_header(f.read(HEADER_SIZE), file_size=size,
                              max_payload=updater.config.max_payload)

        def section(name: str) -> bytes:
            off, length = layout[name]
            f.seek(off)
            return f.read(length)

        envelopes = decode_envelopes(section("envelopes"))
        device = updater.identity.device_id
        offer = ReleaseOffer(keyring=section("keyring"), keyring_sig=section("keyring_sig"),
                             manifest=section("manifest"), signature=section("signature"),
                             envelope=next(e for e in envelopes if e.device_id == device))
        manifest = updater.check(offer)
    check_envelopes(manifest, envelopes)
    mine = select_envelope(manifest, envelopes, device)
    key = unwrap_key(mine, updater.identity.kem, bundle_id=manifest.bundle_id)
    source = FileSource(path, layout["payload"][0])
    try:
        return updater._write(manifest, offer, key, source, None)
    finally:
        source.close()


def _top_notes(title: str, prof: cProfile.Profile, count: int) -> None:
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    _NOTES.append(f"{title}: {total * 1e3:.1f} ms (sum of tottime), top functions:")
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)
    for (file, line, func), (_cc, nc, tt, _ct, _callers) in top[:count]:
        label = f"{Path(file).name}:{line}({func})" if line else func
        _NOTES.append(f"  {tt * 1e3:8.2f} ms  {100 * tt / total:5.1f}%  {nc:5d} calls  {label}")


class _Memory:
    """Segments from memory as a ``SegmentSource``."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload

    def read(self, offset: int, length: int) -> bytes:
        return self.payload[offset: offset + length]


def _open_bench(quick: bool) -> list[Row]:
    import numpy as np
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from edgefleet.agent.agent import Agent
    from edgefleet.agent.opener import SegmentOpener
    from edgefleet.protocol.segments import SegmentCipher

    size = (2 if quick else 32) * 1024 * 1024
    reps = 5 if quick else 15
    fl = fleet()
    device = "bench-open"
    home = fl.new_agent(device)
    payload = fl.root / "random.onnx"
    payload.write_bytes(np.random.default_rng(0).bytes(size))
    model = fl.register("random-payload", payload, check=False)  # opaque: never loaded
    path, built = fl.bundle(model, device)
    m = built.manifest
    assert m.segment_size == SEGMENT, m.segment_size
    agent = Agent.open(home)  # no model active: nothing loads
    updater = agent.updater
    cores = os.cpu_count() or 1

    bundle_id = bytes.fromhex(m.bundle_id)
    cipher = SegmentCipher(built.content_key, bundle_id, m.segment_size)
    n = len(built.segments)
    jobs = [(*cipher._nonce_aad(i, i == n - 1), ct) for i, ct in enumerate(built.segments)]
    memory = _Memory(b"".join(built.segments))
    base = path.stat().st_size - m.payload_size
    scratch = fl.root / "floor"
    scratch.mkdir(exist_ok=True)

    def floor() -> None:  # one core: one SHA-256 + one decrypt per segment, from memory
        aead = AESGCM(built.content_key)
        for nonce, aad, ct in jobs:
            hashlib.sha256(ct).digest()
            aead.decrypt(nonce, ct, aad)

    def floor_parallel() -> None:  # raw: two threads, each SHA-256 + decrypt of a segment
        aead = AESGCM(built.content_key)

        def one(job: tuple[bytes, bytes, bytes]) -> bytes:
            nonce, aad, ct = job
            hashlib.sha256(ct).digest()
            return aead.decrypt(nonce, ct, aad)

        with ThreadPoolExecutor(2) as pool:
            for _ in pool.map(one, jobs):
                pass

    def crypto() -> None:  # the product's per-segment check + open, from memory
        opener = SegmentOpener(m, SegmentCipher(built.content_key, bundle_id, SEGMENT),
                               verified=False)
        for i, ct in enumerate(built.segments):
            opener.open(i, ct)

    def crypto_parallel() -> None:
        opener = SegmentOpener(m, SegmentCipher(built.content_key, bundle_id, SEGMENT),
                               verified=False)
        fd = os.open(os.devnull, os.O_WRONLY)
        try:
            opener.open_into(memory, fd, workers=2)
        finally:
            os.close(fd)

    def io_floor() -> Path:  # pread + SHA-256 + decrypt + write, one fsync, into a new file
        out = scratch / uuid.uuid4().hex
        aead = AESGCM(built.content_key)
        src = os.open(path, os.O_RDONLY)
        dst = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for i, (nonce, aad, _ct) in enumerate(jobs):
                off, length = m.segment_span(i)
                ct = os.pread(src, length, base + off)
                hashlib.sha256(ct).digest()
                os.write(dst, aead.decrypt(nonce, ct, aad))
            os.fsync(dst)
        finally:
            os.close(src)
            os.close(dst)
        return out

    def open_with(workers: int) -> Any:
        updater.workers = workers
        return _open_bundle(updater, path)

    # correctness first (and warm-up: page cache, first-call costs)
    crypto()
    crypto_parallel()
    updater.store.discard(open_with(1))
    io_floor().unlink()

    load = os.getloadavg()
    t = interleaved({"floor": floor, "floor2": floor_parallel, "crypto": crypto,
                     "crypto2": crypto_parallel,
                     "io_floor": io_floor, "open": lambda: open_with(1),
                     "open2": lambda: open_with(2)}, reps,
                    after={"open": updater.store.discard, "open2": updater.store.discard,
                           "io_floor": Path.unlink})
    load_after = os.getloadavg()
    mb = m.plaintext_size / 1e6

    def rate(k: str) -> float:
        return mb / median(t[k])

    label = f"{m.plaintext_size / 2**20:.0f} MiB, {n} segments of {m.segment_size // 1024} KiB"
    par_aim = ">= 1.8" if cores >= 2 else None
    crypto_floor = "one core: SHA-256 + AES-GCM decrypt per segment, memory"
    io_base = "one core: pread + SHA-256 + decrypt + write + 1 fsync"
    rows = [
        Row(key="crypto_mb_s", metric=f"crypto of an open, one core, memory ({label})",
            value=rate("crypto"), unit="MB/s", baseline=crypto_floor,
            baseline_value=rate("floor"), aim=">= 0.95"),
        Row(key="crypto_parallel_mb_s",
            metric="crypto of an open, 2 workers + the plaintext digest beside them, memory",
            value=rate("crypto2"), unit="MB/s", baseline=crypto_floor,
            baseline_value=rate("floor"), aim=par_aim),
        Row(key="floor_parallel_mb_s",
            metric="raw, 2 threads: SHA-256 + decrypt per segment (does this machine scale now?)",
            value=rate("floor2"), unit="MB/s", baseline=crypto_floor,
            baseline_value=rate("floor")),
        Row(key="open_mb_s",
            metric="open with a durable write, 1 worker (verify+unwrap+open+commit)",
            value=rate("open"), unit="MB/s", baseline=io_base, baseline_value=rate("io_floor"),
            aim=">= 1.0"),
        Row(key="open_parallel_mb_s", metric="open with a durable write, 2 workers",
            value=rate("open2"), unit="MB/s", baseline=io_base,
            baseline_value=rate("io_floor"), aim=par_aim),
        Row(key="floor_mb_s", metric="the one-core crypto floor", value=rate("floor"),
            unit="MB/s", baseline="the I/O floor", baseline_value=rate("io_floor")),
    ]
    _NOTES.append(
        f"open: {cores} cores, load average {load[0]:.1f} before / {load_after[0]:.1f} after; "
        f"median of {reps} interleaved repetitions, ms: " + ", ".join(
            f"{k} {median(v) * 1e3:.1f} (min {min(v) * 1e3:.1f})" for k, v in t.items()))
    prof = cProfile.Profile()
    version = prof.runcall(open_with, 1)
    updater.store.discard(version)
    _top_notes("cProfile of one open (1 worker)", prof, 8)
    agent.close()
    return rows


def _count_fsyncs(run: Any) -> int:
    real, calls = os.fsync, [0]

    def counting(fd: int) -> None:
        calls[0] += 1
        real(fd)

    os.fsync = counting
    try:
        run()
    finally:
        os.fsync = real
    return calls[0]


def _install_bench(quick: bool) -> list[Row]:
    """Full ``Agent.install_file`` of the digits model and of a wide one vs their raw floors."""
    from edgefleet.models.digits import write_digits_artifacts

    reps = 3 if quick else 15
    fl = fleet()
    scratch = fl.root / "install-floor"
    scratch.mkdir(exist_ok=True)
    hidden = 2048 if quick else 8192
    quiet = logging.getLogger("edgefleet.models.digits")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # two iterations are enough for a bench: "did not converge"
    try:
        wide = write_digits_artifacts(fl.root / f"wide-{hidden}", hidden=hidden, max_iter=2)
    finally:
        quiet.setLevel(level)
    rows: list[Row] = []
    over: list[str] = []
    for fmt in Fleet.FORMATS:
        path = wide.onnx_path if fmt == "onnx" else wide.tflite_path
        mv = fl.coord.register_model(f"wide-{fmt}", path, meta_path=wide.metadata_path)
        for label, model, file in (("digits", fl.models[fmt], fl.model_paths[fmt]),
                                   (f"wide digits ({hidden} hidden)", (mv.name, mv.version),
                                    path)):  # fmt: skip
            got = _install_one(fl, fmt, label, model, file, reps, scratch)
            ours, floor = got[0].value, got[0].baseline_value or 0.0
            over.append(f"{label} {fmt}: {ours - floor:.2f} ms")
            rows += got
    _NOTES.append("install, ours - floor (the size-independent work): " + "; ".join(over))
    return rows


def _install_one(fl: Fleet, fmt: str, label: str, model: tuple[str, str], file: Path,
                 reps: int, scratch: Path) -> list[Row]:
    import numpy as np
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from edgefleet.agent.agent import Agent
    from edgefleet.protocol.segments import SegmentCipher

    x = fl.test_inputs()[:1]
    device = f"bench-install-{fmt}-{model[0]}"
    home = fl.new_agent(device)
    built_bundles = [fl.bundle(model, device) for _ in range(reps + 3)]
    bundles = [b for b, _ in built_bundles]
    built = built_bundles[0][1]
    m = built.manifest
    cipher = SegmentCipher(built.content_key, bytes.fromhex(m.bundle_id), m.segment_size)
    n = len(built.segments)
    jobs = [(*cipher._nonce_aad(i, i == n - 1), ct) for i, ct in enumerate(built.segments)]
    agent = Agent.open(home)
    load_raw = _raw_loader(fmt)

    def floor() -> Any:  # decrypt + write + fsync a new file, raw load + 1 run
        out = scratch / f"{uuid.uuid4().hex}.{fmt}"
        aead = AESGCM(built.content_key)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for nonce, aad, ct in jobs:
                os.write(fd, aead.decrypt(nonce, ct, aad))
            os.fsync(fd)
        finally:
            os.close(fd)
        result = load_raw(out, x)
        out.unlink()  # inside: ours prunes the version it replaces too
        return result

    agent.install_file(bundles[0])  # warm-up: imports, first session
    floor()
    todo = iter(bundles[1:-2])
    t = interleaved({"floor": floor, "ours": lambda: agent.install_file(next(todo))}, reps)
    np.testing.assert_allclose(agent.predict(x), floor(), atol=1e-6)
    fsyncs = _count_fsyncs(lambda: agent.install_file(bundles[-2]))
    prof = cProfile.Profile()
    prof.runcall(agent.install_file, bundles[-1])
    _top_notes(f"cProfile of one Agent.install_file ({label} {fmt})", prof, 6)
    agent.close()
    size = file.stat().st_size
    raw = "ORT session" if fmt == "onnx" else "LiteRT interpreter"
    key = fmt if model == fl.models[fmt] else f"{fmt}-wide"
    return [
        Row(key=f"install_ms:{key}",
            metric=f"one device's install: Agent.install_file, {label} {fmt} "
                   f"({size / 1e3:,.0f} kB)",
            value=median(t["ours"]) * 1e3, unit="ms",
            baseline=f"decrypt + write + fsync + raw {raw} load + 1 run",
            baseline_value=median(t["floor"]) * 1e3, aim="<= 1.2",
            note=f"median of {reps}, load average {os.getloadavg()[0]:.1f}"),
        Row(key=f"install_fsyncs:{key}", metric=f"fsyncs of one install ({label} {fmt})",
            value=fsyncs, unit="calls", aim="<= 7"),
    ]


def _raw_loader(fmt: str) -> Any:
    if fmt == "onnx":
        import onnxruntime as ort

        def load(path: Path, x: Any) -> Any:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(str(path), sess_options=opts,
                                        providers=["CPUExecutionProvider"])
            return sess.run(None, {sess.get_inputs()[0].name: x})[0]

        return load
    from ai_edge_litert.interpreter import Interpreter

    def load_lite(path: Path, x: Any) -> Any:
        interp = Interpreter(model_path=str(path), num_threads=1)
        interp.allocate_tensors()
        interp.set_tensor(interp.get_input_details()[0]["index"], x)
        interp.invoke()
        return interp.get_tensor(interp.get_output_details()[0]["index"])

    return load_lite


def run(quick: bool) -> list[Row]:
    _NOTES.clear()
    return _open_bench(quick) + _install_bench(quick)
