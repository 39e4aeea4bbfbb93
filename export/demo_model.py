"""The demo model: a tiny SD 1.x trained here, on a CPU, in minutes, on pictures it draws itself.

    sdrt train-demo demo/model      # ~23 min on 2 cores; seeded

Pictures: one shape (circle, square, triangle) in one colour (red, green, blue, yellow) on a white or
black background, 64 x 64, captioned "a red circle on a white background". Three stages, all with
the SD 1.x recipe at toy size:
1. the VAE (AutoencoderKL, 8x down to 8 x 8 x 4 latents): reconstruction MSE + a small KL term; its
   scaling_factor is then 1 / std of the training latents, as SD's was chosen;
2. the latents of a fixed pool of pictures, encoded once (posterior means);
3. CLIP text encoder and U-Net together: ε-prediction on SD 1.5's noise schedule, the caption
   dropped 10 % of the time so classifier-free guidance has an unconditional model to push from.
The folder is a diffusers StableDiffusionPipeline with a CLIP BPE tokenizer, like any SD 1.x; the
loss curve is written beside it (loss.json, loss.png).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdrt.errors import InputError
from sdrt.export.bpe import BOS, EOS, write_clip_bpe
from sdrt.export.architectures import SD15_SCHEDULER_CONFIG
from sdrt.pipeline import Pipeline
from sdrt.png import save_png

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 210, 30)}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")

UNET = dict(sample_size=SIZE // 8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8)
VAE = dict(sample_size=SIZE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
           down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4)
TEXT_ENCODER = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
                    max_position_embeddings=77, projection_dim=64, hidden_act="quick_gelu")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_steps: int = 1200
    vae_batch: int = 16
    unet_steps: int = 4000
    unet_batch: int = 32
    pool_per_caption: int = 48  # pictures per caption whose latents the U-Net trains on
    caption_dropout: float = 0.1
    lr: float = 1e-3
    threads: int = 2


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def captions() -> list[tuple[str, str, str]]:
    """Every (colour, shape, background) the grammar has: 24."""
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]


def draw(colour: str, shape: str, background: str, rng: np.random.Generator) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: the shape around the centre (jittered ±3 px, 15-22 px from centre to
    corner or rim), so the centre's 8 x 8 pixels always lie inside it."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    r = rng.uniform(15, 22)
    cx, cy = SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 + rng.uniform(-3, 3)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        half = r / math.sqrt(2) * 1.2
        pen.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:  # centroid at the centre; its incircle (r / 2) covers the centre patch
        turn = rng.uniform(-0.2, 0.2)
        pen.polygon([(cx + r * math.sin(turn + k * 2 * math.pi / 3), cy - r * math.cos(turn + k * 2 * math.pi / 3))
                     for k in range(3)], fill=fill)
    return np.asarray(image)


def _pictures(rng: np.random.Generator, per_caption: int) -> tuple[np.ndarray, list[str]]:
    images, texts = [], []
    for colour, shape, background in captions():
        for _ in range(per_caption):
            images.append(draw(colour, shape, background, rng))
            texts.append(caption(colour, shape, background))
    return np.stack(images), texts


def _to_tensor(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_demo(out_dir: Path, config: TrainConfig = TrainConfig(), progress: bool = True) -> Path:
    """Trains the three parts and writes the diffusers folder (plus loss.json, loss.png) to out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not empty: choose a new directory or remove it")
    import diffusers
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from tqdm import tqdm
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    losses: dict[str, list[tuple[int, float]]] = {"vae": [], "unet": []}
    try:
        # 1. the VAE, on freshly drawn pictures every step
        vae = AutoencoderKL(**VAE)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr)
        bar = tqdm(range(config.vae_steps), desc="train VAE", disable=not progress)
        for step in bar:
            batch = _to_tensor(np.stack([draw(*captions()[rng.integers(24)], rng) for _ in range(config.vae_batch)]))
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            mse = (reconstruction - batch).pow(2).mean()
            loss = mse + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 20 == 0:
                losses["vae"].append((step, mse.item()))
                bar.set_postfix(mse=f"{mse.item():.4f}")
        vae.eval()

        # 2. the latents of a fixed pool; SD's scaling: unit variance
        images, texts = _pictures(rng, config.pool_per_caption)
        with torch.no_grad():
            latents = torch.cat([vae.encode(_to_tensor(images[i:i + 64])).latent_dist.mean
                                 for i in range(0, len(images), 64)])
        scaling = float(1.0 / latents.std())
        vae.register_to_config(scaling_factor=scaling)
        latents = latents * scaling

        # 3. text encoder and U-Net
        _, _, vocab = write_clip_bpe(staging / "_bpe", 600)
        tokenizer = CLIPTokenizer.from_pretrained(staging / "_bpe", model_max_length=77)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER, vocab_size=len(vocab), bos_token_id=vocab[BOS],
                                                    eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]))
        unet = UNet2DConditionModel(**UNET)
        noise_schedule = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)
        prompts = sorted(set(texts)) + [""]
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        index = {p: i for i, p in enumerate(prompts)}
        caption_ids = torch.tensor([index[t] for t in texts])
        parameters = list(unet.parameters()) + list(text_encoder.parameters())
        optimizer = torch.optim.AdamW(parameters, lr=config.lr)
        warm_up = max(1, config.unet_steps // 20)  # then cosine decay to 0
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm_up) * 0.5 * (
            1 + math.cos(math.pi * s / config.unet_steps)))
        bar = tqdm(range(config.unet_steps), desc="train text encoder + U-Net", disable=not progress)
        for step in bar:
            pick = torch.from_numpy(rng.integers(0, len(latents), config.unet_batch))
            x0 = latents[pick]
            rows = caption_ids[pick].clone()
            rows[torch.from_numpy(rng.random(config.unet_batch) < config.caption_dropout)] = index[""]
            noise = torch.randn_like(x0)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (config.unet_batch,))
            noisy = noise_schedule.add_noise(x0, noise, t)
            context = text_encoder(ids[rows]).last_hidden_state
            loss = (unet(noisy, t, context).sample - noise).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            if step % 20 == 0:
                losses["unet"].append((step, loss.item()))
                bar.set_postfix(loss=f"{loss.item():.4f}")

        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=diffusers.DPMSolverMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.save_pretrained(staging / "model", safe_serialization=True)
        (staging / "model" / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER_CONFIG, indent=2))
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(staging / "_bpe" / name, staging / "model" / "tokenizer" / name)
        _write_loss_curve(staging / "model", losses, config)
        if out_dir.exists():
            out_dir.rmdir()
        (staging / "model").rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _write_loss_curve(folder: Path, losses: dict[str, list[tuple[int, float]]], config: TrainConfig) -> None:
    (folder / "loss.json").write_text(json.dumps({"config": config.__dict__, **losses}) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (name, label) in zip(axes, (("vae", "VAE reconstruction MSE"), ("unet", "U-Net ε-prediction MSE"))):
        steps, values = zip(*losses[name])
        ax.plot(steps, values, lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=80)
    plt.close(fig)


def nearest(pixel: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    return min(palette, key=lambda name: float(np.sum((pixel - np.array(palette[name], float)) ** 2)))


def read_picture(image: np.ndarray) -> tuple[str, str]:
    """(centre colour, background) of a generated (SIZE, SIZE, 3) picture: the palette entries nearest
    the median of its centre 8 x 8 pixels and of its 4-pixel border."""
    h, w = image.shape[:2]
    border = np.concatenate([image[:4].reshape(-1, 3), image[-4:].reshape(-1, 3),
                             image[:, :4].reshape(-1, 3), image[:, -4:].reshape(-1, 3)]).astype(float)
    centre = image[h // 2 - 4:h // 2 + 4, w // 2 - 4:w // 2 + 4].reshape(-1, 3).astype(float)
    return nearest(np.median(centre, 0), COLOURS), nearest(np.median(border, 0), BACKGROUNDS)


def picture_grid(engine_dir: Path, out: Path, seed: int = 1, backend: str = "auto") -> None:
    """Every caption of the grammar once (rows: colours; columns: shapes on white, then on black)."""
    from PIL import Image

    pipe = Pipeline.load(engine_dir, backend=backend)
    tiles = {}
    for colour, shape, background in captions():
        config = pipe.make_config(caption(colour, shape, background), seed=seed, steps=20)
        tiles[colour, shape, background] = pipe.generate(config).images[0]
    rows = [np.concatenate([tiles[c, s, b] for b in BACKGROUNDS for s in SHAPES], 1) for c in COLOURS]

    save_png(Image.fromarray(np.concatenate(rows, 0)), out, f"demo grid, seed {seed}, 20 steps, {engine_dir}")


if __name__ == "__main__":  # python -m sdrt.export.demo_model ENGINES OUT.png: the README's picture
    import sys

    picture_grid(Path(sys.argv[1]), Path(sys.argv[2]))


__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "TrainConfig", "caption", "captions", "draw", "picture_grid",
           "read_picture", "train_demo"]
