"""The lean runtime: no torch, seeds, batching, buffers, and every bad input refused clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from sdrt.errors import EngineError, InputError
from sdrt.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_engines):
    return Pipeline.load(tiny_engines, backend="ort-cpu")


def test_import_and_generate_leave_torch_out(tiny_engines, tmp_path):
    code = textwrap.dedent(f"""
        import sys
        from sdrt import Pipeline, save_png
        from PIL import Image
        images = Pipeline.load({str(tiny_engines)!r}, backend="ort-cpu")("a cat", steps=2, seed=1)
        save_png(images[0], {str(tmp_path / "x.png")!r})
        assert Image.open({str(tmp_path / "x.png")!r}).info["parameters"].startswith("a cat\\nSteps: 2")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True, env={"SDRT_CACHE_DIR": str(tmp_path), "PATH": ""})


def test_same_seed_same_image_and_batch_rows_equal_single_seeds(pipe):
    a = pipe.generate(pipe.make_config("a cat", steps=3, seed=11, scheduler="euler_a")).images
    b = pipe.generate(pipe.make_config("a cat", steps=3, seed=11, scheduler="euler_a")).images
    np.testing.assert_array_equal(a, b)
    batch = pipe.generate(pipe.make_config("a cat", steps=3, seed=11, scheduler="euler_a", batch=2)).images
    second = pipe.generate(pipe.make_config("a cat", steps=3, seed=12, scheduler="euler_a")).images
    np.testing.assert_array_equal(batch[0], a[0])
    np.testing.assert_array_equal(batch[1], second[0])
    c = pipe.generate(pipe.make_config("a cat", steps=3, seed=13, scheduler="euler_a")).images
    assert np.abs(c.astype(int) - a.astype(int)).max() > 0, "a different seed must change the image"


def test_every_scheduler_runs_and_gives_finite_distinct_images(pipe):
    from sdrt.schedulers import SAMPLERS, TWO_CALLS_A_STEP

    seen = {}
    for name in SAMPLERS:
        result = pipe.generate(pipe.make_config("a cat", steps=3, seed=5, scheduler=name))
        assert result.images.shape == (1, 64, 64, 3) and result.images.dtype == np.uint8
        # PLMS adds one step; two-call samplers run 2n - 1 calls
        assert len(result.timings.step_engine_s) == (4 if name == "plms" else 5 if name in TWO_CALLS_A_STEP else 3)
        seen[name] = result.images
    assert len({v.tobytes() for v in seen.values()}) == len(seen)


def test_written_buffers_never_alias(pipe):
    backend = pipe.backend
    zeros = np.zeros((2, 3), np.float32)
    a, b = backend.empty(zeros.shape, "float32"), backend.empty(zeros.shape, "float32")
    backend.write(a, zeros)
    backend.write(b, zeros + 1)
    assert a.data_ptr() != b.data_ptr()
    assert backend.download(a).sum() == 0 and backend.download(b).sum() == 6


def test_a_callback_can_stop_the_loop_and_the_latents_are_decoded_as_they_are(pipe):
    """A1111's interrupt and skip: STOP after the last step is the full image; earlier, a different
    (noisier) finite one, with one engine time per step run."""
    from sdrt.pipeline import STOP

    config = pipe.make_config("a cat", steps=4, seed=3, scheduler="euler")
    full = pipe.generate(config).images
    at_last = pipe.generate(config, callback=lambda done, total: STOP if done == total else None)
    np.testing.assert_array_equal(at_last.images, full)
    early = pipe.generate(config, callback=lambda done, total: STOP if done == 2 else None)
    assert len(early.timings.step_engine_s) == 2 and early.images.shape == full.shape
    assert not np.array_equal(early.images, full)


def test_pil_images_carry_parameters(pipe):
    image = pipe("a cat", negative_prompt="dog", steps=2, seed=9, scheduler="euler")[0]
    assert image.size == (64, 64)
    assert image.info["parameters"].startswith("a cat\nNegative prompt: dog\nSteps: 2, Sampler: Euler, "
                                               "Schedule type: Automatic, CFG scale: ")
    assert "Seed: 9" in image.info["parameters"]


@pytest.mark.parametrize("kwargs, match", [
    ({"height": 60}, "multiple of 8"),
    ({"width": 2048}, "multiple of 8 from 64 to"),
    ({"height": 32}, "multiple of 8 from 64"),
    ({"steps": 0}, "steps must be"),
    ({"steps": 1.5}, "steps must be"),
    ({"guidance": float("nan")}, "guidance must be finite"),
    ({"guidance": float("inf")}, "guidance must be finite"),
    ({"guidance": "lots"}, "guidance must be a number"),
    ({"scheduler": "dpm_fast"}, "unknown scheduler"),
    ({"batch": 0}, "batch must be"),
    ({"batch": 99}, "batch must be"),
    ({"seed": -1}, "seed must be"),
    ({"negative_prompt": "blurry \ud83d"}, "negative_prompt is not valid Unicode"),
])
def test_bad_arguments_raise_named_errors(pipe, kwargs, match):
    with pytest.raises(InputError, match=match):
        pipe.make_config("a cat", **kwargs)


def test_prompt_list_must_match_batch(pipe):
    with pytest.raises(InputError, match="list of 2 strings"):
        pipe.make_config(["a", "b", "c"], batch=2)


def test_rows_beyond_the_engines_batch_need_max_rows_and_a_caller_that_splits_them(pipe):
    top = pipe.limits.batch[2]
    with pytest.raises(InputError, match=f"from 1 to {top}"):
        pipe.make_config("a", batch=top + 1)
    config = pipe.make_config("a", batch=top + 1, max_rows=16, steps=1, height=64, width=64)  # the server's n_iter
    with pytest.raises(InputError, match="in parts"):
        pipe.generate(config)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_corrupted_artifact_is_refused_with_rebuild_hint(tiny_engines, tmp_path):
    engines = _copy(tiny_engines, tmp_path / "e")
    data = engines / "denoise_step.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(EngineError, match="sha256.*sdrt export"):
        Pipeline.load(engines, backend="ort-cpu")


def test_missing_artifact_and_bad_manifest_are_refused(tiny_engines, tmp_path):
    engines = _copy(tiny_engines, tmp_path / "e")
    (engines / "vae_decoder.onnx").unlink()
    with pytest.raises(EngineError, match="missing.*sdrt export"):
        Pipeline.load(engines, backend="ort-cpu")
    (engines / "manifest.json").write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        Pipeline.load(engines, backend="ort-cpu")
    (engines / "manifest.json").write_text(json.dumps({"format": "sdrt-engines", "version": 999}))
    with pytest.raises(EngineError, match="manifest version 999"):
        Pipeline.load(engines, backend="ort-cpu")
    (engines / "manifest.json").unlink()
    with pytest.raises(EngineError, match="manifest.json is missing"):
        Pipeline.load(engines, backend="ort-cpu")
    with pytest.raises(EngineError, match="not an engine directory"):
        Pipeline.load(tmp_path / "nowhere", backend="ort-cpu")


def test_manifest_dtype_mismatch_is_refused(tiny_engines, tmp_path):
    engines = _copy(tiny_engines, tmp_path / "e")
    doc = json.loads((engines / "manifest.json").read_text())
    doc["components"]["vae_decoder"]["outputs"][0]["dtype"] = "float32"
    (engines / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(EngineError, match="images.*re-export"):
        Pipeline.load(engines, backend="ort-cpu")


def test_load_errors_say_what_is_wrong_not_always_re_export(tiny_engines, tmp_path, monkeypatch):
    """A damaged graph is the engine's fault (re-export); memory and missing operators are the
    machine's (a re-export would not help), as ONNX Runtime's own exception classes tell."""
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
    from sdrt.backends.onnxruntime import OrtBackend
    from sdrt.errors import BackendError
    from sdrt.manifest import read_manifest

    engines = _copy(tiny_engines, tmp_path / "e")
    manifest, backend = read_manifest(engines), OrtBackend("cpu")
    (engines / "vae_decoder.onnx").write_bytes(b"not a graph")  # past the sha256 check (load() alone)
    with pytest.raises(EngineError, match="vae_decoder.onnx is damaged.*re-export"):
        backend.load(engines, manifest, "vae_decoder")
    for error, match in ((ort_errors.RuntimeException("Failed to allocate memory for requested buffer of size 4"),
                          "not enough memory to load text_encoder.onnx.*--low-vram"),
                         (ort_errors.NotImplemented("Could not find an implementation for GroupNorm(21)"),
                          "cannot run text_encoder.onnx.*install the onnxruntime version")):
        def failing(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(onnxruntime, "InferenceSession", failing)
        with pytest.raises(BackendError, match=match) as raised:
            backend.load(engines, manifest, "text_encoder")
        assert "re-export" not in str(raised.value)


def test_unknown_and_unavailable_backends(tiny_engines):
    from sdrt.errors import BackendError

    with pytest.raises(BackendError, match="choose one of"):
        Pipeline.load(tiny_engines, backend="tpu")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendError, match="onnxruntime-gpu"):
            Pipeline.load(tiny_engines, backend="ort-cuda")


def test_low_vram_keeps_one_engine_and_matches(tiny_engines, pipe):
    lean = Pipeline.load(tiny_engines, backend="ort-cpu", low_vram=True)
    a = lean.generate(lean.make_config("a cat", steps=2, seed=3)).images
    assert len(lean.device.engines.loaded) == 1
    b = pipe.generate(pipe.make_config("a cat", steps=2, seed=3)).images
    np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
def test_ort_cuda_matches_cpu(tiny_engines, pipe):
    from sdrt.backends.onnxruntime import cuda_available

    if not cuda_available():
        pytest.skip("no CUDA GPU with onnxruntime-gpu")
    gpu = Pipeline.load(tiny_engines, backend="ort-cuda")
    a = gpu.generate(gpu.make_config("a cat", steps=4, seed=3)).images
    b = pipe.generate(pipe.make_config("a cat", steps=4, seed=3)).images
    assert int(np.abs(a.astype(int) - b.astype(int)).max()) <= 2


def test_rows_with_their_own_seeds_equal_single_images(pipe):
    batch = pipe.generate(pipe.make_config(["a cat", "a dog"], steps=3, seeds=[7, 3], scheduler="euler_a"))
    assert batch.seeds == [7, 3]
    for row, (prompt, seed) in enumerate((("a cat", 7), ("a dog", 3))):
        single = pipe.generate(pipe.make_config(prompt, steps=3, seed=seed, scheduler="euler_a")).images[0]
        np.testing.assert_array_equal(batch.images[row], single)
    with pytest.raises(InputError, match="seeds must be 2 integers"):
        pipe.make_config("a cat", batch=2, seeds=[1])


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])  # step noise; sampler history
@pytest.mark.parametrize("drop_after", [2, 4])  # mid-loop (batch shrinks); after the last step
def test_dropped_rows_leave_the_batch_and_the_rest_is_unchanged(pipe, scheduler, drop_after):
    config = pipe.make_config(["a", "b", "c"], steps=4, seeds=[1, 2, 3], scheduler=scheduler)
    sizes = []

    def drop_middle(done, total):
        sizes.append(pipe.device.buffers.pool and max(k[1][0] for k in pipe.device.buffers.pool if k[0] == "latents0"))
        return [0, 2] if done >= drop_after else None

    result = pipe.generate(config, callback=drop_middle)
    assert result.rows == [0, 2] and result.seeds == [1, 3] and result.images.shape[0] == 2
    if drop_after < 4:
        assert sizes[-1] == 2, "the engine must run the remaining steps at the smaller batch"
    full = pipe.generate(config).images
    np.testing.assert_array_equal(result.images, full[[0, 2]])
    assert "Seed: 3" in result.parameters(1) and result.parameters(1).startswith("c")


def test_dropping_every_row_cancels(pipe):
    from sdrt.pipeline import Cancelled

    with pytest.raises(Cancelled, match="after step 1 of 3"):
        pipe.generate(pipe.make_config("a cat", steps=3, seed=1), callback=lambda done, total: [])


def test_tiling_covers_the_latent_with_the_overlap():
    from sdrt.tiling import tile_starts, tiles

    assert tile_starts(8, 8, 2) == [0] and tile_starts(5, 8, 2) == [0]
    assert tile_starts(16, 8, 2) == [0, 6, 8]
    covered = np.zeros((20, 13), int)
    for y, x, th, tw in tiles(20, 13, 8, 2):
        covered[y : y + th, x : x + tw] += 1
    assert covered.min() >= 1


def test_low_vram_tiled_decode_is_close_to_the_full_decode(tiny_engines, pipe):
    lean = Pipeline.load(tiny_engines, backend="ort-cpu", low_vram=True, vae_tile=64)
    config = pipe.make_config("a cat", steps=2, seed=3, height=128, width=192)
    full = pipe.generate(config).images
    tiled = lean.generate(config).images
    assert tiled.shape == full.shape == (1, 128, 192, 3)
    assert any(k[0] == "tile_latents" for k in lean.device.buffers.pool), "the image was not decoded in tiles"
    from sdrt.bench.stats import psnr

    assert psnr(tiled, full) >= 25.0
    small = pipe.make_config("a cat", steps=2, seed=3, height=64, width=64)  # one tile: the full decode
    np.testing.assert_array_equal(lean.generate(small).images, pipe.generate(small).images)


def test_rows_are_not_compacted_below_the_engines_min_batch(tiny_engines, pipe):
    """Static TensorRT plans take one batch size: dropped rows then run on and are discarded."""
    from dataclasses import replace as dc_replace

    fixed = Pipeline.load(tiny_engines, backend="ort-cpu")
    fixed.limits = dc_replace(fixed.limits, batch=(3, 3, 3))
    config = fixed.make_config(["a", "b", "c"], steps=3, seeds=[1, 2, 3])
    batches = []
    result = fixed.generate(config, callback=lambda done, total: batches.append(
        max(k[1][0] for k in fixed.device.buffers.pool if k[0] == "latents0")) or [0, 2])
    assert set(batches) == {3} and result.rows == [0, 2]
    np.testing.assert_array_equal(result.images, pipe.generate(config).images[[0, 2]])


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m"])  # step noise; sampler history
def test_a_batch_below_the_engines_min_batch_is_padded_and_trimmed(tiny_engines, pipe, scheduler):
    """Static batch-3 plans still serve one or two images: copies of the last row fill the batch."""
    from dataclasses import replace as dc_replace

    fixed = Pipeline.load(tiny_engines, backend="ort-cpu")
    fixed.limits = dc_replace(fixed.limits, batch=(3, 3, 3))
    for prompts, seeds in ((["a cat"], [5]), (["a cat", "a dog"], [5, 9])):
        config = fixed.make_config(prompts, steps=3, seeds=seeds, scheduler=scheduler)
        result = fixed.generate(config)
        assert max(k[1][0] for k in fixed.device.buffers.pool if k[0] == "latents0") == 3, "the engine ran at its batch"
        assert result.images.shape[0] == len(prompts) and result.rows == list(range(len(prompts)))
        assert result.seeds == seeds and result.config is config
        np.testing.assert_array_equal(result.images, pipe.generate(config).images)
    with pytest.raises(InputError, match="batch must be an integer from 1 to 3"):
        fixed.make_config("a cat", batch=4)
