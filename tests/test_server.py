"""`sdrt serve` on loopback with the tiny engines, through real clients: the openai package,
webuiapi (AUTOMATIC1111's Python client) and plain HTTP; fuzzed bodies; a bounded load test."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

from sdrt.bench.live_server import LiveServer  # noqa: E402
from sdrt.errors import InputError  # noqa: E402
from sdrt.pipeline import Pipeline  # noqa: E402
from sdrt.schedulers import A1111_SAMPLERS  # noqa: E402
from sdrt.serve.config import ServeConfig  # noqa: E402

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def server(tiny_engines):
    live = LiveServer(ServeConfig(tiny_engines, token=TOKEN, backend="ort-cpu"))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def direct(tiny_engines):
    return Pipeline.load(tiny_engines, backend="ort-cpu")


def post_json(url: str, body, headers: dict) -> httpx.Response:
    """JSON as any client may send it: ASCII with escapes, so lone surrogates ("\\ud83d") get through."""
    return httpx.post(url, content=json.dumps(body), headers={**headers, "Content-Type": "application/json"},
                      timeout=60)


def decode(b64: str) -> tuple[np.ndarray, dict]:
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    return np.asarray(image.convert("RGB")), dict(image.info)


# --- real clients --------------------------------------------------------------------------------

def test_openai_client_images_match_the_pipeline(server, direct):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0)
    response = client.images.generate(model="sdrt", prompt="a red cube", n=2, size="64x64",
                                      response_format="b64_json", extra_body={"seed": 5, "steps": 3})
    assert len(response.data) == 2 and response.created > 0
    expected = direct.generate(direct.make_config(["a red cube"] * 2, steps=3, seeds=[5, 6], height=64, width=64,
                                                  scheduler="dpmpp_2m_karras")).images
    for item, want in zip(response.data, expected):
        got, info = decode(item.b64_json)
        np.testing.assert_array_equal(got, want)
        assert "Seed: " in info["parameters"] and info["parameters"].startswith("a red cube")

    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="x", size="64x64", response_format="url")
    with pytest.raises(openai.BadRequestError, match="size"):
        client.images.generate(prompt="x", size="large")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_both_apis_serve_sdxl_engines_at_their_default_size(tiny_sdxl_engines):
    """SDXL through the same endpoints: the family's defaults, the engines' size, micro-conditioning."""
    import openai

    live = LiveServer(ServeConfig(tiny_sdxl_engines, backend="ort-cpu"))
    try:
        direct = Pipeline.load(tiny_sdxl_engines, backend="ort-cpu")
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="none", max_retries=0)
        micro = {"original_size": [128, 96], "crop_top_left": [8, 0]}
        response = client.images.generate(prompt="a red cube", response_format="b64_json",
                                          extra_body={"seed": 3, "steps": 2, **micro})
        want = direct.generate(direct.make_config("a red cube", steps=2, seed=3, original_size=(128, 96),
                                                  crop_top_left=(8, 0))).images[0]
        got, _ = decode(response.data[0].b64_json)
        assert got.shape == (64, 64, 3)  # the engines' default size (SDXL's real engines: 1024)
        np.testing.assert_array_equal(got, want)
        a1111 = httpx.post(f"{live.url}/sdapi/v1/txt2img", json={"prompt": "a red cube", "seed": 3, "steps": 2,
                                                                   "cfg_scale": 5.0, **micro}, timeout=60)
        assert a1111.status_code == 200
        np.testing.assert_array_equal(decode(a1111.json()["images"][0])[0], want)  # 5.0: SDXL's default too
        ignored = httpx.post(f"{live.url}/sdapi/v1/txt2img", timeout=60, json={
            "prompt": "a red cube", "seed": 3, "steps": 2, "cfg_scale": 5.0, **micro,
            "override_settings": {"CLIP_stop_at_last_layers": 2}})  # A1111 ignores clip skip for SDXL
        np.testing.assert_array_equal(decode(ignored.json()["images"][0])[0], want)
    finally:
        live.stop()


def test_a_2000_character_prompt_runs_on_onnx_runtime_as_in_python(server, direct):
    """A1111 takes any length; ONNX Runtime engines do too (TensorRT plans keep their profile's limit)."""
    prompt = ("a red apple on a wooden table in the morning light, " * 40)[:2000]
    body = {"prompt": prompt, "negative_prompt": "blurry " * 100, "steps": 2, "width": 64, "height": 64, "seed": 5,
            "cfg_scale": 7.0, "sampler_name": "Euler"}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=server.headers(), timeout=120)
    assert r.status_code == 200, r.text
    config = direct.make_config(prompt, negative_prompt=body["negative_prompt"], steps=2, width=64, height=64,
                                seed=5, guidance=7.0, scheduler="euler")
    assert config.prompts.chunks > direct.manifest.shapes.max_chunks
    want = direct.generate(config).images[0]
    np.testing.assert_array_equal(decode(r.json()["images"][0])[0], want)


def test_micro_conditioning_is_refused_by_engines_without_it(server):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", headers=server.headers(),
                   json={"prompt": "x", "steps": 2, "original_size": [64, 64]})
    assert r.status_code == 400 and "micro-conditioning" in r.json()["detail"]


def test_webuiapi_client_images_match_the_pipeline(server, direct):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(server.url.rsplit(":", 1)[1]), sampler="Euler", steps=3,
                            username="user", password=TOKEN)  # A1111's --api-auth: the token as password
    result = api.txt2img(prompt="a dog", negative_prompt="blurry", seed=11, cfg_scale=5, width=64, height=64,
                         batch_size=2, n_iter=2, sampler_name="DPM++ 2M", scheduler="Karras")
    assert result.info["all_seeds"] == [11, 12, 13, 14]
    assert (result.info["sampler_name"], result.info["scheduler"]) == ("DPM++ 2M", "Karras")  # A1111 >= 1.9
    assert re.fullmatch(r"[0-9a-f]{10}", result.info["sd_model_hash"]) and result.info["version"].startswith("sdrt")
    assert re.fullmatch(r"\d{14}", result.info["job_timestamp"]) and result.info["styles"] == []
    expected = direct.generate(direct.make_config(["a dog"] * 4, negative_prompt="blurry", steps=3, guidance=5,
                                                  seeds=[11, 12, 13, 14], height=64, width=64,
                                                  scheduler="dpmpp_2m_karras")).images
    assert len(result.images) == 4
    for image, want in zip(result.images, expected):
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), want)
    infotext = result.images[2].info["parameters"]
    assert "Negative prompt: blurry" in infotext and "Seed: 13" in infotext
    assert "Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5," in infotext
    assert f"Model hash: {result.info['sd_model_hash']}, Model: tiny-fp32, " in infotext


@pytest.mark.parametrize("sampler, scheduler, name", [("DPM++ SDE", "Karras", "dpmpp_sde_karras"),
                                                     ("UniPC", None, "unipc"), ("Heun", "Automatic", "heun")])
def test_a1111_samplers_by_label_match_the_pipeline_and_write_their_infotext(server, direct, sampler, scheduler, name):
    body = {"prompt": "a dog", "negative_prompt": "blurry", "seed": 3, "steps": 3, "cfg_scale": 5, "width": 64,
            "height": 64, "sampler_name": sampler, "scheduler": scheduler}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=server.headers(), timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    label, kind = A1111_SAMPLERS[name]
    assert (info["sampler_name"], info["scheduler"]) == (label, kind)
    assert f"Sampler: {label}, Schedule type: {kind}," in info["infotexts"][0]
    want = direct.generate(direct.make_config("a dog", negative_prompt="blurry", steps=3, guidance=5, seed=3, height=64,
                                              width=64, scheduler=name)).images[0]
    np.testing.assert_array_equal(decode(r.json()["images"][0])[0], want)


def test_a1111_hires_fix_matches_the_pipeline_and_writes_its_infotext(server, direct):
    body = {"prompt": "a dog", "negative_prompt": "blurry", "seed": 3, "steps": 3, "cfg_scale": 5, "width": 64,
            "height": 64, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent (nearest-exact)",
            "denoising_strength": 0.6, "hr_sampler_name": "Euler", "hr_second_pass_steps": 4}
    h = server.headers()
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=h, timeout=120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["denoising_strength"] == 0.6 and (info["width"], info["height"]) == (64, 64)
    assert ("Denoising strength: 0.6, Hires upscale: 1.5, Hires steps: 4, Hires upscaler: Latent (nearest-exact), "
            "Hires sampler: Euler, Hires schedule type: Automatic, ") in info["infotexts"][0]
    want = direct.generate(direct.make_config(
        "a dog", negative_prompt="blurry", steps=3, guidance=5, seed=3, height=64, width=64, enable_hr=True,
        hr_scale=1.5, hr_upscaler="Latent (nearest-exact)", denoising_strength=0.6, hr_sampler="euler",
        hr_second_pass_steps=4)).images[0]
    got = decode(r.json()["images"][0])[0]
    assert got.shape == (96, 96, 3)
    np.testing.assert_array_equal(got, want)
    assert [u["name"] for u in httpx.get(f"{server.url}/sdapi/v1/upscalers", headers=h).json()] == ["Lanczos", "Nearest"]
    modes = [m["name"] for m in httpx.get(f"{server.url}/sdapi/v1/latent-upscale-modes", headers=h).json()]
    assert modes[0] == "Latent" and "Latent (bicubic antialiased)" in modes


def test_a1111_n_iter_batches_send_images_and_the_batch_limit(server):
    url, h = f"{server.url}/sdapi/v1/txt2img", server.headers()
    body = {"prompt": "x", "seed": 5, "steps": 1, "width": 64, "height": 64}
    r = httpx.post(url, json={**body, "batch_size": 2, "n_iter": 8}, headers=h, timeout=120)  # the 16-image limit
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 16 and json.loads(r.json()["info"])["all_seeds"] == list(range(5, 21))
    quiet = httpx.post(url, json={**body, "send_images": False}, headers=h, timeout=60).json()
    assert quiet["images"] == [] and json.loads(quiet["info"])["seed"] == 5
    over = httpx.post(url, json={**body, "batch_size": 9}, headers=h, timeout=60)  # the engines' batch is 8
    assert over.status_code == 400 and "n_iter" in over.json()["detail"]
    saved = httpx.post(url, json={**body, "save_images": True}, headers=h, timeout=60)
    assert saved.status_code == 400 and "save_images" in saved.json()["detail"]


def test_a1111_long_weighted_prompt_and_clip_skip_from_override_settings(server, direct):
    prompt = "a (red:1.3) cube on a [wooden] table in the morning light, " * 10 + "BREAK blue sky"
    body = {"prompt": prompt, "negative_prompt": "blurry", "seed": 4, "steps": 2, "width": 64, "height": 64,
            "override_settings": {"CLIP_stop_at_last_layers": 2}, "override_settings_restore_afterwards": True}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=server.headers(), timeout=60)
    assert r.status_code == 200, r.text
    config = direct.make_config(prompt, negative_prompt="blurry", seed=4, steps=2, guidance=7.0, height=64, width=64,
                                scheduler="dpmpp_2m_karras", clip_skip=2)
    assert config.prompts.chunks > 1
    got, info = decode(r.json()["images"][0])
    np.testing.assert_array_equal(got, direct.generate(config).images[0])
    assert "Clip skip: 2" in info["parameters"] and json.loads(r.json()["info"])["clip_skip"] == 2


def test_a_bad_request_never_fails_the_innocent_ones_in_flight(server):
    from concurrent.futures import ThreadPoolExecutor

    def post(prompt):
        return post_json(f"{server.url}/sdapi/v1/txt2img", {"prompt": prompt, "steps": 2, "width": 64, "height": 64,
                                                            "seed": 1}, server.headers())

    prompts = ["a cat", "a dog \ud83d", "a red cube", "\udfff", "a tree", "a house"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        statuses = [r.status_code for r in pool.map(post, prompts)]
    assert statuses == [200, 422, 200, 422, 200, 200]


def test_seeds_span_a1111s_range(server, direct):
    top = 2**32 - 1
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", headers=server.headers(), timeout=60,
                   json={"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": top})
    assert r.status_code == 200 and json.loads(r.json()["info"])["all_seeds"] == [top]
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", headers=server.headers(), timeout=60,
                   json={"prompt": "x", "steps": 1, "width": 64, "height": 64, "seed": top, "batch_size": 2})
    assert r.status_code == 400 and f"from 0 to {top - 1}" in r.json()["detail"]
    assert direct.make_config("x", seed=top).sampler.seed == top  # the same range in Python
    with pytest.raises(InputError, match=f"from 0 to {top - 1}"):
        direct.make_config("x", seed=top, batch=2)


def test_an_internal_error_is_a_json_500_with_an_id_and_the_connection_lives_on(server, monkeypatch, caplog):
    import sdrt.serve.a1111 as a1111_module
    import sdrt.serve.openai_api as openai_module

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(a1111_module, "a1111_config", broken)
    monkeypatch.setattr(openai_module, "openai_config", broken)
    with httpx.Client(headers=server.headers(), timeout=30) as client:  # one keep-alive connection
        for path, message in (("/sdapi/v1/txt2img", lambda b: b["detail"]),
                              ("/v1/images/generations", lambda b: b["error"]["message"])):
            r = client.post(server.url + path, json={"prompt": "x"})
            assert r.status_code == 500 and "secret" not in r.text
            error_id = message(r.json()).split()[2].rstrip(":")
            assert len(error_id) == 12 and error_id in caplog.text and "secret internal detail" in caplog.text
            assert client.get(f"{server.url}/health").status_code == 200  # the same connection still works


def test_discovery_endpoints(server):
    h = server.headers()
    samplers = {s["name"]: s["aliases"] for s in httpx.get(f"{server.url}/sdapi/v1/samplers", headers=h).json()}
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= set(samplers) and "DPM++ 2M Karras" not in samplers  # A1111 >= 1.9
    assert samplers["DPM++ 2M"] == ["dpmpp_2m", "dpmpp_2m_karras"]
    schedulers = httpx.get(f"{server.url}/sdapi/v1/schedulers", headers=h).json()
    assert [(s["name"], s["label"]) for s in schedulers] == [("automatic", "Automatic"), ("karras", "Karras")]
    models = httpx.get(f"{server.url}/sdapi/v1/sd-models", headers=h).json()
    assert models[0]["model_name"] == "tiny-fp32" and len(models[0]["sha256"]) == 64
    progress = httpx.get(f"{server.url}/sdapi/v1/progress", headers=h).json()
    assert progress["state"]["job_count"] == 0 and progress["progress"] == 0.0
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json()["status"] == "ready"


def test_embeddings_endpoint_and_prompts_as_a1111(tiny_engines, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({"emb_params": rng.normal(0, 1, (3, 32)).astype(np.float32)}, tmp_path / "shinystyle.safetensors")
    save_file({"clip_l": np.ones((1, 768), np.float32), "clip_g": np.ones((1, 1280), np.float32)},
              tmp_path / "xlonly.safetensors")
    (tmp_path / "broken.pt").write_bytes(b"not a zip")
    live = LiveServer(ServeConfig(tiny_engines, token=TOKEN, backend="ort-cpu", embeddings_dir=tmp_path))
    try:
        h = live.headers()
        found = httpx.get(f"{live.url}/sdapi/v1/embeddings", headers=h).json()
        assert found["loaded"] == {"shinystyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                  "shape": 32, "vectors": 3}}
        assert set(found["skipped"]) == {"xlonly", "broken"}
        assert (found["skipped"]["xlonly"]["shape"], found["skipped"]["xlonly"]["vectors"]) == (2048, 1)
        assert "768 and 1280 wide" in found["skipped"]["xlonly"]["reason"]
        assert found["skipped"]["broken"]["shape"] is None and "zip" in found["skipped"]["broken"]["reason"]
        body = {"prompt": "a (shinystyle:1.2) dog", "negative_prompt": "blurry", "seed": 5, "steps": 3,
                "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 6}
        r = post_json(f"{live.url}/sdapi/v1/txt2img", body, h)
        assert r.status_code == 200, r.text
        direct = Pipeline.load(tiny_engines, backend="ort-cpu", embeddings_dir=tmp_path)
        want = direct.generate(direct.make_config("a (shinystyle:1.2) dog", negative_prompt="blurry", seed=5, steps=3,
                                                  guidance=6, height=64, width=64, scheduler="euler")).images[0]
        np.testing.assert_array_equal(decode(r.json()["images"][0])[0], want)
        r = post_json(f"{live.url}/sdapi/v1/txt2img", {**body, "prompt": "a xlonly dog"}, h)
        assert r.status_code == 400 and "xlonly" in r.text and "768 and 1280 wide" in r.text
    finally:
        live.stop()


def test_a1111_sampler_labels_old_and_new_and_schedule_types():
    from sdrt.serve.a1111_requests import sampler_for

    assert sampler_for("DPM++ 2M", "Karras", "euler") == "dpmpp_2m_karras"
    assert sampler_for("DPM++ 2M Karras", None, "euler") == "dpmpp_2m_karras"  # the pre-1.9 label
    assert sampler_for("dpm++ 2m", "automatic", "euler") == "dpmpp_2m"
    assert sampler_for("Euler", "karras", "ddim") == "euler_karras"
    assert sampler_for(None, "Karras", "dpmpp_2m") == "dpmpp_2m_karras"  # the default sampler, that schedule
    assert sampler_for("euler_a", None, "ddim") == "euler_a"  # sdrt's own names
    with pytest.raises(InputError, match="'Exponential' is not available with 'Euler a': use Automatic"):
        sampler_for("Euler a", "Exponential", "ddim")
    assert sampler_for("DPM++ SDE", "Karras", "euler") == "dpmpp_sde_karras"
    assert sampler_for("DPM++ 2M SDE Karras", None, "euler") == "dpmpp_2m_sde_karras"
    assert [sampler_for(label, None, "euler") for label in ("UniPC", "Heun", "LMS", "DPM2", "DPM2 a")] == [
        "unipc", "heun", "lms", "dpm2", "dpm2_a"]
    assert sampler_for("LMS", "Karras", "euler") == "lms_karras"
    with pytest.raises(InputError, match="sampler 'DPM adaptive' is not available: choose one of DDIM, Euler, Euler a"):
        sampler_for("DPM adaptive", None, "ddim")


def test_a1111_options_read_write_and_refuse_what_sdrt_cannot_do(server, direct):
    url, h = f"{server.url}/sdapi/v1/options", server.headers()
    options = httpx.get(url, headers=h).json()
    assert options["CLIP_stop_at_last_layers"] == 1 and options["sd_model_checkpoint"].startswith("tiny-fp32 [")
    try:
        assert httpx.post(url, json=options, headers=h).status_code == 200  # what was read, posted back
        for change, match in (({"CLIP_stop_at_last_layers": 2, "samples_format": "jpg"}, "fixed at 'png'"),
                              ({"sd_model_checkpoint": "other.safetensors"}, "runs one model"),
                              ({"CLIP_stop_at_last_layers": 99}, "1 to 12"),
                              ({"CLIP_stop_at_last_layers": True}, "1 to 12"),
                              ({"hires_fix_upscaler": "x"}, "does not implement the option 'hires_fix_upscaler'"),
                              ([1, 2], "JSON object")):
            r = httpx.post(url, json=change, headers=h)
            assert r.status_code == 400 and re.search(match, r.json()["detail"]), r.text
        bad = httpx.post(url, content=b"{not json", headers={**h, "Content-Type": "application/json"})
        assert bad.status_code == 400
        assert httpx.get(url, headers=h).json() == options  # the refused posts changed nothing
        assert httpx.post(url, json={"CLIP_stop_at_last_layers": 2}, headers=h).status_code == 200
        body = {"prompt": "a cube", "seed": 4, "steps": 2, "width": 64, "height": 64}
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=h, timeout=60)
        got, info = decode(r.json()["images"][0])
        assert "Clip skip: 2" in info["parameters"]
        want = direct.generate(direct.make_config("a cube", seed=4, steps=2, guidance=7.0, height=64, width=64,
                                                  scheduler="dpmpp_2m_karras", clip_skip=2)).images[0]
        np.testing.assert_array_equal(got, want)
    finally:
        httpx.post(url, json={"CLIP_stop_at_last_layers": 1}, headers=h)


# --- refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, status, match", [
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 65, "height": 64, "steps": 2}, 400, "multiple of 8"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, 400, "steps must be"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 10**6}, 400, "steps must be"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "DPM adaptive"}, 400, "not available"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, 400,
     "hr_upscaler 'R-ESRGAN 4x+' is not available"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_resize_x": 4096}, 400, "second pass is 4096x"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "seed": 2**40}, 400, "seed must be"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 999}, 400, "1 to 16 images"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": "NaN", "steps": 2, "width": 64, "height": 64}, 400, "finite"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "cfg_scale": 1e308, "steps": 2, "width": 64, "height": 64}, 400,
     "from -100 to 100"),  # inf once cast to fp32 (found by the fuzzer: a RuntimeWarning and a garbage image)
    ("/sdapi/v1/txt2img", {"prompt": "x" * 5000}, 400, "2000 characters"),
    # invalid Unicode (half an emoji) and digits int() refuses are 4xx in any field
    ("/sdapi/v1/txt2img", {"prompt": "a cat \ud83d"}, 422, "prompt is not valid Unicode (a lone surrogate at character 6)"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_index": "\udc00"}, 422, "sampler_index is not valid Unicode"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"\ud800": 1}}, 422, "not valid Unicode"),
    ("/v1/images/generations", {"prompt": "\ud800"}, 400, "prompt is not valid Unicode"),
    ("/v1/images/generations", {"prompt": "x", "size": "64x\u00b2"}, 400, "size must be"),
    ("/v1/images/generations", {"prompt": "x", "size": "\u0663\u0663x64"}, 400, "size must be"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": 9}}, 400,
     "clip_skip must be an integer from 1"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": "2"}}, 400, "clip_skip"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": [2]}, 422, "override_settings"),
    ("/sdapi/v1/txt2img", {"prompt": ["not", "a", "string"]}, 422, "prompt"),
    ("/sdapi/v1/txt2img", [1, 2], 422, "invalid request"),
    ("/v1/images/generations", {"prompt": "x", "n": 0}, 400, "1 to 16"),
    ("/v1/images/generations", {"n": 1}, 400, "prompt"),
    ("/v1/images/generations", {"prompt": "x", "size": "64x4096"}, 400, "height must be"),
    # booleans and fractions are not integers (`true` used to run 1 step)
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": True}, 422, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "batch_size": 1.5}, 422, "batch_size"),
    ("/v1/images/generations", {"prompt": "x", "n": True}, 400, "n: Input should be a valid integer"),
    ("/v1/images/generations", {"prompt": "x", "seed": False}, 400, "seed"),
])
def test_bad_requests_get_a_4xx_json_error(server, path, body, status, match):
    response = post_json(server.url + path, body, server.headers())
    assert response.status_code == status, response.text
    payload = response.json()
    message = payload["error"]["message"] if path.startswith("/v1/") else payload["detail"]
    assert match in message


def test_auth_body_limit_and_unknown_paths(server):
    url = f"{server.url}/sdapi/v1/txt2img"
    assert httpx.post(url, json={"prompt": "x"}).status_code == 401
    assert httpx.post(url, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # probes and scrapers need no token
    big = httpx.post(url, content=b"{" + b" " * 100_000 + b"}", headers={**server.headers(),
                                                                          "Content-Type": "application/json"})
    assert big.status_code == 413 and big.json()["error"] == "too_large"
    for path, code in (("/sdapi/v1/txt2img", lambda b: b["error"]), ("/v1/images/generations",
                                                                     lambda b: b["error"]["code"])):
        chunked = httpx.post(server.url + path, content=iter([b"{"] + [b" " * 10_000] * 10 + [b"}"]),
                             headers={**server.headers(), "Content-Type": "application/json"})  # no Content-Length
        assert chunked.status_code == 413 and code(chunked.json()) == "too_large", chunked.text
    unauthorized = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"})
    assert unauthorized.status_code == 401 and unauthorized.json()["error"]["code"] == "unauthorized"
    garbage = httpx.post(url, content=b"\xff\xfe not json", headers={**server.headers(),
                                                                      "Content-Type": "application/json"})
    assert garbage.status_code in (400, 422) and "error" in garbage.json()
    missing = httpx.get(f"{server.url}/nowhere", headers=server.headers())
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


SLOW_STEP_S = 0.1


@pytest.fixture
def slow_steps(monkeypatch):
    """Every denoise step takes at least SLOW_STEP_S, so the timing tests hold on any machine."""
    from sdrt.backends.onnxruntime import OrtEngine

    run = OrtEngine.run

    def slow(self, inputs, outputs):
        if self.spec.onnx == "denoise_step.onnx":
            time.sleep(SLOW_STEP_S)
        run(self, inputs, outputs)

    monkeypatch.setattr(OrtEngine, "run", slow)


def test_a_disconnected_client_is_dropped_before_its_next_step(server, slow_steps):
    before_total = server.metric("sdrt_stage_seconds_count", stage="total")
    body = {"prompt": "slow", "steps": 150, "width": 64, "height": 64, "seed": 1}  # ≥ 15 s of steps
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=server.headers(), timeout=0.8)
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/sdapi/v1/progress", headers=server.headers()).json()["state"]["job_count"]:
        assert time.monotonic() < deadline, "the abandoned generation kept running"
        time.sleep(0.05)
    assert server.metric("sdrt_errors_total", kind="client_disconnected") >= 1
    assert server.metric("sdrt_stage_seconds_count", stage="total") == before_total  # stopped, not finished


@pytest.fixture(scope="module")
def one_row_server(tiny_engines):
    """Engine calls of one row: n_iter batches (and rows) run one after another."""
    live = LiveServer(ServeConfig(tiny_engines, backend="ort-cpu", max_batch=1))
    yield live
    live.stop()


def _stop_during(live: LiveServer, action: str, body: dict) -> tuple[httpx.Response, list[dict]]:
    """Posts body; once its first batch has run two steps, POSTs /sdapi/v1/ACTION; the answer and the
    progress seen meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, f"{live.url}/sdapi/v1/txt2img", json=body, timeout=60)
        seen = []
        deadline = time.monotonic() + 30
        while not seen or seen[-1]["state"]["sampling_step"] < 2:
            assert time.monotonic() < deadline, "the generation never started"
            seen.append(httpx.get(f"{live.url}/sdapi/v1/progress").json())
            time.sleep(0.02)
        assert httpx.post(f"{live.url}/sdapi/v1/{action}").status_code == 200
        seen.append(httpx.get(f"{live.url}/sdapi/v1/progress").json())
        return future.result(), seen


def test_interrupt_ends_the_running_request_with_the_images_so_far(one_row_server, slow_steps):
    body = {"prompt": "x", "steps": 100, "n_iter": 3, "width": 64, "height": 64, "seed": 1}  # ≥ 30 s of steps
    r, seen = _stop_during(one_row_server, "interrupt", body)
    assert r.status_code == 200 and len(r.json()["images"]) == 1  # the later n_iter batches never ran
    image, _ = decode(r.json()["images"][0])
    assert np.isfinite(image).all() and image.std() > 0
    assert seen[-1]["state"]["interrupted"] or seen[-1]["state"]["job_count"] == 0
    assert httpx.post(f"{one_row_server.url}/sdapi/v1/interrupt").status_code == 200  # nothing running: no-op


def test_skip_ends_the_running_batch_and_the_later_ones_run(one_row_server, direct, slow_steps):
    body = {"prompt": "x", "steps": 20, "n_iter": 2, "width": 64, "height": 64, "seed": 7}
    r, _ = _stop_during(one_row_server, "skip", body)
    assert r.status_code == 200 and len(r.json()["images"]) == 2
    full = direct.generate(direct.make_config(["x"] * 2, seeds=[7, 8], steps=20, guidance=7.0, height=64, width=64,
                                              scheduler="dpmpp_2m_karras")).images
    skipped, second = (decode(b)[0] for b in r.json()["images"])
    assert not np.array_equal(skipped, full[0])  # decoded after a few of its 20 steps
    np.testing.assert_array_equal(second, full[1])  # the next batch ran in full


def test_queue_full_gets_429_and_timeouts_504(tiny_engines, slow_steps):
    live = LiveServer(ServeConfig(tiny_engines, backend="ort-cpu", max_queue=1, max_batch=1,
                                  request_timeout_s=1.5))
    try:
        body = {"prompt": "x", "steps": 60, "width": 64, "height": 64}  # ≥ 6 s of steps each

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(f"{live.url}/sdapi/v1/txt2img", json=body)
                                              for _ in range(4)))

        codes = sorted(r.status_code for r in asyncio.run(burst()))
        assert 429 in codes and 504 in codes and set(codes) <= {429, 504}, codes
        for r in asyncio.run(burst()):
            if r.status_code == 429:
                assert r.headers["Retry-After"] == "1" and r.json()["error"] == "queue_full"
    finally:
        live.stop()


# --- fuzzing -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server(tiny_engines):
    live = LiveServer(ServeConfig(tiny_engines, backend="ort-cpu", max_steps=3, max_size=128))
    yield live
    live.stop()


def _values():
    from hypothesis import strategies as st

    return st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
                     st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _field(good):
    from hypothesis import strategies as st

    return st.one_of(good, _values())


def _a1111_bodies():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({}, optional={
        "prompt": _field(st.text(max_size=40)),
        "negative_prompt": _field(st.text(max_size=20)),
        "seed": _field(st.integers(-1, 2**32)),
        "sampler_name": _field(st.sampled_from(["Euler a", "DDIM", "DPM++ 2M", "LCM", "PLMS", "x"])),
        "scheduler": _field(st.sampled_from(["Automatic", "Karras", "Exponential"])),
        "steps": _field(st.integers(-1, 4)),
        "cfg_scale": _field(st.floats(-5, 20)),
        "width": _field(st.sampled_from([0, 8, 63, 64, 72, 128, 136])),
        "height": _field(st.sampled_from([0, 64, 65, 128, 4096])),
        "batch_size": _field(st.integers(-1, 3)),
        "n_iter": _field(st.integers(0, 2)),
        "enable_hr": st.booleans(),
    })


def _img2img_bodies():
    from hypothesis import strategies as st

    from tests.pictures import b64, box_mask
    from tests.pictures import noise_picture as picture

    images = [b64(picture(64, 64)), b64(picture(72, 64, seed=1)), "not base64!", "aGVsbG8=", b64(box_mask())]
    return st.fixed_dictionaries({"init_images": _field(st.lists(st.sampled_from(images), max_size=3))}, optional={
        "prompt": _field(st.text(max_size=20)),
        "steps": _field(st.integers(-1, 3)),
        "mask": _field(st.sampled_from(images)),
        "denoising_strength": _field(st.floats(-1, 2)),
        "mask_blur": _field(st.integers(-2, 100)),
        "inpainting_fill": _field(st.integers(-1, 4)),
        "inpaint_full_res": st.booleans(),
        "inpainting_mask_invert": _field(st.integers(0, 2)),
        "resize_mode": _field(st.integers(0, 3)),
        "width": _field(st.sampled_from([64, 72, 4096])),
        "batch_size": _field(st.integers(0, 2)),
    })


def _openai_bodies():
    from hypothesis import strategies as st

    return st.fixed_dictionaries({}, optional={
        "prompt": _field(st.text(max_size=40)),
        "n": _field(st.integers(-1, 3)),
        "size": _field(st.sampled_from(["64x64", "128x64", "auto", "64", "x", "64x64x64", "99999x1"])),
        "response_format": _field(st.sampled_from(["b64_json", "url"])),
        "seed": _field(st.integers(-2, 2**33)),
        "steps": _field(st.integers(-1, 4)),
        "guidance_scale": _field(st.floats()),
        "scheduler": _field(st.sampled_from(["euler", "Euler a", "nope"])),
    })


@pytest.mark.parametrize("path, bodies", [("/sdapi/v1/txt2img", _a1111_bodies), ("/sdapi/v1/img2img", _img2img_bodies),
                                          ("/v1/images/generations", _openai_bodies)])
def test_fuzzed_bodies_never_get_a_5xx(fuzz_server, path, bodies):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    client = httpx.Client(timeout=30)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(bodies(), _values()))
    def check(body):
        # NaN and Infinity go out as the literals Python's json writes (and reads) by default
        response = client.post(fuzz_server.url + path, content=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
        assert response.status_code < 500, (body, response.status_code, response.text)
        payload = response.json()
        if response.status_code == 200:
            images = payload["images"] if "images" in payload else [d["b64_json"] for d in payload["data"]]
            assert images and all(decode(b)[0].ndim == 3 for b in images)
        else:
            assert "error" in payload

    check()
    client.close()


def test_the_seeded_fuzzer_over_both_apis_finds_no_5xx_no_lost_request_no_logged_error(tiny_engines):
    """bench/serve_fuzz (the README's figures come from its CLI with more requests): mutated bodies on
    every endpoint, multipart edits, options, wrong paths and methods, clients hanging up."""
    from sdrt.bench.serve_fuzz import FuzzConfig, run_fuzz

    live = LiveServer(ServeConfig(tiny_engines, backend="ort-cpu", max_steps=3, max_size=128))
    try:
        report = asyncio.run(run_fuzz(FuzzConfig(live.url, requests=600, seed=1)))
    finally:
        live.stop()
    print(f"\nfuzz: {report['status_classes']}, hung up {report['hung_up']}, lost {report['lost']}")
    assert report["failures"] == [] and live.errors == [], (report["failures"], live.errors)
    assert report["status_classes"]["5xx"] == 0 and report["lost"] == 0
    assert report["status_classes"]["2xx"] > 100 and report["status_classes"]["4xx"] > 100  # both kinds exercised
    assert sum(report["status_classes"].values()) + report["hung_up"] == 600


# --- load ----------------------------------------------------------------------------------------

def test_load_every_request_completes_or_gets_429_and_batching_shows(tiny_engines):
    from sdrt.bench.serve_load import LoadConfig, run_load

    live = LiveServer(ServeConfig(tiny_engines, backend="ort-cpu", max_queue=24, batch_window_s=0.02))
    try:
        report = asyncio.run(run_load(LoadConfig(live.url, requests=200, concurrency=32, steps=3, size=64)))
        assert report["ok"] + report["rejected_429"] == 200, report  # none lost, no other outcome
        assert report["ok"] >= 24 and report["invalid_images"] == 0
        rows = live.metric("sdrt_batch_rows_sum")
        calls = live.metric("sdrt_batch_rows_count")
        assert rows == report["ok"] == live.metric("sdrt_images_generated_total")
        assert calls < rows, f"no request batching observed: {calls} engine calls for {rows} images"
        assert live.metric("sdrt_errors_total", kind="queue_full") == report["rejected_429"]
        assert live.metric("sdrt_queue_depth") == 0
    finally:
        live.stop()


def test_sigterm_finishes_running_work_and_rejects_the_rest_cleanly(tiny_engines):
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sdrt.cli", "serve", str(tiny_engines), "--port", str(port),
                             "--backend", "ort-cpu", "--max-batch", "1", "--drain", "1.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.1)
        body = {"prompt": "x", "steps": 20, "width": 256, "height": 256}  # ~1.4 s each, one at a time

        async def requests_then_sigterm() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                pending = [asyncio.ensure_future(client.post(f"{url}/sdapi/v1/txt2img", json=body)) for _ in range(4)]
                await asyncio.sleep(0.5)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*pending)

        codes = sorted(r.status_code for r in asyncio.run(requests_then_sigterm()))
        assert codes[0] == 200 and codes[-1] == 503 and set(codes) == {200, 503}, codes  # none dropped
        # uvicorn re-raises the signal after its graceful shutdown, so the exit is "killed by SIGTERM"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Application shutdown complete" in proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_defaults_bind_loopback_and_the_token_comes_from_the_env(monkeypatch, tmp_path):
    from sdrt.cli import build_parser

    args = build_parser().parse_args(["serve", str(tmp_path)])
    assert args.host == "127.0.0.1" and ServeConfig(tmp_path).host == "127.0.0.1"
    monkeypatch.setenv("SDRT_TOKEN", "from-env")
    assert ServeConfig.token_from_env() == "from-env"
    monkeypatch.delenv("SDRT_TOKEN")
    assert ServeConfig.token_from_env() is None


@pytest.mark.parametrize("flag, env, no_auth, host, expected", [
    ("s3cret", None, False, "0.0.0.0", "s3cret"),
    (None, "from-env", False, "0.0.0.0", "from-env"),
    (None, None, False, "127.0.0.1", None),  # loopback: local use needs no token
    (None, None, True, "0.0.0.0", None),  # beyond loopback only when asked for
    ("", None, False, "127.0.0.1", "--token is empty"),  # `--token "$UNSET"` never turns auth off
    (None, " ", False, "127.0.0.1", "SDRT_TOKEN is empty"),
    (None, None, False, "0.0.0.0", "--no-auth to mean it"),
    ("s3cret", None, True, "0.0.0.0", "drop one of them"),
])
def test_the_token_is_never_silently_off(monkeypatch, flag, env, no_auth, host, expected):
    if env is None:
        monkeypatch.delenv("SDRT_TOKEN", raising=False)
    else:
        monkeypatch.setenv("SDRT_TOKEN", env)
    if expected is None or expected in ("s3cret", "from-env"):
        assert ServeConfig.resolve_token(flag, no_auth, host) == expected
    else:
        with pytest.raises(InputError, match=expected):
            ServeConfig.resolve_token(flag, no_auth, host)


def test_serve_with_an_empty_token_exits_2_naming_the_fix(tiny_engines):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sdrt.cli", "serve", str(tiny_engines), "--token", ""],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--token is empty" in r.stderr and "--no-auth" in r.stderr


class _EndlessPipeline:
    """A stand-in for Pipeline whose generation runs until every row is dropped (then Cancelled)."""

    def __init__(self):
        from types import SimpleNamespace

        self.limits = SimpleNamespace(batch=(1, 1, 1))
        self.started = threading.Event()

    def engine_batch(self, config):
        return 1

    def generate(self, config, callback):
        from sdrt.pipeline import Cancelled

        self.started.set()
        for step in range(1, 100_000):
            time.sleep(0.01)
            wanted = callback(step, 100_000)
            if wanted is not None and not wanted:
                raise Cancelled("all rows dropped")
        raise AssertionError("never stopped")


def test_drain_end_gives_the_queued_and_then_the_running_requests_a_503():
    from sdrt.request import GenerationConfig, Prompts, Sampler, Size
    from sdrt.serve.jobs import Job, Scheduler, ShuttingDown

    fake = _EndlessPipeline()
    scheduler = Scheduler(lambda: fake, max_queue=4, max_batch=1, window_s=0.0)
    scheduler.start()
    config = GenerationConfig(Prompts(("x",), ("",)), Size(64, 64), Sampler(steps=2))
    running = scheduler.submit(Job(config, deadline=time.monotonic() + 600))
    assert fake.started.wait(30)
    queued = scheduler.submit(Job(config, deadline=time.monotonic() + 600))
    scheduler.begin_close(drain_s=0.05, running_s=2.0)
    with pytest.raises(ShuttingDown, match="before this request ran"):
        queued.result(timeout=30)
    with pytest.raises(ShuttingDown, match="while this request ran"):
        running.result(timeout=30)
    scheduler._thread.join(timeout=30)
    assert not scheduler._thread.is_alive()  # the worker stopped the generation and left


def _read_all(sock: socket.socket, within_s: float = 30.0) -> bytes:
    """What the server sends until it closes the connection (at most within_s)."""
    sock.settimeout(within_s)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.fixture(scope="module")
def strict_server(tiny_engines):
    live = LiveServer(ServeConfig(tiny_engines, backend="ort-cpu", read_timeout_s=0.5, max_header_bytes=8 * 1024))
    yield live
    live.stop()


def test_stalled_headers_get_a_408_and_the_connection_closes(strict_server):
    port = int(strict_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:  # slowloris: headers that never end
        sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\n")
        reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b'"timeout"' in reply
    with socket.create_connection(("127.0.0.1", port)) as sock:  # the same on a kept-alive connection
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(30)
        first = b""
        while not first.endswith(b'{"status":"ok"}'):  # the whole first answer
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 408")


def test_a_stalled_body_gets_a_json_408(strict_server):
    port = int(strict_server.url.rsplit(":", 1)[1])
    for path, code in (("/sdapi/v1/txt2img", lambda b: b["error"]), ("/v1/images/generations",
                                                                     lambda b: b["error"]["code"])):
        with socket.create_connection(("127.0.0.1", port)) as sock:  # declares 1,000 bytes, sends 10
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         "Content-Length: 1000\r\n\r\n".encode() + b'{"prompt":')
            head, _, body = _read_all(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and code(json.loads(body)) == "timeout"


def test_oversized_headers_are_refused(strict_server):
    r = httpx.get(f"{strict_server.url}/v1/models", headers={"X-Big": "a" * 100_000})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert httpx.get(f"{strict_server.url}/health", headers={"X-Small": "a" * 1000}).status_code == 200
