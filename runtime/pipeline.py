"""Pipeline: prompt -> images on exported engines, with no torch in the process.

One text-encoder call for [negative; positive] (2B), one denoise-step call per step at 2B (B when
guidance is 1), latents and sampler history in the backend's memory between steps (ping-pong
buffers), one VAE decode, one download of uint8 images.

Noise: image i of a batch uses seed + i; its initial latents are the first draw of
numpy.random.Generator(PCG64(seed + i)).standard_normal((4, h, w), float32) and, for ancestral
samplers, the per-step noise is drawn next from the same generator, (steps, 4, h, w) at once.
So image i of a batch equals the single image made with seed + i.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdrt.backends import select_backend
from sdrt.backends.base import Backend, Engine
from sdrt.errors import InputError, is_integer
from sdrt.manifest import COMPONENTS, Manifest, read_manifest
from sdrt.schedulers import NoiseSchedule, SamplerPlan, check_sampler, make_plan
from sdrt.tokenizer import ClipTokenizer

SEED_MAX = 2**32 - 1


@dataclass(frozen=True)
class GenerationConfig:
    """Everything that decides an image; validated once, then passed down."""

    prompt: tuple[str, ...]
    negative_prompt: tuple[str, ...]
    steps: int = 25
    guidance: float = 7.5
    scheduler: str = "dpmpp_2m_karras"
    seed: int = 0
    height: int = 512
    width: int = 512

    @property
    def batch(self) -> int:
        return len(self.prompt)

    @property
    def cfg(self) -> bool:
        return self.guidance != 1.0


@dataclass
class Timings:
    text_encoder_s: float = 0.0
    steps_s: float = 0.0  # uploads of the plan and noise + the loop
    loop_s: float = 0.0  # the loop alone
    step_engine_s: list[float] = field(default_factory=list)
    decode_s: float = 0.0
    total_s: float = 0.0

    @property
    def host_overhead_per_step_s(self) -> float:
        """Loop time not spent inside the engine call, per step."""
        n = max(len(self.step_engine_s), 1)
        return max(self.loop_s - sum(self.step_engine_s), 0.0) / n

    def line(self) -> str:
        n = max(len(self.step_engine_s), 1)
        return (f"text encoder {self.text_encoder_s * 1e3:.1f} ms | steps {self.steps_s * 1e3:.1f} ms "
                f"({self.steps_s / n * 1e3:.2f} ms/step, host {self.host_overhead_per_step_s * 1e6:.0f} µs/step) | "
                f"decode {self.decode_s * 1e3:.1f} ms | total {self.total_s * 1e3:.1f} ms")


@dataclass
class Result:
    images: np.ndarray  # (B, H, W, 3) uint8
    config: GenerationConfig
    seeds: list[int]
    timings: Timings
    model_name: str

    def parameters(self, index: int) -> str:
        from sdrt.png import a1111_parameters

        return a1111_parameters(self.config, self.seeds[index], index, self.model_name)

    def pil_images(self) -> list[Any]:
        from PIL import Image

        out = []
        for i, array in enumerate(self.images):
            image = Image.fromarray(array, "RGB")
            image.info["parameters"] = self.parameters(i)
            out.append(image)
        return out


class Pipeline:
    """`Pipeline.load("engines/NAME")("a prompt", steps=20)` -> list of PIL images."""

    def __init__(self, engine_dir: Path, manifest: Manifest, backend: Backend, low_vram: bool = False):
        self.engine_dir = Path(engine_dir)
        self.manifest = manifest
        self.backend = backend
        self.low_vram = low_vram
        self.limits = backend.limits(manifest)
        self.schedule = NoiseSchedule.from_config(manifest.scheduler_config)
        self.tokenizer = ClipTokenizer(self.engine_dir / "tokenizer", manifest.model["text_max_length"])
        self._engines: dict[str, Engine] = {}
        self._buffers: dict[tuple, Any] = {}

    @classmethod
    def load(cls, engine_dir: str | Path, backend: str | Backend = "auto", verify: bool = True,
             low_vram: bool = False) -> "Pipeline":
        engine_dir = Path(engine_dir)
        manifest = read_manifest(engine_dir)
        chosen = select_backend(backend, manifest) if isinstance(backend, str) else backend
        if verify:
            chosen.verify(engine_dir, manifest)
        pipe = cls(engine_dir, manifest, chosen, low_vram=low_vram)
        if not low_vram:
            for name in COMPONENTS:
                pipe._engine(name)
        return pipe

    # --- engines and buffers ----------------------------------------------------------------

    def _engine(self, name: str) -> Engine:
        if name not in self._engines:
            if self.low_vram:  # only one engine resident
                for engine in self._engines.values():
                    engine.release()
                self._engines.clear()
            self._engines[name] = self.backend.load(self.engine_dir, self.manifest, name)
        return self._engines[name]

    def _buffer(self, key: str, shape: tuple[int, ...], dtype: str) -> Any:
        """Device buffers are allocated once per (key, shape) and reused."""
        full = (key, shape, dtype)
        if full not in self._buffers:
            self._buffers = {k: v for k, v in self._buffers.items() if k[0] != key}  # shape changed
            self._buffers[full] = self.backend.empty(shape, dtype)
        return self._buffers[full]

    def _write(self, key: str, array: np.ndarray) -> Any:
        """array copied into the reused buffer `key`."""
        buffer = self._buffer(key, array.shape, array.dtype.name)
        self.backend.write(buffer, array)
        return buffer

    # --- inputs -----------------------------------------------------------------------------

    def make_config(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                    steps: int = 25, guidance: float = 7.5, scheduler: str = "dpmpp_2m_karras",
                    seed: int | None = None, height: int | None = None, width: int | None = None,
                    batch: int = 1) -> GenerationConfig:
        limits = self.limits
        where = "the engines' range" if limits.kind == "onnx" else "the TensorRT plans' range; widen it with `sdrt build --shapes`"
        b_lo, _, b_hi = limits.batch
        if not is_integer(batch) or not b_lo <= batch <= b_hi:
            raise InputError(f"batch must be an integer from {b_lo} to {b_hi} ({where}), got {batch!r}")
        prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompt must be a string or a list of {batch} strings")
        negative = negative_prompt if negative_prompt is not None else ""
        negatives = [negative] * batch if isinstance(negative, str) else list(negative)
        if len(negatives) != batch or not all(isinstance(p, str) for p in negatives):
            raise InputError(f"negative_prompt must be a string or a list of {batch} strings")
        try:
            guidance = float(guidance)
        except (TypeError, ValueError):
            raise InputError(f"guidance must be a number, got {guidance!r}") from None
        if not math.isfinite(guidance):
            raise InputError(f"guidance must be finite, got {guidance}: use e.g. 7.5 (1.0 disables CFG)")
        check_sampler(scheduler, steps)
        height = limits.height[1] if height is None else height
        width = limits.width[1] if width is None else width
        for label, v, (lo, _, hi) in (("height", height, limits.height), ("width", width, limits.width)):
            if not is_integer(v) or v % 8 or not lo <= v <= hi:
                raise InputError(f"{label} must be a multiple of 8 from {lo} to {hi} ({where}), got {v!r}")
        if seed is None:
            seed = secrets.randbelow(SEED_MAX - batch)
        if not is_integer(seed) or not 0 <= seed <= SEED_MAX - batch:
            raise InputError(f"seed must be an integer from 0 to {SEED_MAX - batch}, got {seed!r}")
        return GenerationConfig(tuple(prompts), tuple(negatives), int(steps), guidance, scheduler, int(seed),
                                int(height), int(width))

    def __call__(self, prompt: str | list[str], **kwargs: Any) -> list[Any]:
        return self.generate(self.make_config(prompt, **kwargs)).pil_images()

    # --- generation -------------------------------------------------------------------------

    def initial_noise(self, config: GenerationConfig,
                      plan: SamplerPlan | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, 4, h, w) initial noise and (steps, B, 4, h, w) step noise (None if unused)."""
        plan = plan or make_plan(config.scheduler, self.schedule, config.steps)
        f = self.manifest.model["vae_scale_factor"]
        c = self.manifest.model["latent_channels"]
        shape = (c, config.height // f, config.width // f)
        init, step_noise = [], []
        for i in range(config.batch):
            rng = np.random.Generator(np.random.PCG64(config.seed + i))
            init.append(rng.standard_normal(shape, dtype=np.float32))
            if plan.uses_noise:
                step_noise.append(rng.standard_normal((len(plan),) + shape, dtype=np.float32))
        noise = np.stack(step_noise, axis=1) if plan.uses_noise else None
        return np.stack(init), noise

    def generate(self, config: GenerationConfig, latents: np.ndarray | None = None,
                 callback: Callable[[int, int], None] | None = None) -> Result:
        """Runs one generation. latents: optional (B, 4, h, w) initial noise (before σ_max scaling)."""
        start = time.perf_counter()
        timings = Timings()
        plan = make_plan(config.scheduler, self.schedule, config.steps)
        init, step_noise = self.initial_noise(config, plan)
        if latents is not None:
            if latents.shape != init.shape:
                raise InputError(f"latents must have shape {init.shape}, got {latents.shape}")
            init = latents.astype(np.float32)
        b = config.batch
        lat_shape = init.shape
        k = self.manifest.model["history"]
        te_dtype = self.manifest.components["denoise_step"].input("text_embeddings").dtype

        # text encoder: [negative; positive] in one call
        t0 = time.perf_counter()
        prompts = list(config.negative_prompt + config.prompt) if config.cfg else list(config.prompt)
        ids = self._write("input_ids", self.tokenizer(prompts))
        seq, hidden = self.manifest.model["text_max_length"], self.manifest.model["text_hidden_size"]
        embeddings = self._buffer("text_embeddings", (len(prompts), seq, hidden), te_dtype)
        self._engine("text_encoder").run({"input_ids": ids}, {"text_embeddings": embeddings})
        self.backend.synchronize()
        timings.text_encoder_s = time.perf_counter() - t0

        # everything the loop reads, written once into reused buffers; feeds bound per step by row
        t0 = time.perf_counter()
        n = len(plan)
        timesteps = self.backend.rows(self._write("timesteps", plan.timesteps.astype(np.float32).reshape(n, 1)))
        coeffs = self.backend.rows(self._write("step_coeffs", plan.coeffs.astype(np.float32)))
        guidance = self._write("guidance", np.array([config.guidance], np.float32))
        noise = self.backend.rows(self._write("noise", step_noise if step_noise is not None
                                              else np.zeros((1,) + lat_shape, np.float32)))
        sets = [{name: self._buffer(f"{name}{s}", shape, "float32") for name, shape in (
            ("latents", lat_shape), ("x_history", (k,) + lat_shape), ("out_history", (k,) + lat_shape))}
            for s in range(2)]  # ping-pong: step i reads set i % 2 and writes set (i + 1) % 2
        self.backend.write(sets[0]["latents"], init * np.float32(plan.init_noise_sigma))
        zeros = np.zeros((k,) + lat_shape, np.float32)  # 0 * uninitialized memory could be NaN
        self.backend.write(sets[0]["x_history"], zeros)
        self.backend.write(sets[0]["out_history"], zeros)
        feeds = []
        for i in range(n):
            src, dst = sets[i % 2], sets[(i + 1) % 2]
            feeds.append((
                {"latents": src["latents"], "timestep": timesteps[i], "text_embeddings": embeddings,
                 "guidance": guidance, "step_coeffs": coeffs[i], "x_history": src["x_history"],
                 "out_history": src["out_history"], "noise": noise[i if step_noise is not None else 0]},
                {"latents_next": dst["latents"], "x_history_next": dst["x_history"],
                 "out_history_next": dst["out_history"]}))
        step = self._engine("denoise_step")
        loop_start = time.perf_counter()
        for i, (inputs, outputs) in enumerate(feeds):
            step.run(inputs, outputs)
            timings.step_engine_s.append(step.last_run_s)
            if callback is not None:
                callback(i + 1, n)
        self.backend.synchronize()
        timings.loop_s = time.perf_counter() - loop_start
        timings.steps_s = time.perf_counter() - t0

        # decode to uint8 in the graph; one download
        t0 = time.perf_counter()
        images = self._buffer("images", (b, config.height, config.width, 3), "uint8")
        self._engine("vae_decoder").run({"latents": sets[n % 2]["latents"]}, {"images": images})
        host_images = self.backend.download(images).copy()
        timings.decode_s = time.perf_counter() - t0
        timings.total_s = time.perf_counter() - start
        seeds = [config.seed + i for i in range(b)]
        return Result(host_images, config, seeds, timings, self.manifest.name)
