"""What the server refuses and survives: overload (429), bad input (4xx naming the field),
timeouts, a failing worker, clients gone, images it cannot read, keys and exposure."""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from omegaconf import OmegaConf
from serving_helpers import KEY, chat, client, ct_small, data_url, huge_png, image_body, post, serve_cfg

from medcap.data.images import load_image
from medcap.errors import ConfigError
from medcap.serving.server import BackgroundServer, load
from medcap.serving.settings import ServeSettings


def test_overload_gets_429_never_hangs(ws):
    with BackgroundServer(load(serve_cfg(ws, "max_queue=2", "max_batch_size=2", "batch_wait_ms=0",
                                         "log_level=error"))) as s:  # fmt: skip
        body = chat("Describe the image in detail please.", max_tokens=120)
        with ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(lambda _: post(s.url, body), range(20)))
        codes = [r.status_code for r in replies]
        assert set(codes) <= {200, 429} and codes.count(200) >= 2 and codes.count(429) >= 1, codes
        refused = next(r for r in replies if r.status_code == 429)
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert post(s.url, chat("Hello?", max_tokens=3)).status_code == 200  # serves normally afterwards
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}
        text = httpx.get(s.url + "/metrics").text
        assert 'medcap_requests_total{endpoint="/v1/chat/completions",status="429"}' in text



def test_bad_input_is_a_4xx_with_a_message_and_the_server_keeps_serving(server, ws):
    url = server.url
    images = ws["images"]

    def error(response: httpx.Response, status: int) -> dict:
        assert response.status_code == status, (response.status_code, response.text)
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return err

    error(httpx.post(url + "/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}), 400)  # fmt: skip
    assert "JSON" in error(httpx.post(url + "/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"}), 400)["message"]  # fmt: skip
    error(httpx.post(url + "/v1/chat/completions", content=json.dumps(chat("hi")), headers={"Content-Type": "text/plain"}), 415)  # fmt: skip
    assert error(post(url, {"model": "x"}), 400)["param"] == "messages"
    assert error(post(url, chat("hi", temperature="hot")), 400)["param"] == "temperature"
    assert error(post(url, chat([{"type": "audio", "x": 1}])), 400)["param"] == "messages[0].content[0]"
    assert error(post(url, chat("hi", n=2)), 400)["message"] == "n: only n=1 is supported"
    assert error(post(url, chat("hi", model="gpt-4o")), 404)["code"] == "model_not_found"
    assert error(post(url, chat("hi", max_tokens=10_000)), 400)["code"] == "context_length_exceeded"
    not_image = "data:image/png;base64," + base64.b64encode(b"these bytes are not an image").decode()
    err = error(post(url, image_body(not_image)), 400)
    assert "cannot read the image" in err["message"] and err["param"] == "messages[0].content[0].image_url.url"
    assert "base64" in error(post(url, image_body("data:image/png;base64,@@@")), 400)["message"]
    huge = "data:image/png;base64," + base64.b64encode(huge_png()).decode()
    assert "over the limit of 150000000" in error(post(url, image_body(huge)), 400)["message"]
    assert "network" in error(post(url, image_body("https://example.org/x.png")), 400)["message"]
    outside = [ws["root"] / "secret.jpg", images / ".." / "secret.jpg", images / "link.jpg"]  # plain, .., symlink
    for path in outside:
        assert error(post(url, image_body(f"file://{path}")), 403)["code"] == "path_outside_image_root"
    assert error(post(url, image_body("file://../secret.jpg")), 400)["code"] == "invalid_image"  # a host: refused
    assert error(post(url, image_body("file:../secret.jpg")), 403)["code"] == "path_outside_image_root"
    assert error(post(url, chat("x" * 3_000_000)), 413)["code"] == "body_too_large"
    # files under image_root are fine, absolute or relative, and read as the same image
    by_path = post(url, image_body(f"file://{images / 'scan2.png'}")).json()["choices"][0]["message"]["content"]
    by_name = post(url, image_body("file:scan2.png")).json()["choices"][0]["message"]["content"]
    by_data = post(url, image_body(data_url(images / "scan2.png"))).json()["choices"][0]["message"]["content"]
    assert by_path == by_name == by_data
    assert post(url, chat("Still there?", max_tokens=2)).status_code == 200
    # the preview: what load_image made, as PNG
    preview = httpx.post(url + "/v1/preview", json={"image_url": {"url": data_url(ct_small(), "application/dicom")}})
    assert preview.status_code == 200 and preview.headers["content-type"] == "image/png"
    assert (preview.headers["X-Image-Width"], preview.headers["X-Image-Height"]) == ("128", "128")
    assert error(httpx.post(url + "/v1/preview", json={"image_url": {"url": not_image}}), 400)


def test_timeout_worker_error_and_disconnect_leave_the_server_serving(ws, monkeypatch):
    with BackgroundServer(load(serve_cfg(ws, "request_timeout_s=1", "max_new_tokens=200", "log_level=critical"))) as s:
        engine = s.served.engine
        real_step = engine.batch.step

        def slow_step():
            time.sleep(0.05)
            return real_step()

        monkeypatch.setattr(engine.batch, "step", slow_step)
        r = post(s.url, chat("Tell me a long story.", max_tokens=200))
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        with httpx.stream("POST", s.url + "/v1/chat/completions", json=chat("Again.", max_tokens=200, stream=True),
                          timeout=30) as streamed:  # fmt: skip
            lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
        assert streamed.status_code == 200 and '"timeout"' in lines[-2] and lines[-1] == "data: [DONE]"

        def broken_step():
            raise RuntimeError("simulated failure inside the model")

        monkeypatch.setattr(engine.batch, "step", broken_step)
        r = post(s.url, chat("Hello?", max_tokens=5))
        assert r.status_code == 500 and "simulated" not in r.text
        monkeypatch.setattr(engine.batch, "step", real_step)
        assert post(s.url, chat("Hello?", max_tokens=5)).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200


def test_a_client_gone_mid_stream_leaves_the_batch(server, monkeypatch):
    engine = server.served.engine
    real_step = engine.batch.step

    def slow_step():
        time.sleep(0.05)
        return real_step()

    monkeypatch.setattr(engine.batch, "step", slow_step)  # 200 tokens: 10 s if nobody stopped it
    start = time.monotonic()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat("Go.", max_tokens=200, stream=True),
                      timeout=30) as streamed:  # fmt: skip
        assert next(streamed.iter_lines()).startswith("data: ")
    while (engine.running or engine.waiting) and time.monotonic() < start + 10:
        time.sleep(0.02)
    assert not engine.running and not engine.batch.live and time.monotonic() - start < 5


def test_nifti_data_url_with_a_slice_selector(tmp_path):
    import nibabel as nib
    import numpy as np

    from medcap.serving.errors import APIError
    from medcap.serving.image_urls import decode_image_url

    volume = np.random.default_rng(0).normal(size=(20, 30, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "brain.nii.gz")
    url = data_url(tmp_path / "brain.nii.gz", "application/octet-stream")  # sniffed: gzip = NIfTI
    for selector in ("", "#plane=coronal&index=3"):  # the data path's slice, as from the file itself
        got = decode_image_url(url + selector, image_root=None, max_pixels=10**6, param="p")
        assert np.array_equal(np.asarray(got), np.asarray(load_image(f"{tmp_path / 'brain.nii.gz'}{selector}")))
    assert got.size == (20, 10)  # coronal: x by z
    with pytest.raises(APIError, match="selector"):
        decode_image_url(url + "#slice=3", image_root=None, max_pixels=10**6, param="p")
    with pytest.raises(APIError, match="over the limit"):
        decode_image_url(url, image_root=None, max_pixels=1000, param="p")  # 6000 voxels


def test_dicom_errors_name_no_tag_values(tmp_path):
    """A DICOM whose pixels do not decode: the reason, never a tag value."""
    import pydicom

    from medcap.serving.errors import APIError
    from medcap.serving.image_urls import decode_image_url

    ds = pydicom.dcmread(ct_small())
    ds.PatientName = "Secretname^Patient"
    ds.PixelData = ds.PixelData[:100]  # truncated pixels
    ds.save_as(tmp_path / "broken.dcm")
    with pytest.raises(APIError) as e:
        decode_image_url(data_url(tmp_path / "broken.dcm", "application/dicom"), image_root=None, max_pixels=10**8,
                         param="p")  # fmt: skip
    assert e.value.status == 400 and "DICOM" in e.value.message and "Secretname" not in e.value.message


def test_api_key_required_when_set(ws, monkeypatch, capfd):
    monkeypatch.setenv("MEDCAP_API_KEY", KEY)
    with BackgroundServer(load(serve_cfg(ws, "log_level=info"))) as s:
        assert s.served.settings.api_key == KEY and KEY not in repr(s.served.settings)
        assert httpx.get(s.url + "/health").status_code == 200  # load balancers need no key
        page = httpx.get(s.url + "/")  # nor does the page, which loads nothing from elsewhere
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = post(s.url, chat("hi"), headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key" and KEY not in r.text
            assert httpx.get(s.url + "/v1/models", headers=headers).status_code == 401
            assert httpx.get(s.url + "/metrics", headers=headers).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").chat.completions.create(model="medcap-llm-meta_model_0", messages=chat("hi")["messages"])
        ok = client(s, KEY).chat.completions.create(model="medcap-llm-meta_model_0", messages=chat("hi")["messages"])
        assert ok.choices[0].finish_reason in ("stop", "length")
    assert KEY not in capfd.readouterr().err


def test_exposure_and_settings_checks(ws):
    with pytest.raises(SystemExit, match="api_key"):
        ServeSettings(host="0.0.0.0").check_exposure()
    ServeSettings(host="0.0.0.0", insecure=True).check_exposure()
    ServeSettings(host="0.0.0.0", api_key="k").check_exposure()
    ServeSettings(host="::1").check_exposure()
    cfg = serve_cfg(ws, "host=0.0.0.0")
    with pytest.raises(SystemExit, match="insecure=True"):
        load(cfg)
    with pytest.raises(ValueError, match="did you mean max_queue"):
        load(serve_cfg(ws, "max_quue=3"))
    with pytest.raises(ValueError, match="max_queue"):
        ServeSettings.from_config(OmegaConf.create({"max_queue": 0}), environ={})
    # text where a number belongs (as the command line passes it) is a config error naming the key,
    # which the CLI prints as one line
    for key in ("batch_wait_ms", "request_timeout_s", "max_image_pixels"):
        with pytest.raises(ConfigError, match=f"{key}='?abc'?: expected"):
            ServeSettings.from_config(OmegaConf.create({key: "abc"}), environ={})
    assert ServeSettings.from_config(OmegaConf.create({"batch_size": 16}), environ={}).max_batch_size == 16
