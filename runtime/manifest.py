"""manifest.json: the contract between export (and build) and the runtime.

It names every component's I/O (one vocabulary: ONNX graph I/O, engine bindings and feeds share
names), the precision, the shape range, the source model's hash, library versions, validation
errors against PyTorch and the sha256 of every artifact. The runtime refuses a directory whose
manifest or checksums do not match, with a message that says how to rebuild.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdrt.errors import EngineError
from sdrt.families import BLEND, IMAGE_INPUTS, LAYOUTS, Conditioning, Defaults, TextEncoderSlot, control_image_names
from sdrt.paths import cache_dir, write_atomic

FORMAT = "sdrt-engines"
VERSION = 4  # 2: typed model contract (families, conditioning layouts) and typed plans; 3: images in;
#             4: prompts in 77-token chunks with token weights and clip skip
ENCODER, STEP, DECODER = "vae_encoder", "denoise_step", "vae_decoder"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int64, uint8
    shape: tuple[int | str, ...]  # ints are fixed, strings are symbolic (B, RB, N, S, h, w, H, W)

    def resolve(self, dims: dict[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class WeightSlot:
    """A weight a LoRA may change (a Linear's or Conv's), as the ONNX stores it: the initializer named
    after the module (`unet.down_blocks.0.attentions.0.proj_in.weight`), at `offset` in the .onnx.data."""

    offset: int  # bytes into the component's ONNX data file
    shape: tuple[int, ...]  # as stored
    dtype: str  # numpy name
    transposed: bool  # stored (in, out): a Linear the exporter turned into a MatMul
    original: str = ""  # the module's original-layout (openaimodel) path, for the U-Net's

    @property
    def module_shape(self) -> tuple[int, ...]:
        """The module's weight shape, (out, in[, kh, kw])."""
        return self.shape[::-1] if self.transposed else self.shape


@dataclass(frozen=True)
class ComponentSpec:
    onnx: str  # file name inside the engine directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = ""  # of the graph's weights and math ("fp16", "fp32"); may differ from the manifest's
    weights: dict[str, WeightSlot] = field(default_factory=dict)  # by initializer name: what LoRA can change
    # the adapted module's weights the graph does not hold: layers past the one read (SDXL's and SD 2.x's
    # text encoders read the penultimate), pruned by the exporter; a LoRA's layers there change nothing
    unused_weights: tuple[str, ...] = ()
    # the denoise step's ControlNets' parameters, every one (swapped whole: sdrt.controlnet_weights), by
    # initializer name `controlnets.J.<state key>`, original = cldm's key; and those the graph does not
    # hold as an initializer of their own (equal to another weight, or folded): a ControlNet with any
    # cannot be swapped
    control_weights: dict[str, WeightSlot] = field(default_factory=dict)
    control_unnamed: tuple[str, ...] = ()

    def slot(self, name: str) -> WeightSlot:
        """The weight `name`: a LoRA's or a ControlNet's."""
        return self.weights[name] if name in self.weights else self.control_weights[name]

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


def _slots(doc: dict[str, Any]) -> dict[str, WeightSlot]:
    return {k: WeightSlot(**{**w, "shape": tuple(w["shape"])}) for k, w in doc.items()}


@dataclass(frozen=True)
class ShapeRange:
    min_size: int
    default_size: int
    max_size: int
    max_batch: int
    max_chunks: int = 4  # prompt chunks of 75 tokens the step takes (S = 77 x chunks)


@dataclass(frozen=True)
class ShapeLimits:
    """What a set of engines accepts: (min, opt, max) of height and width in pixels and of the batch,
    and the most prompt chunks (75 tokens each; None: any number, memory permitting).

    `static` plans accept exactly one size and batch; the ONNX and `dynamic` plans a range.
    """

    kind: str  # "onnx" | "static" | "dynamic"
    height: tuple[int, int, int]
    width: tuple[int, int, int]
    batch: tuple[int, int, int]
    max_chunks: int | None

    @classmethod
    def of_onnx(cls, shapes: ShapeRange) -> ShapeLimits:
        """The graphs' sequence axis is dynamic: any number of chunks (shapes.max_chunks sizes the plans)."""
        size = (shapes.min_size, shapes.default_size, shapes.max_size)
        return cls("onnx", size, size, (1, 1, shapes.max_batch), None)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ShapeLimits:
        return cls(doc["kind"], tuple(doc["height"]), tuple(doc["width"]), tuple(doc["batch"]),  # type: ignore[arg-type]
                   doc["max_chunks"])


@dataclass(frozen=True)
class ModelInfo:
    """The model's contract with the runtime: its family's text encoders and conditioning, latent
    geometry, the sampler state the step graph keeps, and defaults."""

    family: str
    text_encoders: tuple[TextEncoderSlot, ...]
    conditioning: tuple[Conditioning, ...]  # the step's inputs besides the sampler state
    defaults: Defaults
    latent_channels: int
    vae_scale_factor: int
    scaling_factor: float
    history: int  # x/out steps the graph keeps
    opset: int
    zero_empty_negative: bool = False  # force_zeros_for_empty_prompt: an empty negative prompt encodes as zeros
    image_input: str = BLEND  # how the step takes an input image: families.BLEND or CONCAT (inpainting U-Net)
    clip_skip_max: int = 1  # the text encoder's layers where the family takes a clip skip, else 1
    size_multiple: int = 8  # image sides are multiples of this many pixels (a transformer's patch x the VAE's 8)
    omitted: tuple[str, ...] = ()  # the family's optional text encoders left out: zeros in their place (SD3's T5)
    shift_factor: float = 0.0  # the VAE's: latents = (z - shift_factor) * scaling_factor (in the VAE graphs)
    controlnets: tuple[str, ...] = ()  # the ControlNets in the denoise step, by name, in their inputs' order
    control_residuals: int = 0  # the residuals a ControlNet adds to the U-Net: its down blocks', then the mid's

    @property
    def components(self) -> tuple[str, ...]:
        """Every component, in the order a generation runs them."""
        return tuple(t.component for t in self.text_encoders) + (ENCODER, STEP, DECODER)

    @property
    def image_inputs(self) -> tuple[str, ...]:
        """The step's ROW-layout inputs that carry the input image and mask."""
        return IMAGE_INPUTS[self.image_input]

    @property
    def control_inputs(self) -> tuple[str, ...]:
        """The step's ROW-layout ControlNet hints (B, H, W, 3) uint8, one per ControlNet."""
        return control_image_names(len(self.controlnets))

    @property
    def needs_image(self) -> bool:
        """An inpainting U-Net: every generation needs an image and a mask."""
        return self.image_input != BLEND

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ModelInfo:
        conditioning = tuple(Conditioning(**{**c, "row_shape": tuple(c["row_shape"])}) for c in doc["conditioning"])
        bad = [c.layout for c in conditioning if c.layout not in LAYOUTS]
        if bad:
            raise ValueError(f"conditioning layouts {bad}")
        if doc.get("image_input", BLEND) not in IMAGE_INPUTS:
            raise ValueError(f"image_input {doc['image_input']!r}")
        return cls(**{**doc, "text_encoders": tuple(TextEncoderSlot(**t) for t in doc["text_encoders"]),
                      "conditioning": conditioning, "defaults": Defaults(**doc["defaults"]),
                      "omitted": tuple(doc.get("omitted", ())), "controlnets": tuple(doc.get("controlnets", ()))})


@dataclass(frozen=True)
class PlanRecord:
    """One TensorRT plan as `sdrt build` wrote it."""

    plan: str  # file name inside the engine directory
    bytes: int
    build_s: float
    io: tuple[dict[str, Any], ...]  # the parsed network's I/O: name, mode, dtype, shape
    onnx_sha256: str  # of the ONNX it was built from
    profile: dict[str, dict[str, list[int]]]  # input -> {"min", "opt", "max"} dims
    refittable: bool = False  # its LoRA weights (ComponentSpec.weights) can be refitted


@dataclass(frozen=True)
class PlanSet:
    """The TensorRT plans of an engine directory (`sdrt build`)."""

    flavour: str  # tensorrt | tensorrt_rtx
    version: str
    archs: tuple[str, ...]
    shapes: str  # the --shapes spelling
    limits: ShapeLimits
    components: dict[str, PlanRecord]

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> PlanSet:
        return cls(doc["flavour"], doc["version"], tuple(doc["archs"]), doc["shapes"],
                   ShapeLimits.from_dict(doc["limits"]),
                   {k: PlanRecord(**{**r, "io": tuple(r["io"])}) for k, r in doc["components"].items()})


@dataclass(frozen=True)
class OptimizedGraph:
    """One graph rewritten for an ONNX Runtime provider by `sdrt optimize` (sdrt.export.optimize)."""

    onnx: str  # file name inside the engine directory (its weights: the same name + ".data")
    model_type: str  # onnxruntime.transformers' name for the architecture
    fused: dict[str, int]  # fused op -> nodes
    unfused_attention: tuple[str, ...] = ()  # attention blocks (Softmax nodes) the optimizer left as they were
    lora_weights: bool = True  # every weight a LoRA may change is still its own initializer
    control_weights: bool = True  # so is every ControlNet parameter (ComponentSpec.control_weights)


@dataclass(frozen=True)
class Manifest:
    name: str
    precision: str
    components: dict[str, ComponentSpec]
    shapes: ShapeRange
    model: ModelInfo
    scheduler_config: dict[str, Any]
    files: dict[str, str]  # relative path -> sha256
    source: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    plans: PlanSet | None = None  # TensorRT plans, written by `sdrt build`
    optimized: dict[str, dict[str, OptimizedGraph]] = field(default_factory=dict)  # provider -> component -> graph

    @property
    def model_hash(self) -> str:
        """AUTOMATIC1111's short model hash: the first 10 hex digits of the source's sha256 (a checkpoint
        file's own; a diffusers folder's, over its files' hashes)."""
        return str(self.source.get("sha256", ""))[:10]

    @property
    def skippable_blocks(self) -> int:
        """The denoiser blocks skip-layer guidance may skip (the length of the step's `skip_layers`
        input); 0: these engines take none."""
        return next((t.shape[0] for t in self.components[STEP].inputs if t.name == "skip_layers"), 0)

    def to_json(self) -> str:
        doc = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return json.dumps(doc, indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Manifest:
        def spec(t: dict[str, Any]) -> TensorSpec:
            return TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))

        components = {
            name: ComponentSpec(c["onnx"], tuple(map(spec, c["inputs"])), tuple(map(spec, c["outputs"])),
                                c.get("precision", ""),
                                _slots(c.get("weights", {})), tuple(c.get("unused_weights", ())),
                                _slots(c.get("control_weights", {})), tuple(c.get("control_unnamed", ())))
            for name, c in doc["components"].items()
        }
        plans = doc.get("plans")
        return cls(
            name=doc["name"], precision=doc["precision"], components=components,
            shapes=ShapeRange(**doc["shapes"]), model=ModelInfo.from_dict(doc["model"]),
            scheduler_config=doc["scheduler_config"], files=doc["files"], source=doc.get("source", {}),
            versions=doc.get("versions", {}), validation=doc.get("validation", {}),
            plans=PlanSet.from_dict(plans) if plans else None,
            optimized={provider: {name: OptimizedGraph(**{**g, "unfused_attention": tuple(g["unfused_attention"])})
                                  for name, g in graphs.items()}
                       for provider, graphs in doc.get("optimized", {}).items()},
        )


def rebuild_hint(engine_dir: Path) -> str:
    return f"re-export it: `sdrt export MODEL_DIR -o {engine_dir}` (then `sdrt build {engine_dir}` for TensorRT)"


def read_manifest(engine_dir: Path) -> Manifest:
    """Parses and checks the structure of engine_dir/manifest.json (not the checksums)."""
    engine_dir = Path(engine_dir)
    path = engine_dir / "manifest.json"
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir} is not an engine directory: export one with `sdrt export MODEL_DIR -o {engine_dir}`")
    if not path.is_file():
        raise EngineError(f"{path} is missing: {rebuild_hint(engine_dir)}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}): {rebuild_hint(engine_dir)}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise EngineError(f"{path} is not an sdrt manifest: {rebuild_hint(engine_dir)}")
    if doc.get("version") != VERSION:
        raise EngineError(
            f"{path} has manifest version {doc.get('version')}, this sdrt reads {VERSION}: {rebuild_hint(engine_dir)}"
        )
    try:
        manifest = Manifest.from_dict(doc)
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise EngineError(f"{path} is malformed (missing {e}): {rebuild_hint(engine_dir)}") from e
    missing = [c for c in manifest.model.components if c not in manifest.components]
    if missing:
        raise EngineError(f"{path} lacks components {missing}: {rebuild_hint(engine_dir)}")
    return manifest


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verified_stamp(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"


def verify_files(engine_dir: Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Checks the sha256 of the listed artifacts (all by default).

    Hashing a 1.7 GB U-Net costs seconds, so a verified (path, size, mtime, inode) is remembered in
    the cache; any change to the file re-hashes it.
    """
    engine_dir = Path(engine_dir)
    stamps_path = cache_dir("verified") / "stamps.json"
    try:
        stamps: dict[str, str] = json.loads(stamps_path.read_text())
    except (OSError, json.JSONDecodeError):
        stamps = {}
    changed = False
    for rel in names if names is not None else list(manifest.files):
        expected = manifest.files.get(rel)
        path = engine_dir / rel
        if expected is None or not path.is_file():
            raise EngineError(f"{path} is missing: {rebuild_hint(engine_dir)}")
        stamp = _verified_stamp(path)
        if stamps.get(stamp) == expected:
            continue
        actual = sha256_file(path)
        if actual != expected:
            raise EngineError(
                f"{path} does not match its sha256 in manifest.json (corrupted or replaced): {rebuild_hint(engine_dir)}"
            )
        stamps[stamp] = actual
        changed = True
    if changed:
        write_atomic(stamps_path, json.dumps(stamps))


def write_manifest(engine_dir: Path, manifest: Manifest) -> None:
    """Writes manifest.json through a temporary file and an atomic rename."""
    write_atomic(Path(engine_dir) / "manifest.json", manifest.to_json())
