"""Candidate bundles for the shadow / A/B tests: signed like any release, with ``candidate``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgefleet.protocol.build import ReleaseSpec, build_release
from edgefleet.protocol.candidate import CandidateSpec
from edgefleet.protocol.manifest import SmokeVector, TensorSpec

from tests.conftest import SEGMENT, T0, Fleet


def candidate_efb(fleet: Fleet, out: Path, *, mode: str, share: float = 0.0, sequence: int = 100,
                  version: str = "2", device: str = "dev-a") -> Path:
    """digits ``version`` (registered in the fixture coordinator) as a signed candidate bundle."""
    c = fleet.coordinator
    mv = c.registry.model("digits", version)
    meta = mv.meta
    spec = ReleaseSpec(
        name="digits", format=mv.format, model_version=mv.version, sequence=sequence,
        inputs=tuple(TensorSpec.from_dict(t) for t in meta["inputs"]),
        outputs=tuple(TensorSpec.from_dict(t) for t in meta["outputs"]), created=T0,
        segment_size=SEGMENT, smoke=tuple(SmokeVector.from_dict(v) for v in meta["smoke"]),
        candidate=CandidateSpec(mode=mode, share=share) if mode else None,
    )
    built = build_release(c.blobs.get(mv.blob), spec, release_key=c.keys.release,
                          recipients={device: fleet.identities[device].public().kem})
    out.write_bytes(built.to_file_bytes(c.keys.keyring_raw, c.keys.keyring_sig))
    return out


class Direct:
    """A model run straight in ONNX Runtime: the direct computation the metrics must match."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.name: x.astype(np.float32)})[0])
