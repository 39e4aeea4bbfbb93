"""`sdrt` command line. A subcommand that needs an optional dependency (export and bench: torch and
diffusers; serve: FastAPI; --replicas: ray) imports its module only when it runs, so `generate`
never loads torch."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

from sdrt.backends import BACKENDS
from sdrt.errors import InputError, SdrtError
from sdrt.manifest import read_manifest
from sdrt.pipeline import Pipeline
from sdrt.png import save_png
from sdrt.request import CONTROL_MODES, INPAINTING_FILLS, RESIZE_MODES, ImageInput, SkipLayers
from sdrt.schedulers import SAMPLERS
from sdrt.upscale import UPSCALERS
from sdrt.serve.config import ServeConfig

EMBEDDINGS_HELP = ("folder of textual-inversion embeddings (A1111's embeddings/: .safetensors, .pt, .bin); a file's "
                   "name used in a prompt stands for its vectors")


def _testmodel(args: argparse.Namespace) -> None:
    from sdrt.export.testmodel import build_test_model, write_test_controlnet_as  # torch, diffusers (export extra)

    if args.kind == "controlnet":
        if not args.of:
            raise InputError("testmodel controlnet: pass --of MODEL_DIR, the diffusers folder whose U-Net it guides")
        out = write_test_controlnet_as(Path(args.of), Path(args.out_dir), seed=args.seed)
    elif args.of:
        raise InputError("--of is for `sdrt testmodel controlnet`")
    else:
        out = build_test_model(args.kind, Path(args.out_dir), seed=args.seed)
    print(f"wrote {args.kind} test model to {out}")


def _train_demo(args: argparse.Namespace) -> None:
    from sdrt.export.demo_model import TrainConfig, train_demo  # torch, diffusers (the export extra)

    given = {"seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps}
    config = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    print(f"trained the demo model into {train_demo(Path(args.out_dir), config)} (loss curve: loss.png)")


def _export(args: argparse.Namespace) -> None:
    from sdrt.export.exporter import ExportConfig, export  # torch, diffusers (the export extra)

    config = ExportConfig(Path(args.model_dir), Path(args.output), precision=args.precision,
                          max_batch=args.max_batch, validate=not args.no_validate, force=args.force,
                          min_size=args.min_size, max_size=args.max_size, max_chunks=args.max_chunks,
                          vae=Path(args.vae) if args.vae else None, variant=args.variant,
                          config_dir=Path(args.config) if args.config else None, prediction_type=args.prediction_type,
                          text_encoders_dir=Path(args.text_encoders) if args.text_encoders else None,
                          drop=("text_encoder_3",) if args.no_t5 else (), max_sequence_length=args.max_sequence_length,
                          controlnets=tuple(Path(p) for p in args.controlnet))
    manifest = export(config)
    print(f"exported {manifest.name} ({manifest.precision}) to {args.output}")
    for name, report in manifest.validation.items():
        print(f"  {name:13s} error vs PyTorch {report['error']:.3g} (tolerance {report['tolerance']:g})")


def _build(args: argparse.Namespace) -> None:
    from sdrt.export.build import BuildConfig, build  # sdrt.export: only its subcommands import it

    archs = tuple(a for a in (args.arch or "").split(",") if a)
    manifest = build(BuildConfig(Path(args.engines), shapes=args.shapes, archs=archs, flavour=args.flavour,
                                 optimization_level=args.optimization_level, refit=args.refit,
                                 skip_layer_guidance=args.skip_layer_guidance))
    plans = manifest.plans
    assert plans is not None  # build() records them
    print(f"built {plans.flavour} {plans.version} plans for {', '.join(plans.archs)} ({plans.shapes}) "
          f"in {args.engines}")
    for name, record in plans.components.items():
        print(f"  {name:15s} {record.bytes / 2**20:8.1f} MiB  {record.build_s:7.1f} s")


def _optimize(args: argparse.Namespace) -> None:
    from sdrt.export.optimize import OptimizeConfig, optimize  # onnx and onnxruntime's optimizer tools

    manifest = optimize(OptimizeConfig(Path(args.engines), args.provider))
    print(f"optimized {manifest.name} for ONNX Runtime's {args.provider} provider in {args.engines}")
    for name, graph in manifest.optimized[args.provider].items():
        fused = ", ".join(f"{op} {n}" for op, n in graph.fused.items()) or "nothing fused"
        print(f"  {name:15s} {graph.onnx}: {fused}")
        if graph.unfused_attention:
            print(f"  {'':15s} attention left unfused: {', '.join(graph.unfused_attention)}")


def _lora_arg(text: str) -> tuple[str, float]:
    """FILE[:WEIGHT] -> (FILE, WEIGHT); a colon not followed by a number belongs to the path."""
    path, _, weight = text.rpartition(":")
    try:
        return (path, float(weight)) if path else (text, 1.0)
    except ValueError:
        return text, 1.0


def _int_list(text: str) -> list[int]:
    """"7,8,9" -> [7, 8, 9]."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, e.g. 7,8,9, got {text!r}") from None


def _hires_args(args: argparse.Namespace) -> dict[str, Any]:
    """make_config's hires fix keywords: none unless --hires-scale or --hires-size is given."""
    if args.hires_scale is None and args.hires_size is None:
        return {}
    width, height = args.hires_size or (0, 0)
    return dict(enable_hr=True, hr_scale=args.hires_scale or 2.0, hr_resize_x=width, hr_resize_y=height,
                hr_upscaler=args.hires_upscaler, hr_second_pass_steps=args.hires_steps,
                denoising_strength=args.hires_strength, hr_prompt=args.hires_prompt,
                hr_negative_prompt=args.hires_negative, hr_sampler=args.hires_scheduler)


def _add_hires(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("hires fix (A1111's): text-to-image, the upscale, then img2img at the larger size")
    group.add_argument("--hires-scale", type=float, default=None, help="turn it on: the second pass is this much larger")
    group.add_argument("--hires-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                       help="turn it on at this size instead (0 for one side keeps the aspect)")
    group.add_argument("--hires-upscaler", choices=list(UPSCALERS), default=None, help="default: Latent")
    group.add_argument("--hires-steps", type=int, default=0, help="the second pass's steps (0: --steps)")
    group.add_argument("--hires-strength", type=float, default=None, help="its denoising strength (default 0.7)")
    group.add_argument("--hires-prompt", default=None, help="default: the prompt")
    group.add_argument("--hires-negative", default=None, help="default: --negative")
    group.add_argument("--hires-scheduler", choices=list(SAMPLERS), default=None, help="default: --scheduler")


def _control_args(args: argparse.Namespace) -> dict[str, Any]:
    """make_config's ControlNet keywords: one hint per --control-image (in export order); a setting given once
    applies to every hint, else one per hint."""
    hints = [_read_file(path, "--control-image") for path in args.control_image]

    def one_or_each(values: list[Any]) -> Any:
        return None if not values else values[0] if len(values) == 1 else values

    # without a hint, settings still go in: make_config refuses them, naming --control-image
    return dict(control_image=hints if len(hints) > 1 else hints[0] if hints else None,
                controlnet_model=_controlnet_models(args.controlnet_model),
                controlnet_conditioning_scale=one_or_each(args.control_scale),
                control_guidance_start=one_or_each(args.control_start),
                control_guidance_end=one_or_each(args.control_end),
                control_mode=one_or_each(args.control_mode),
                control_resize_mode=one_or_each(args.control_resize_mode))


def _controlnet_models(values: list[str]) -> Any:
    """--controlnet-model [NAME=]PATH: by the exported ControlNet's name, else in export order."""
    if not values:
        return None
    named = [v.partition("=") for v in values]
    if all(sep and not Path(v).exists() for v, (_, sep, _) in zip(values, named)):
        return {name: path for name, _, path in named}
    if any(sep and not Path(v).exists() for v, (_, sep, _) in zip(values, named)):
        raise InputError("--controlnet-model: give every one as NAME=PATH, or every one as PATH in export order")
    return values


def _add_control(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("ControlNet (engines exported with --controlnet)")
    group.add_argument("--control-image", action="append", default=[], metavar="HINT",
                       help="a ControlNet's hint (an edge map, pose, depth image), repeated in export order")
    group.add_argument("--control-scale", action="append", type=float, default=[],
                       help="its conditioning scale (default 1; once for all, or once per hint)")
    group.add_argument("--control-start", action="append", type=float, default=[],
                       help="where its guidance starts, a fraction of the steps (default 0)")
    group.add_argument("--control-end", action="append", type=float, default=[],
                       help="where its guidance ends (default 1)")
    group.add_argument("--control-resize-mode", action="append", choices=list(RESIZE_MODES), default=[],
                       help="how a hint of another size is fitted (sd-webui-controlnet's; default Crop and Resize)")
    group.add_argument("--controlnet-model", action="append", default=[], metavar="[NAME=]PATH",
                       help="run another ControlNet of the same architecture (a file or a diffusers folder) in the "
                            "place of the exported one NAME (default: in export order); no re-export")
    group.add_argument("--control-mode", action="append", choices=list(CONTROL_MODES), default=[],
                       help="balanced (default); prompt / control: sd-webui-controlnet's 'My prompt is more "
                            "important' / 'ControlNet is more important'; guess: diffusers' guess mode")


def _generate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    image, mask = (_read_file(path, flag) for path, flag in ((args.image, "--image"), (args.mask, "--mask")))
    pipe = Pipeline.load(args.engines, backend=args.backend, low_vram=args.low_vram, lora_dir=args.lora_dir,
                         optimized=not args.no_optimized, embeddings_dir=args.embeddings_dir)
    config = pipe.make_config(args.prompt, negative_prompt=args.negative, steps=args.steps,
                              guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                              height=args.height, width=args.width, batch=args.batch,
                              original_size=args.original_size, crop_top_left=args.crop_top_left,
                              target_size=args.target_size, image=image, mask_image=mask, strength=args.strength,
                              mask_blur=args.mask_blur, inpainting_fill=args.inpainting_fill,
                              inpainting_mask_invert=args.invert_mask, clip_skip=args.clip_skip,
                              loras=[_lora_arg(text) for text in args.lora],
                              skip_guidance_layers=args.skip_guidance_layers,
                              skip_layer_guidance_scale=args.skip_layer_guidance_scale,
                              skip_layer_guidance_start=args.skip_layer_guidance_start,
                              skip_layer_guidance_stop=args.skip_layer_guidance_stop, **_hires_args(args),
                              **_control_args(args))
    with tqdm(total=None, desc="denoise", unit="step", leave=False) as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        result = pipe.generate(config, callback=progress)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if config.batch == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(config.batch)]
    for path, image, i in zip(paths, result.pil_images(), range(config.batch)):
        save_png(image, path, result.parameters(i))
    strength = f" (strength {config.image.strength:g})" if config.image.images else ""
    if config.hires.enabled:
        hires = config.hires
        strength = f" + hires fix to {hires.size.width}x{hires.size.height} ({hires.upscaler}, strength {hires.strength:g})"
    print(f"backend {pipe.backend.describe()} | {config.mode}{strength} | {config.size.width}x{config.size.height} | "
          f"{config.sampler.scheduler} {config.sampler.steps} steps | seed {config.sampler.seed}")
    print(result.timings.line())
    for path in paths:
        print(f"wrote {path}")


def _read_file(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"{flag} {path}: {e.strerror or e}") from None


def _bench(args: argparse.Namespace) -> None:
    import shlex

    from sdrt.bench.run import BenchConfig, run_bench, write_results  # sdrt.bench: torch, diffusers baselines
    from sdrt.bench.workers import Workload

    scheduler = args.scheduler or read_manifest(Path(args.engines)).model.defaults.sampler
    workload = Workload(model_dir=args.model_dir, engines=args.engines, height=args.height, width=args.width,
                        steps=args.steps, guidance=args.guidance, scheduler=scheduler, seed=args.seed,
                        skip_guidance_layers=tuple(args.skip_guidance_layers or ()),
                        control_images=tuple(args.control_image))
    config = BenchConfig(workload, tuple(args.backends.split(",")), tuple(int(b) for b in args.batch.split(",")),
                         runs=args.runs, warmup=args.warmup, output=Path(args.output), one_at_a_time=args.one_at_a_time,
                         command="sdrt " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    json_path, table_path, *plots = write_results(run_bench(config), config.output)
    for path in (json_path, table_path, *plots):
        print(f"wrote {path}")
    print(table_path.read_text())


def _serve(args: argparse.Namespace) -> None:
    try:
        from sdrt.serve.app import serve  # FastAPI, uvicorn (the serve extra)
    except ImportError as e:
        raise SdrtError(f"sdrt serve needs its extra: pip install 'sdrt[serve]' ({e})") from e

    read_manifest(Path(args.engines))  # a wrong path fails here, not after the server is up
    token = ServeConfig.resolve_token(args.token, args.no_auth, args.host)
    config = ServeConfig(Path(args.engines).resolve(), host=args.host, port=args.port, token=token,
                         backend=args.backend, max_queue=args.max_queue, max_batch=args.max_batch,
                         batch_window_s=args.batch_window_ms / 1e3, request_timeout_s=args.timeout,
                         max_steps=args.max_steps, max_size=args.max_size, shutdown_drain_s=args.drain,
                         lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir,
                         controlnet_dir=args.controlnet_dir)
    autoscaling = args.min_replicas is not None or args.max_replicas is not None
    if args.replicas is None and not autoscaling and args.ray_address is None:
        serve(config)  # the embedded single-process server: Ray is never imported
        return
    if args.replicas is not None and autoscaling:
        raise InputError("--replicas is a fixed count: drop it to autoscale between --min-replicas and --max-replicas")
    try:
        importlib.import_module("ray.serve")
        from sdrt.serve.ray import RayConfig, serve_forever  # ray (the ray extra)
    except ImportError as e:
        raise SdrtError(f"--replicas runs on Ray Serve: pip install 'sdrt[ray]' ({e})") from e
    low = args.min_replicas or 1
    serve_forever(config, RayConfig(replicas=None if autoscaling else (args.replicas or 1), min_replicas=low,
                                    max_replicas=args.max_replicas or low, address=args.ray_address))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdrt", description="Stable Diffusion on exported engines")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_testmodel, _add_train_demo, _add_export, _add_build, _add_optimize, _add_generate, _add_serve,
                _add_bench):
        add(sub)
    return parser


def _add_testmodel(sub: Any) -> None:
    p = sub.add_parser("testmodel", help="write a random-weight diffusers folder, or single file (offline)")
    p.add_argument("kind", choices=["tiny", "tiny-inpaint", "tiny-plain", "sd15", "tiny-sdxl", "tiny-sdxl-plain", "sdxl",
                                    "tiny-sd3", "tiny-sd3-no-t5", "sd35m", "controlnet"],
                   help="tiny*: seconds on a CPU; sd15, sdxl, sd35m (SD 3.5 Medium without T5): the real "
                        "architectures with random weights; controlnet: a random ControlNet for --of's U-Net")
    p.add_argument("out_dir", help="a new folder, or FILE.safetensors for one checkpoint in the original layout "
                                   "(a ControlNet: in lllyasviel's cldm layout)")
    p.add_argument("--of", default=None, metavar="MODEL_DIR", help="controlnet: the diffusers folder it guides")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_testmodel)


def _add_train_demo(sub: Any) -> None:
    p = sub.add_parser("train-demo", help="train the demo model (shapes in colours, 64x64) on this CPU")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--vae-steps", type=int, default=None, help="default 1200")
    p.add_argument("--unet-steps", type=int, default=None, help="default 4000")
    p.set_defaults(func=_train_demo)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export an SD 1.x / 2.x / XL diffusers folder or single file to ONNX engines")
    p.add_argument("model_dir", help="a diffusers folder, or a .safetensors / .ckpt checkpoint in the original layout")
    p.add_argument("-o", "--output", required=True, help="engine directory, e.g. engines/sd15")
    p.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--min-size", type=int, default=64)
    p.add_argument("--max-size", type=int, default=None)
    p.add_argument("--max-chunks", type=int, default=4,
                   help="longest prompt, in chunks of 75 tokens (default 4: 300 tokens)")
    p.add_argument("--vae", default=None,
                   help="a VAE file (original layout) or diffusers AutoencoderKL folder to use instead of the model's")
    p.add_argument("--config", default=None,
                   help="single files: a diffusers folder whose configs and tokenizers fit the checkpoint "
                        "(default: sdrt's own for SD 1.x, 2.x, XL and, without T5, SD 3 / 3.5)")
    p.add_argument("--text-encoders", default=None, metavar="DIR",
                   help="SD 3 single files shipped without text encoders: Stability's text_encoders/ folder "
                        "(clip_l, clip_g, t5xxl .safetensors)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                   help="single files: what the U-Net predicts (default: detected)")
    p.add_argument("--variant", default=None, help="load weights saved as this variant (e.g. fp16)")
    p.add_argument("--no-t5", action="store_true",
                   help="SD3: leave T5-XXL out (zeros in its place, as diffusers with text_encoder_3=None)")
    p.add_argument("--max-sequence-length", type=int, default=256,
                   help="SD3: T5 tokens a prompt may take, 1-512 (diffusers' default 256)")
    p.add_argument("--controlnet", action="append", default=[], metavar="DIR|FILE",
                   help="a ControlNet to run in the denoise step: a diffusers ControlNetModel folder or a single "
                        "file (control_v11p_sd15_canny.safetensors); repeat for several, generate's "
                        "--control-image hints follow this order")
    p.add_argument("--no-validate", action="store_true", help="skip the check against PyTorch")
    p.add_argument("--force", action="store_true", help="replace an existing engine directory")
    p.set_defaults(func=_export)


def _add_build(sub: Any) -> None:
    p = sub.add_parser("build", help="build TensorRT plans from an exported engine directory")
    p.add_argument("engines", help="engine directory made by `sdrt export`")
    p.add_argument("--shapes", default=None,
                   help="static:WxH,batch=N or dynamic:MIN-MAX,batch=A-B (default: static, model size, batch 1)")
    p.add_argument("--arch", default=None,
                   help="comma list, e.g. sm86,sm89 (TensorRT-RTX; default: this GPU, or every RTX arch without one)")
    p.add_argument("--flavour", choices=["auto", "tensorrt", "tensorrt_rtx"], default="auto",
                   help="auto prefers full TensorRT when both are installed")
    p.add_argument("--optimization-level", type=int, choices=range(6), default=None,
                   help="TensorRT builder optimization level (default 3; higher builds slower, may run faster)")
    p.add_argument("--skip-layer-guidance", action=argparse.BooleanOptionalAction, default=None,
                   help="SD 3.5: profile the denoise step for skip-layer guidance's 3 rows per image (default: "
                        "where the engines take it; without, an SLG call takes 2/3 of the plans' largest batch)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="LoRA weights refittable, so LoRAs switch without a rebuild (default: when building on a GPU; "
                        "TensorRT-RTX cannot build them without one)")
    p.set_defaults(func=_build)


def _add_optimize(sub: Any) -> None:
    p = sub.add_parser("optimize", help="write ONNX Runtime-optimized graphs (fused attention, NHWC GroupNorm, ...)")
    p.add_argument("engines", help="engine directory made by `sdrt export` (fp16 ones for cuda only)")
    p.add_argument("--provider", choices=["cuda", "cpu"], default="cuda",
                   help="the execution provider the graphs are for: cuda adds the fusions with CUDA kernels only")
    p.set_defaults(func=_optimize)


def _add_generate(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate images from an engine directory")
    p.add_argument("engines")
    p.add_argument("prompt")
    p.add_argument("--negative", default=None,
                   help="negative prompt; left out: none (SDXL's zeros), as diffusers' negative_prompt=None; "
                        "'' encodes the empty string")
    p.add_argument("--steps", type=int, default=None, help="default: the model family's (sd1 25, sdxl 30, sd3 28)")
    p.add_argument("--guidance", type=float, default=None,
                   help="default: the family's (sd1 7.5, sdxl 5, sd3 7); <= 1: no CFG")
    p.add_argument("--scheduler", choices=list(SAMPLERS), default=None,
                   help="default: the family's (dpmpp_2m_karras; euler for sd3, the only flow-matching sampler)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--original-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="SDXL micro-conditioning (default: the image size)")
    p.add_argument("--crop-top-left", type=int, nargs=2, default=None, metavar=("TOP", "LEFT"))
    p.add_argument("--target-size", type=int, nargs=2, default=None, metavar=("H", "W"))
    p.add_argument("--image", default=None, help="img2img: start from this image (the size defaults to its own, "
                   "rounded down to a multiple of 8)")
    p.add_argument("--mask", default=None, help="inpainting: white repaints, black keeps (needs --image)")
    p.add_argument("--strength", type=float, default=None,
                   help="share of the steps that run from the image, (0, 1] (default 0.75; 1 for inpainting models)")
    p.add_argument("--mask-blur", type=int, default=ImageInput.mask_blur, help="pixels of blur where the original is put back")
    p.add_argument("--inpainting-fill", choices=list(INPAINTING_FILLS.values()),
                   default=ImageInput.inpainting_fill,
                   help="what the masked area starts from")
    p.add_argument("--invert-mask", action="store_true", help="black repaints, white keeps")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="A1111's clip skip: 2 conditions on CLIP's penultimate layer (SD 1.x/2.x; default 1)")
    p.add_argument("--skip-guidance-layers", type=_int_list, default=None, metavar="I,J,...",
                   help="SD 3.5's skip-layer guidance: transformer blocks to skip (Medium: 7,8,9); with CFG")
    p.add_argument("--skip-layer-guidance-scale", type=float, default=SkipLayers.scale,
                   help=f"its scale (default {SkipLayers.scale})")
    p.add_argument("--skip-layer-guidance-start", type=float, default=SkipLayers.start,
                   help=f"the share of the steps where it starts (default {SkipLayers.start})")
    p.add_argument("--skip-layer-guidance-stop", type=float, default=SkipLayers.stop,
                   help=f"the share of the steps where it stops (default {SkipLayers.stop})")
    p.add_argument("--backend", choices=list(BACKENDS), default="auto")
    p.add_argument("--low-vram", action="store_true", help="keep one engine resident at a time")
    p.add_argument("--no-optimized", action="store_true",
                   help="ONNX Runtime: run the exported graphs even where `sdrt optimize` wrote optimized ones")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="apply a LoRA (.safetensors, kohya or diffusers) at WEIGHT (default 1); repeatable")
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="folder where the prompt's <lora:NAME:WEIGHT> tags find NAME.safetensors")
    p.add_argument("--embeddings-dir", type=Path, default=None, help=EMBEDDINGS_HELP)
    p.add_argument("-o", "--output", default="out.png")
    _add_hires(p)
    _add_control(p)
    p.set_defaults(func=_generate)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the A1111 and OpenAI image APIs over HTTP")
    p.add_argument("engines")
    p.add_argument("--host", default=ServeConfig.host, help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=ServeConfig.port)
    p.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' (or env SDRT_TOKEN)")
    p.add_argument("--no-auth", action="store_true", help="serve without a token beyond loopback (never implied)")
    p.add_argument("--backend", choices=list(BACKENDS), default="auto")
    p.add_argument("--max-queue", type=int, default=ServeConfig.max_queue, help="queued images before 429")
    p.add_argument("--max-batch", type=int, default=None, help="images per engine call (1 disables batching)")
    p.add_argument("--batch-window-ms", type=float, default=ServeConfig.batch_window_s * 1e3, help="wait for requests to share a call")
    p.add_argument("--timeout", type=float, default=ServeConfig.request_timeout_s, help="per-request timeout in seconds (then 504)")
    p.add_argument("--max-steps", type=int, default=ServeConfig.max_steps)
    p.add_argument("--max-size", type=int, default=None, help="cap on width/height below the engines' limit")
    p.add_argument("--lora-dir", type=Path, default=None,
                   help="folder of LoRA .safetensors files that prompts name as <lora:NAME:WEIGHT> (A1111's)")
    p.add_argument("--embeddings-dir", type=Path, default=None, help=EMBEDDINGS_HELP)
    p.add_argument("--controlnet-dir", type=Path, default=None,
                   help="folder of ControlNets (files, diffusers folders) that A1111 units may name besides the "
                        "engines' own; each runs in a ControlNet slot of the same architecture, no re-export")
    p.add_argument("--drain", type=float, default=ServeConfig.shutdown_drain_s,
                   help="on SIGTERM/SIGINT, seconds queued work may still run; what is left then gets 503")
    p.add_argument("--replicas", type=int, default=None,
                   help="run N replicas on Ray Serve (sdrt[ray]), one GPU each where the cluster has GPUs")
    p.add_argument("--min-replicas", type=int, default=None, help="Ray Serve autoscaling on queue length: lower bound")
    p.add_argument("--max-replicas", type=int, default=None, help="Ray Serve autoscaling: upper bound")
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster ('auto', 'ray://HOST:10001'); default: start a local one")
    p.set_defaults(func=_serve)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser("bench", help="sdrt against the diffusers baselines, side by side")
    p.add_argument("model_dir", help="the diffusers folder the engines were exported from")
    p.add_argument("--engines", required=True, help="engine directory exported from model_dir")
    p.add_argument("--backends", default="torch,ort", help="comma list of torch,torch-compile,ort,trt,ort-low-vram,trt-low-vram")
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", choices=list(SAMPLERS), default=None,
                   help="default: the family's (dpmpp_2m_karras; euler for sd3)")
    p.add_argument("--batch", default="1", help="comma list of batch sizes, e.g. 1,2,4")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--one-at-a-time", action="store_true",
                   help="run each backend alone, one after another (when they do not fit in memory together)")
    p.add_argument("--skip-guidance-layers", type=_int_list, default=None, metavar="I,J,...",
                   help="SD 3.5: skip-layer guidance on these blocks at diffusers' defaults, every backend")
    p.add_argument("--control-image", action="append", default=[], metavar="HINT",
                   help="engines with ControlNets: one hint per ControlNet, in export order; torch then runs "
                        "diffusers' ControlNet pipeline with the same ControlNets, at scale 1")
    p.add_argument("-o", "--output", default="bench/results/local")
    p.set_defaults(func=_bench)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # type: ignore[assignment]
    try:
        args.func(args)
    except SdrtError as e:
        print(f"sdrt: error: {e}", file=sys.stderr)
        return 2
    except NotImplementedError as e:
        print(f"sdrt: not implemented: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("sdrt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
