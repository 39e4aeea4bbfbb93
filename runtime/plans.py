"""Checks on TensorRT plans before any is deserialized: what `sdrt build` recorded in the manifest
against the installed library, the GPU and the component specs. Pure (no GPU), so CI tests them.

Every failure is an EngineError that says to run `sdrt build`; a stale or corrupted plan never
reaches TensorRT's deserializer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from sdrt.errors import EngineError
from sdrt.manifest import ComponentSpec, Manifest, verify_files


def build_hint(engine_dir: Path, extra: str = "") -> str:
    return f"rebuild the plans: `sdrt build {engine_dir}{extra}`"


def check_io(io: Sequence[dict[str, Any]], spec: ComponentSpec, where: Path | str) -> None:
    """A plan's I/O (names, direction, dtypes) must be the manifest's, exactly."""
    got = {(t["name"], t["mode"], t["dtype"]) for t in io}
    want = {(t.name, "input", t.dtype) for t in spec.inputs} | {(t.name, "output", t.dtype) for t in spec.outputs}
    if got != want:
        detail = ", ".join(f"{n} {m} {d}" for n, m, d in sorted(got ^ want))
        raise EngineError(f"{where}: I/O differs from manifest.json ({detail}); re-export with `sdrt export`, "
                          "then `sdrt build`")


def check_plans(engine_dir: Path, manifest: Manifest, flavour: str, version: str, arch: str | None) -> None:
    """Raises unless every plan was built by this TensorRT flavour and version, for this GPU's
    architecture (None: not checked), from the ONNX now in the directory, and is intact."""
    engine_dir = Path(engine_dir)
    plans = manifest.plans
    if plans is None:
        raise EngineError(f"{engine_dir} has no TensorRT plans: build them with `sdrt build {engine_dir}` "
                          "(or run on ONNX Runtime with --backend ort-cuda)")
    if plans.flavour != flavour:
        raise EngineError(f"{engine_dir}: plans were built with {plans.flavour} but {flavour} is in use; "
                          + build_hint(engine_dir, f" --flavour {flavour}"))
    if plans.version != version:
        raise EngineError(f"{engine_dir}: plans were built with {flavour} {plans.version} but {version} is "
                          "installed (plans load only in the version that built them); " + build_hint(engine_dir))
    if arch is not None and arch not in plans.archs:
        raise EngineError(f"{engine_dir}: plans target {', '.join(plans.archs)} but this GPU is {arch}; "
                          + build_hint(engine_dir, f" --arch {arch}"))
    for name in manifest.model.components:
        record = plans.components.get(name)
        if record is None or record.plan not in manifest.files:
            raise EngineError(f"{engine_dir}: no plan recorded for {name}; " + build_hint(engine_dir))
        spec = manifest.components[name]
        if record.onnx_sha256 != manifest.files.get(spec.onnx):
            raise EngineError(f"{engine_dir / record.plan} was built from another {spec.onnx} (stale); "
                              + build_hint(engine_dir))
        check_io(record.io, spec, engine_dir / record.plan)
    verify_files(engine_dir, manifest, [plans.components[name].plan for name in manifest.model.components])
