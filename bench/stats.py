"""Summary statistics and image error measures used by the bench."""

from __future__ import annotations

import numpy as np


def summarize(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=np.float64)
    return {"median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """dB over uint8 images; inf when identical."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
