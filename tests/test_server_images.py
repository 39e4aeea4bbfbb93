"""Images in over HTTP: A1111's /sdapi/v1/img2img through webuiapi, OpenAI's /v1/images/edits through
the openai client, batching of image requests, and every bad image input answered with a 4xx."""

from __future__ import annotations

import base64

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from sdrt.pipeline import Pipeline  # noqa: E402
from sdrt.serve.config import ServeConfig  # noqa: E402
from tests.pictures import b64, box_mask, png_bytes  # noqa: E402
from tests.pictures import noise_picture as picture  # noqa: E402
from tests.test_server import TOKEN, LiveServer, decode, direct, server  # noqa: E402,F401 (fixtures)


def test_webuiapi_img2img_and_inpainting_match_the_pipeline(server, direct):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=int(server.url.rsplit(":", 1)[1]), sampler="Euler", steps=4,
                            username="user", password=TOKEN)
    image = picture()
    result = api.img2img(images=[image], prompt="a dog", seed=11, cfg_scale=5, width=64, height=64,
                         denoising_strength=0.6, batch_size=2)
    assert result.info["all_seeds"] == [11, 12] and result.info["denoising_strength"] == 0.6
    want = direct.generate(direct.make_config(["a dog"] * 2, image=image, strength=0.6, steps=4, guidance=5,
                                              seeds=[11, 12], scheduler="euler")).images
    for got, expected in zip(result.images, want):
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), expected)
    assert "Denoising strength: 0.6" in result.images[0].info["parameters"]

    # webuiapi's own defaults ask for A1111's "only masked" and "fill": refused by name with the fix
    with pytest.raises(Exception, match="inpaint_full_res"):
        api.img2img(images=[image], mask_image=box_mask(), prompt="a dog", seed=3, width=64, height=64)
    result = api.img2img(images=[image], mask_image=box_mask(), prompt="a dog", seed=3, width=64, height=64,
                         inpaint_full_res=False, inpainting_fill=1, mask_blur=2, cfg_scale=5)
    want = direct.generate(direct.make_config("a dog", image=image, mask_image=box_mask(), strength=0.75, steps=4,
                                              guidance=5, seed=3, scheduler="euler", mask_blur=2)).images[0]
    np.testing.assert_array_equal(np.asarray(result.image.convert("RGB")), want)


def test_openai_client_edits_match_the_pipeline(server, direct):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=TOKEN, max_retries=0)
    image = picture(seed=4)
    # OpenAI's mask: the transparent pixels are the ones to edit
    alpha = 255 - np.asarray(box_mask())
    mask = Image.fromarray(np.dstack([np.zeros((64, 64, 3), np.uint8), alpha]), "RGBA")
    response = client.images.edit(image=("in.png", png_bytes(image), "image/png"), mask=("m.png", png_bytes(mask), "image/png"),
                                  prompt="a red cube", n=2, size="64x64", response_format="b64_json",
                                  extra_body={"seed": 5, "steps": 3})
    want = direct.generate(direct.make_config(["a red cube"] * 2, image=image, mask_image=box_mask(), strength=1.0,
                                              steps=3, seeds=[5, 6], scheduler="dpmpp_2m_karras")).images
    assert len(response.data) == 2
    for item, expected in zip(response.data, want):
        np.testing.assert_array_equal(decode(item.b64_json)[0], expected)
    # no mask and an opaque image: img2img at the strength asked
    response = client.images.edit(image=("in.png", png_bytes(image), "image/png"), prompt="a red cube",
                                  response_format="b64_json", extra_body={"seed": 5, "steps": 4, "strength": "0.5"})
    want = direct.generate(direct.make_config("a red cube", image=image, strength=0.5, steps=4, seed=5,
                                              scheduler="dpmpp_2m_karras")).images[0]
    np.testing.assert_array_equal(decode(response.data[0].b64_json)[0], want)
    with pytest.raises(openai.BadRequestError, match="mask is 32x32 pixels but the image is 64x64"):
        client.images.edit(image=("in.png", png_bytes(image), "image/png"), mask=("m.png", png_bytes(box_mask(32, 32)), "image/png"),
                           prompt="x", extra_body={"steps": 2})


def test_image_requests_batch_together_when_their_settings_match(tiny_engines):
    """Two img2img requests of the same size and strength share engine calls; each gets its own image."""
    import concurrent.futures

    live = LiveServer(ServeConfig(tiny_engines, backend="ort-cpu", batch_window_s=0.5))
    try:
        direct = Pipeline.load(tiny_engines, backend="ort-cpu")
        before = live.metric("sdrt_batch_rows_count")
        bodies = [{"prompt": f"p{i}", "init_images": [b64(picture(seed=i))], "seed": 10 + i, "steps": 3,
                   "denoising_strength": 0.7, "sampler_name": "Euler", "width": 64, "height": 64} for i in range(2)]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda b: httpx.post(f"{live.url}/sdapi/v1/img2img", json=b, timeout=60), bodies))
        assert [r.status_code for r in replies] == [200, 200]
        assert live.metric("sdrt_batch_rows_count") - before == 1, "one engine batch for both requests"
        for i, r in enumerate(replies):
            want = direct.generate(direct.make_config(f"p{i}", image=picture(seed=i), strength=0.7, steps=3,
                                                      seed=10 + i, scheduler="euler", guidance=7.0)).images[0]
            assert np.abs(decode(r.json()["images"][0])[0].astype(int) - want.astype(int)).max() <= 1
    finally:
        live.stop()


TRUNCATED = base64.b64encode(png_bytes(picture())[:300]).decode()


@pytest.mark.parametrize("body,match", [
    ({"init_images": ["bm90IGFuIGltYWdl"]}, "not a readable image"),  # "not an image"
    ({"init_images": [TRUNCATED]}, "not a readable image"),
    ({"init_images": ["%%%"]}, "not base64"),
    ({"init_images": [b64(picture())], "mask": b64(box_mask(32, 32)), "inpainting_fill": 1}, "the mask is 32x32"),
    ({"init_images": [b64(picture())], "denoising_strength": 0}, r"strength must be a number in \(0, 1\]"),
    ({"init_images": [b64(picture())], "denoising_strength": 1.5}, r"strength must be a number in \(0, 1\]"),
    ({"init_images": [b64(picture(2000, 1500))]}, "pass width and height"),
    ({"init_images": [b64(picture())], "resize_mode": 1}, "resize_mode"),
    ({"init_images": [b64(picture())], "mask": b64(box_mask()), "inpainting_fill": 0}, "inpainting_fill 0"),
    ({"init_images": []}, "init_images must hold 1 image"),
])
def test_bad_img2img_requests_get_a_400_naming_the_fix(server, body, match):
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", headers=server.headers(), timeout=60,
                   json={"prompt": "x", "steps": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "bad_request" and __import__("re").search(match, r.json()["detail"]), r.json()


def test_image_bodies_get_the_larger_limit_and_a_413_above_it(tiny_engines):
    live = LiveServer(ServeConfig(tiny_engines, backend="ort-cpu", max_image_body_bytes=200_000))
    try:
        big = {"prompt": "x", "steps": 2, "init_images": [b64(picture(256, 256))]}  # ~260 KB of base64
        assert len(b64(picture(256, 256))) > 200_000
        r = httpx.post(f"{live.url}/sdapi/v1/img2img", json=big, timeout=60)
        assert r.status_code == 413 and r.json()["error"] == "too_large"
        r = httpx.post(f"{live.url}/v1/images/edits", files={"image": ("a.png", png_bytes(picture(256, 256)) * 2)},
                       data={"prompt": "x"}, timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"  # OpenAI's error shape
        small = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "init_images": [b64(picture(150, 150))]}
        assert len(json_bytes(small)) > live.config.max_body_bytes  # over the JSON limit, under the image one
        assert httpx.post(f"{live.url}/sdapi/v1/img2img", json=small, timeout=60).status_code == 200
    finally:
        live.stop()


def json_bytes(body: dict) -> bytes:
    import json

    return json.dumps(body).encode()


def test_edits_without_an_image_or_multipart_get_openai_400s(server):
    h = server.headers()
    r = httpx.post(f"{server.url}/v1/images/edits", headers=h, data={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and "`image` file" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/images/edits", headers=h, json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(f"{server.url}/v1/images/edits", headers=h, files={"image": ("a.png", b"junk")},
                   data={"prompt": "x", "n": "two"}, timeout=30)
    assert r.status_code == 400 and "n must be" in r.json()["error"]["message"]
