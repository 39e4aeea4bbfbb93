"""ControlNet hint preprocessors on the host, numpy only: Canny's edge detector (Canny 1986) as OpenCV's
`cv2.Canny(image, low, high)` computes it (3x3 Sobel, L1 gradient magnitude, non-maximum suppression in
four directions, hysteresis over 8-connected pixels), which is what sd-webui-controlnet's "canny" runs.
Written from the algorithm, not checked against OpenCV bit for bit (OpenCV is not a dependency).
"""

from __future__ import annotations

import numpy as np

from sdrt.errors import InputError

TAN_22_5 = np.tan(np.pi / 8)


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(dx, dy) of a (H, W) float image, 3x3 Sobel with replicated borders."""
    p = np.pad(gray, 1, mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return dx, dy


def _gradients(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dx, dy and |dx| + |dy| of the channel with the largest magnitude at each pixel (OpenCV's rule for colour)."""
    channels = [_sobel(image[..., c].astype(np.float32)) for c in range(image.shape[-1])]
    mags = np.stack([np.abs(dx) + np.abs(dy) for dx, dy in channels])
    best = mags.argmax(0)
    pick = np.take_along_axis
    dx = pick(np.stack([c[0] for c in channels]), best[None], 0)[0]
    dy = pick(np.stack([c[1] for c in channels]), best[None], 0)[0]
    return dx, dy, pick(mags, best[None], 0)[0]


def _thin(dx: np.ndarray, dy: np.ndarray, mag: np.ndarray) -> np.ndarray:
    """The magnitude where it is a maximum across the edge (its gradient direction, in 4 bins), else 0."""
    p = np.pad(mag, 1)
    h, w = mag.shape

    def at(oy: int, ox: int) -> np.ndarray:
        return p[1 + oy:1 + oy + h, 1 + ox:1 + ox + w]

    ax, ay = np.abs(dx), np.abs(dy)
    horizontal = ay <= ax * TAN_22_5  # gradient along x: compare left / right
    vertical = ay > ax / TAN_22_5
    same_sign = (dx * dy) > 0
    keep = np.where(horizontal, (mag > at(0, -1)) & (mag >= at(0, 1)),
                    np.where(vertical, (mag > at(-1, 0)) & (mag >= at(1, 0)),
                             np.where(same_sign, (mag > at(-1, -1)) & (mag >= at(1, 1)),
                                      (mag > at(-1, 1)) & (mag >= at(1, -1)))))
    return np.where(keep, mag, 0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """The weak pixels 8-connected to a strong one (strong ⊆ weak): a flood fill from the strong ones."""
    h, w = weak.shape
    edges = strong.copy()
    stack = list(zip(*np.nonzero(strong)))
    candidate = weak.tolist()  # Python lists: the fill reads single pixels
    done = edges.tolist()
    while stack:
        y, x = stack.pop()
        for ny in (y - 1, y, y + 1):
            for nx in (x - 1, x, x + 1):
                if 0 <= ny < h and 0 <= nx < w and candidate[ny][nx] and not done[ny][nx]:
                    done[ny][nx] = True
                    stack.append((ny, nx))
    return np.array(done, dtype=bool)


def canny(image: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) uint8: 255 on the edges, 0 elsewhere (sd-webui-controlnet's map)."""
    if not (0 <= low <= high):
        raise InputError(f"canny thresholds must have 0 <= low <= high, got low {low}, high {high}")
    dx, dy, mag = _gradients(image)
    thin = _thin(dx, dy, mag)
    edges = _hysteresis(thin > high, thin > low)
    return np.repeat((edges * 255).astype(np.uint8)[..., None], 3, axis=-1)
