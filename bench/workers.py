"""Bench workers: one process per backend, driven over a pipe by bench.run.

Each worker loads its backend, answers `run` requests with per-stage timings (seconds) and the
images, and reports its own peak host RSS and, on CUDA, its own peak device memory (NVML,
per process), so every backend is measured the same way.
"""

from __future__ import annotations

import resource
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sdrt.backends.onnxruntime import OrtBackend
from sdrt.control_request import crop_and_resize
from sdrt.export.controlnets import load_controlnet
from sdrt.export.components_io import model_index, present_slot
from sdrt.export.reference import diffusers_scheduler
from sdrt.families import DENOISER_FOLDERS, family_for
from sdrt.manifest import STEP, read_manifest
from sdrt.pipeline import Pipeline


@dataclass(frozen=True)
class Workload:
    model_dir: str
    engines: str
    height: int
    width: int
    steps: int
    guidance: float
    scheduler: str
    seed: int
    prompt: str = "a photograph of an astronaut riding a horse"
    negative_prompt: str = "blurry, low quality"
    skip_guidance_layers: tuple[int, ...] = ()  # SD 3.5's skip-layer guidance at diffusers' defaults; () none
    control_images: tuple[str, ...] = ()  # one hint per ControlNet of the engines, in export order; () none


def control_hints(w: Workload) -> list[Any]:
    """The workload's hints as RGB PIL images already at its size (crop-resized once, as sdrt does), so
    both sides get the same pixels: diffusers would stretch a hint of another aspect, not crop it."""
    from PIL import Image

    return [crop_and_resize(Image.open(p).convert("RGB"), w.width, w.height) for p in w.control_images]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class DeviceMemoryProbe:
    """Samples this process's GPU memory through NVML every 5 ms (CUDA context included).

    `peak` is None without a GPU or NVML, and also when NVML never lists this process (a container
    whose PID namespace hides it): no figure rather than a zero.
    """

    def __init__(self) -> None:
        self.peak_mb: float | None = None
        try:
            import os

            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle, self._pid = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), os.getpid()
        except Exception:  # no NVML: CPU machine
            self._nvml = None
            return
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if p.pid == self._pid and p.usedGpuMemory:
                    self.peak_mb = max(self.peak_mb or 0.0, p.usedGpuMemory / 2**20)
            time.sleep(0.005)


LOW_VRAM = "-low-vram"  # bench backend suffix: the same backend with Pipeline.load(low_vram=True)
PLAIN = "-plain"  # bench backend suffix: ONNX Runtime on the exported graphs, not `sdrt optimize`'s


class SdrtRunner:
    def __init__(self, workload: Workload, backend: str):
        self.w = workload
        low_vram, plain = backend.endswith(LOW_VRAM), backend.endswith(PLAIN)
        backend = backend.removesuffix(LOW_VRAM).removesuffix(PLAIN)
        self.pipe = Pipeline.load(workload.engines, backend=backend, low_vram=low_vram, optimized=not plain)
        backend = self.pipe.backend
        optimized = isinstance(backend, OrtBackend) and backend.graph(self.pipe.manifest, STEP) is not None
        self.name = backend.name + (" low-vram" if low_vram else "") + (" optimized" if optimized else "")
        self.hints = [np.asarray(h) for h in control_hints(workload)] or None

    def _config(self, batch: int) -> Any:
        w = self.w
        return self.pipe.make_config(w.prompt, negative_prompt=w.negative_prompt, steps=w.steps, guidance=w.guidance,
                                     scheduler=w.scheduler, seed=w.seed, height=w.height, width=w.width, batch=batch,
                                     skip_guidance_layers=list(w.skip_guidance_layers) or None,
                                     control_image=self.hints)

    def run(self, batch: int, latents: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
        r = self.pipe.generate(self._config(batch), latents=latents)
        t = r.timings
        return ({"text_encoder": t.text_encoder_s, "steps": t.steps_s, "step": t.steps_s / len(t.step_engine_s),
                 "decode": t.decode_s, "end_to_end": t.total_s,
                 "host_overhead_per_step": t.host_overhead_per_step_s}, r.images)


class TorchRunner:
    """The diffusers text-to-image pipeline of the model's family (its ControlNet pipeline, with the engines'
    ControlNets, when the workload has hints): fp16 on CUDA, fp32 on CPU, SDPA attention."""

    def __init__(self, workload: Workload, compile: bool = False, dtype: str | None = None):
        import inspect

        import diffusers
        import torch

        self.torch, self.w = torch, workload
        index = model_index(Path(workload.model_dir))
        family = family_for(index, workload.model_dir)
        pipeline = family.pipelines[0]  # the family's text-to-image pipeline
        self.denoiser = DENOISER_FOLDERS[family.denoiser]  # the pipeline's attribute: unet, transformer
        if index.get("_class_name") != pipeline:
            raise NotImplementedError(f"the torch baseline times text-to-image models ({pipeline}), not a "
                                      f"{index.get('_class_name')} folder; bench sdrt's own backends alone")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = getattr(torch, dtype) if dtype else (torch.float16 if self.device == "cuda" else torch.float32)
        cls = getattr(diffusers, pipeline)
        extra = ({"safety_checker": None, "requires_safety_checker": False}
                 if "safety_checker" in inspect.signature(cls.__init__).parameters else {})
        for slot in family.text_encoders:  # a folder without SD3's T5 loads with it set to None
            if not present_slot(index, Path(workload.model_dir), slot, ()):
                extra.update({slot.component: None, slot.tokenizer: None})
        pipe = cls.from_pretrained(workload.model_dir, torch_dtype=self.dtype, **extra)
        self.hints = control_hints(workload)
        if self.hints:
            pipe = self._with_controlnets(pipe, getattr(diffusers, family.controlnet_pipeline))

        pipe.scheduler = diffusers_scheduler(workload.scheduler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        self.name = "torch-compile" if compile else "torch"
        self.compile_s = 0.0
        denoiser = getattr(pipe, self.denoiser)
        if compile:
            denoiser.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            mode = "max-autotune" if self.device == "cuda" else "default"
            setattr(pipe, self.denoiser, torch.compile(denoiser, mode=mode, fullgraph=True))
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode)
        self._stamps: dict[str, float] = {}
        self._calls: dict[str, list[tuple[Any, tuple, dict]]] = {}  # this run's module calls
        self._calls_at: dict[int, dict[str, list[tuple[Any, tuple, dict]]]] = {}  # the last run's, per batch
        self._wrap()
        if compile:  # compile now (one generation at the workload's size), so it is reported apart
            start = time.perf_counter()
            self.run(1, np.random.default_rng(0).standard_normal(
                (1, pipe.vae.config.latent_channels, workload.height // 8, workload.width // 8)).astype(np.float32))
            self.compile_s = time.perf_counter() - start

    def _with_controlnets(self, pipe: Any, cls: Any) -> Any:
        """The same components in the family's ControlNet pipeline, with the engines' ControlNets (the
        folders or files they were exported from, as the manifest records them)."""
        import inspect

        sources = read_manifest(Path(self.w.engines)).source.get("controlnets", [])
        nets = [load_controlnet(Path(c["path"]), pipe.unet.config).to(self.dtype) for c in sources]
        accepted = inspect.signature(cls.__init__).parameters
        components = {k: v for k, v in pipe.components.items() if k in accepted}
        extra = {"requires_safety_checker": False} if "requires_safety_checker" in accepted else {}
        return cls(**components, **extra, controlnet=nets if len(nets) > 1 else nets[0])

    def _sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def _recorded(self, stage: str, fn: Any) -> Any:
        """fn, recording its calls (for flops) and nothing else: no sync, so the loop keeps its pace."""

        def recorded(*a: Any, **k: Any) -> Any:
            self._calls.setdefault(stage, []).append((fn, a, k))
            return fn(*a, **k)

        return recorded

    def _timed(self, stage: str, fn: Any) -> Any:
        """fn, recorded, its time added to stage; stamps f"{stage}_start/_end" of the last call."""
        fn_recorded = self._recorded(stage, fn)

        def timed(*a: Any, **k: Any) -> Any:
            self._sync()
            start = self._stamps[f"{stage}_start"] = time.perf_counter()
            out = fn_recorded(*a, **k)
            self._sync()
            end = self._stamps[f"{stage}_end"] = time.perf_counter()
            self._stamps[stage] = self._stamps.get(stage, 0.0) + end - start
            return out

        return timed

    def _wrap(self) -> None:
        pipe = self.pipe
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):  # SDXL has two, SD3 three; each runs
            module = getattr(pipe, name, None)  # for prompt and negative
            if module is not None:
                module.forward = self._timed("text_encoder", module.forward)
        denoiser = getattr(pipe, self.denoiser)
        denoiser.forward = self._recorded("unet", denoiser.forward)  # the steps are timed as one span
        if self.hints:  # one call per step, all ControlNets (diffusers' MultiControlNetModel)
            pipe.controlnet.forward = self._recorded("controlnet", pipe.controlnet.forward)
        pipe.vae.decode = self._timed("decode", pipe.vae.decode)

    def run(self, batch: int, latents: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
        torch, w = self.torch, self.w
        self._stamps, self._calls = {}, {}
        self._sync()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.pipe([w.prompt] * batch, negative_prompt=[w.negative_prompt] * batch,
                            num_inference_steps=w.steps, guidance_scale=w.guidance, height=w.height, width=w.width,
                            latents=torch.from_numpy(latents).to(self.device, self.dtype), output_type="np",
                            **({"skip_guidance_layers": list(w.skip_guidance_layers)} if w.skip_guidance_layers
                               else {}),
                            **({"image": self.hints if len(self.hints) > 1 else self.hints[0]} if self.hints
                               else {})).images
        self._sync()
        end = time.perf_counter()
        n = len(self.pipe.scheduler.timesteps)
        steps = self._stamps["decode_start"] - self._stamps["text_encoder_end"]
        images = (out * 255).round().astype(np.uint8)
        self._calls_at[batch] = self._calls
        return ({"text_encoder": self._stamps["text_encoder"], "steps": steps, "step": steps / n,
                 "decode": self._stamps["decode"], "end_to_end": end - start},
                images)

    def flops(self, batch: int) -> float:
        """FLOPs of one generation by torch's counter, replaying the last run at this batch: its text
        encoder and VAE decoder calls, and of its denoiser and ControlNet calls (2B rows with CFG; skip-layer
        guidance's B-row passes apart) the first of each kind times their number."""
        from torch.utils.flop_counter import FlopCounterMode

        calls = self._calls_at[batch]
        kinds: dict[bool, list[Any]] = {}
        for call in calls["unet"]:
            kinds.setdefault(bool(call[2].get("skip_layers")), []).append(call)
        stages = [(calls["text_encoder"], 1), (calls["decode"], 1)] + [(c[:1], len(c)) for c in kinds.values()]
        if calls.get("controlnet"):
            stages.append((calls["controlnet"][:1], len(calls["controlnet"])))
        total = 0.0
        with self.torch.inference_mode():
            for replays, times in stages:
                with FlopCounterMode(display=False) as counter:
                    for fn, a, k in replays:
                        fn(*a, **k)
                total += counter.get_total_flops() * times
        return float(total)

    def matmul_peak(self) -> float:
        """Measured dense matmul FLOP/s of this device in the baseline's dtype."""
        torch = self.torch
        n = 4096 if self.device == "cuda" else 1024
        a = torch.randn(n, n, device=self.device, dtype=self.dtype)
        b = torch.randn(n, n, device=self.device, dtype=self.dtype)
        for _ in range(3):
            a @ b
        self._sync()
        reps, start = 10 if self.device == "cpu" else 50, time.perf_counter()
        for _ in range(reps):
            a @ b
        self._sync()
        return 2 * n**3 * reps / (time.perf_counter() - start)


def worker_main(conn: Any, backend: str, workload: dict[str, Any], spawned_at: float) -> None:
    """Process entry point: load, then serve ('run', batch, latents) / ('info', batches) / ('stop',).

    Every answer is (kind, payload): ('ready', info), ('ok', payload) or ('error', traceback).
    """
    try:
        memory = DeviceMemoryProbe()
        w = Workload(**workload)
        load_start = time.perf_counter()
        if backend in ("torch", "torch-compile"):
            runner: Any = TorchRunner(w, compile=backend == "torch-compile")
        else:
            runner = SdrtRunner(w, backend)
        load_s = time.perf_counter() - load_start
        conn.send(("ready", {"name": runner.name, "load_s": load_s, "compile_s": getattr(runner, "compile_s", None)}))
        first_image_at: float | None = None
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "run":
                timings, images = runner.run(msg[1], msg[2])
                if first_image_at is None:
                    first_image_at = time.time()
                    timings["cold_start"] = first_image_at - spawned_at
                conn.send(("ok", (timings, images)))
            elif msg[0] == "info":
                info: dict[str, Any] = {"peak_rss_mb": _peak_rss_mb(), "peak_device_mb": memory.peak_mb}
                if isinstance(runner, TorchRunner):
                    info.update(flops={b: runner.flops(b) for b in msg[1]}, matmul_peak=runner.matmul_peak(),
                                device=runner.device, dtype=str(runner.dtype).removeprefix("torch."))
                conn.send(("ok", info))
    except Exception:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()

