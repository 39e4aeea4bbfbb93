"""torch module -> one ONNX file with its weights in one external-data file beside it."""

from __future__ import annotations

import os
import shutil
import stat
import warnings
from pathlib import Path
from typing import Sequence

import onnx
import torch


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
) -> None:
    """Writes path (graph) and path + '.data' (all weights), nothing else."""
    raw_dir = path.parent / f".{path.stem}.raw"
    shutil.rmtree(raw_dir, ignore_errors=True)
    raw_dir.mkdir(parents=True)
    try:
        raw = raw_dir / "model.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer chatter about shape-dependent control flow
            torch.onnx.export(
                module, args, str(raw), input_names=list(input_names), output_names=list(output_names),
                dynamic_axes=dynamic_axes, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
        model = onnx.load(str(raw), load_external_data=True)
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
            location=path.name + ".data", size_threshold=0,
        )
        # onnx writes the weights through a private temporary file (mode 0600): give them the graph's
        # mode, so a service user who can read the engines can read their weights
        os.chmod(path.parent / (path.name + ".data"), stat.S_IMODE(path.stat().st_mode))
    finally:
        shutil.rmtree(raw_dir, ignore_errors=True)
