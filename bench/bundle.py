"""Open-bundle throughput: the agent's verify → per-segment hash → decrypt → write path.

A random payload (32 MB; quick: 2 MB) is registered at a real coordinator and built for one
device (segment size 256 KiB), then written as an ``.efb``. "Ours" is what
``Updater.install_file`` does before loading a model: parse the header, ``Updater.check``
(keyring and manifest signatures, sequence, expiry, target), envelope checks, HPKE
``unwrap_key``, then ``Updater._write`` (pread each segment, SHA-256 it against the signed
hash, AES-GCM open it, update the plaintext digest, write it to staging, fsync and commit);
the committed version is then discarded (so the same bundle can be opened again). A random
payload cannot be loaded by a runtime, which keeps ONNX loading out of this figure.

Baseline: raw ``AESGCM.decrypt`` of the same ciphertext segments with the same nonces and
associated data, from memory (no hashing, no I/O). Repetitions are interleaved (raw, ours,
ours, raw, ...) and the median taken. A second row times the crypto pipeline alone (hash +
open + digest from memory, no file I/O) to separate crypto from I/O, and one ``_write`` is
run under cProfile to say what dominates.

Also: full ``Agent.install_file`` of the digits model (both formats; verify, decrypt, store,
load, smoke test, atomic switch) against loading the same model file into the raw runtime.
"""

from __future__ import annotations

import cProfile
import hashlib
import pstats
import time
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


# cProfile function names -> the stage they belong to (first match wins)
_STAGES = (
    ("signature + HPKE + manifest decode", ("hpke", "verify", "decode", "(check)")),
    ("AES-GCM decrypt", ("decrypt",)),
    ("SHA-256 of ciphertext segments", ("openssl_sha256", "sha256")),
    ("SHA-256 of plaintext (digest.update)", ("update",)),
    ("write to staging", ("BufferedWriter", "write")),
    ("fsync (commit)", ("fsync",)),
    ("pread", ("pread",)),
)


def _top_notes(title: str, prof: cProfile.Profile, count: int) -> None:
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.values())
    _NOTES.append(f"{title}: {total * 1e3:.1f} ms (sum of tottime), top functions:")
    top = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)
    for (file, line, func), (_cc, nc, tt, _ct, _callers) in top[:count]:
        label = f"{Path(file).name}:{line}({func})" if line else func
        _NOTES.append(f"  {tt * 1e3:8.2f} ms  {100 * tt / total:5.1f}%  {nc:5d} calls  {label}")


def _profile(updater: Any, path: Path) -> list[tuple[str, float]]:
    prof = cProfile.Profile()
    prof.enable()
    version = _open_bundle(updater, path)
    prof.disable()
    updater.store.discard(version)
    stats = pstats.Stats(prof)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    shares: dict[str, float] = {}
    top = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    for (file, line, func), (_cc, _nc, tt, _ct, _callers) in top:
        label = f"{Path(file).name}:{line}({func})" if line else func
        stage = next((s for s, keys in _STAGES if any(k in label for k in keys)), "other")
        shares[stage] = shares.get(stage, 0.0) + tt
    _top_notes("cProfile of one open", prof, 8)
    return sorted(((s, 100 * t / total) for s, t in shares.items()), key=lambda st: -st[1])


def _open_bench(quick: bool) -> list[Row]:
    import numpy as np
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from edgefleet.agent.agent import Agent
    from edgefleet.protocol.segments import SegmentCipher, sha256_hex

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

    # raw baseline inputs: the same segments, nonces and AAD, precomputed
    bundle_id = bytes.fromhex(m.bundle_id)
    cipher = SegmentCipher(built.content_key, bundle_id, m.segment_size)
    n = len(built.segments)
    jobs = [(*cipher._nonce_aad(i, i == n - 1), ct) for i, ct in enumerate(built.segments)]

    def raw() -> None:
        aead = AESGCM(built.content_key)
        for nonce, aad, ct in jobs:
            aead.decrypt(nonce, ct, aad)

    def ours_memory() -> None:  # the _write loop without its I/O: hash, open, digest
        c = SegmentCipher(built.content_key, bundle_id, m.segment_size)
        digest = hashlib.sha256()
        hashes = m.segment_hashes
        for i, ct in enumerate(built.segments):
            if sha256_hex(ct) != hashes[i]:
                raise AssertionError(f"segment {i} hash")
            digest.update(c.open(i, ct, final=i == n - 1))
        if digest.hexdigest() != m.plaintext_sha256:
            raise AssertionError("plaintext digest")

    def floor() -> None:  # the least work the design needs: hash + decrypt each segment
        aead = AESGCM(built.content_key)
        for nonce, aad, ct in jobs:
            hashlib.sha256(ct).digest()
            aead.decrypt(nonce, ct, aad)

    def sha_only() -> None:
        for _nonce, _aad, ct in jobs:
            hashlib.sha256(ct).digest()

    # correctness first (and warm-up: page cache, first-call costs)
    raw()
    ours_memory()
    updater.store.discard(_open_bundle(updater, path))

    t = interleaved({"raw": raw, "open": lambda: _open_bundle(updater, path),
                     "mem": ours_memory, "floor": floor, "sha": sha_only}, reps,
                    after={"open": updater.store.discard})
    mb = m.plaintext_size / 1e6
    raw_mbs = mb / median(t["raw"])
    label = f"{m.plaintext_size / 2**20:.0f} MiB, {n} segments of {m.segment_size // 1024} KiB"
    base = "raw AESGCM.decrypt, memory"
    rows = [
        Row(key="open_mb_s", metric=f"open bundle: check+unwrap+hash+decrypt+write+fsync ({label})",
            value=mb / median(t["open"]), unit="MB/s", baseline=base, baseline_value=raw_mbs,
            aim=">= 0.7"),
        Row(key="crypto_mb_s",
            metric="crypto pipeline only: segment SHA-256 + open + digest, memory",
            value=mb / median(t["mem"]), unit="MB/s", baseline=base, baseline_value=raw_mbs,
            aim=">= 0.7"),
        Row(key="floor_mb_s", metric="floor: raw SHA-256 + raw decrypt per segment, memory",
            value=mb / median(t["floor"]), unit="MB/s", baseline=base, baseline_value=raw_mbs),
        Row(key="sha256_mb_s", metric="raw SHA-256 alone, memory",
            value=mb / median(t["sha"]), unit="MB/s", baseline=base, baseline_value=raw_mbs),
        Row(key="open_vs_floor_mb_s", metric="open bundle vs the floor",
            value=mb / median(t["open"]), unit="MB/s", baseline="floor (SHA-256 + decrypt)",
            baseline_value=mb / median(t["floor"])),
        Row(key="crypto_vs_floor_mb_s", metric="crypto pipeline vs the floor",
            value=mb / median(t["mem"]), unit="MB/s", baseline="floor (SHA-256 + decrypt)",
            baseline_value=mb / median(t["floor"])),
    ]
    _NOTES.append(f"open: median of {reps} interleaved repetitions, ms: " + ", ".join(
        f"{k} {median(v) * 1e3:.1f} (min {min(v) * 1e3:.1f})" for k, v in t.items()))
    for stage, share in _profile(updater, path):
        rows.append(Row(key="open_share:" + stage, metric=f"share of open time: {stage}",
                        value=share, unit="%", note="cProfile tottime"))
    agent.close()
    return rows


def _install_bench(quick: bool) -> list[Row]:
    """Full ``Agent.install_file`` of the digits model vs the raw runtime loading it."""
    import numpy as np
    from edgefleet.agent.agent import Agent

    reps = 3 if quick else 7
    fl = fleet()
    x = fl.test_inputs()[:1]
    rows = []
    for fmt in Fleet.FORMATS:
        device = f"bench-install-{fmt}"
        home = fl.new_agent(device)
        bundles = [fl.bundle(fl.models[fmt], device)[0] for _ in range(reps + 2)]
        agent = Agent.open(home)
        model_path = fl.model_paths[fmt]
        load_raw = _raw_loader(fmt)
        agent.install_file(bundles[0])  # warm-up: imports, first session
        load_raw(model_path, x)
        t_ours: list[float] = []
        t_raw: list[float] = []
        for r, b in enumerate(bundles[1:-1]):
            for what in (("raw", "ours") if r % 2 == 0 else ("ours", "raw")):
                t0 = time.perf_counter()
                if what == "ours":
                    agent.install_file(b)
                    t_ours.append(time.perf_counter() - t0)
                else:
                    load_raw(model_path, x)
                    t_raw.append(time.perf_counter() - t0)
        np.testing.assert_allclose(agent.predict(x), load_raw(model_path, x), atol=1e-6)
        prof = cProfile.Profile()
        prof.runcall(agent.install_file, bundles[-1])
        _top_notes(f"cProfile of one Agent.install_file ({fmt})", prof, 6)
        agent.close()
        size = model_path.stat().st_size
        rows.append(Row(
            key=f"install_ms:{fmt}",
            metric=f"Agent.install_file, digits {fmt} ({size / 1e3:.0f} kB)",
            value=median(t_ours) * 1e3, unit="ms",
            baseline=f"raw {'ORT session' if fmt == 'onnx' else 'LiteRT interpreter'} load + 1 run",
            baseline_value=median(t_raw) * 1e3, note=f"median of {reps}"))
    return rows


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
