"""fp16 engines vs fp32 engines of the same model: image PSNR and the export's per-component errors.

    python -m sdrt.bench.precision engines/sd15-fp32 engines/sd15-fp16 --size 256 --steps 4
"""

from __future__ import annotations

import argparse
import json
import sys

from sdrt.bench.stats import psnr
from sdrt.pipeline import Pipeline


def compare(fp32_dir: str, fp16_dir: str, size: int, steps: int, scheduler: str, seeds: list[int]) -> dict:
    out: dict = {"psnr_db": {}, "max_pixel_error": {}}
    pipes = [Pipeline.load(d, backend="auto") for d in (fp32_dir, fp16_dir)]
    for seed in seeds:
        images = [p.generate(p.make_config("a photograph of an astronaut riding a horse", steps=steps,
                                           scheduler=scheduler, seed=seed, height=size, width=size)).images
                  for p in pipes]
        out["psnr_db"][seed] = psnr(images[1], images[0])
        out["max_pixel_error"][seed] = int(abs(images[1].astype(int) - images[0].astype(int)).max())
    out["validation"] = {p.manifest.precision: {k: v["error"] for k, v in p.manifest.validation.items()}
                         for p in pipes}
    out["backend"] = pipes[0].backend.describe()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32_engines")
    ap.add_argument("fp16_engines")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scheduler", default="dpmpp_2m_karras")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args(argv)
    result = compare(a.fp32_engines, a.fp16_engines, a.size, a.steps, a.scheduler,
                     [int(s) for s in a.seeds.split(",")])
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
