"""``medcap serve``: the OpenAI client against a live server on loopback (plain, streamed, image,
text-only, multi-turn), answers equal to ``medcap.generation.generate``, 16 concurrent clients
batched, overload, bad input, auth, the CLI with chat_llama3.py as a client, and the page in a
real headless chromium."""

from __future__ import annotations

import base64
import csv
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from conftest import TinyLlama, draw_jpeg, load_tiny_decoder, make_hf_llama, write_meta_checkpoint
from omegaconf import OmegaConf
from torchtune import config
from torchtune.data import Message

from medcap.data.dataset import tokenize_chat
from medcap.data.images import load_image
from medcap.errors import ConfigError
from medcap.evaluation.tasks import user_message
from medcap.generation import generate
from medcap.models import assembly
from medcap.models.checkpoints import save_vision_checkpoint
from medcap.models.fusion import build_medcap_model
from medcap.serving.decoding import ContinuousBatch, Row, Sampling, nucleus_mask, pick_one
from medcap.serving.server import BackgroundServer, load
from medcap.serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
SPEC = TinyLlama(vocab_size=400, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=512)
N = 4  # image tokens
KEY = "sk-medcap-test-secret-0123"


def data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module", autouse=True)
def no_ambient_key():
    """A MEDCAP_API_KEY in the developer's environment must not leak into these servers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MEDCAP_API_KEY", raising=False)
        yield


@pytest.fixture(scope="module")
def ws(tmp_path_factory, chatml_tokenizer_json):
    root = tmp_path_factory.mktemp("serve")
    llm = write_meta_checkpoint(make_hf_llama(SPEC, seed=0, steerable=True), SPEC, root / "llm")
    torch.manual_seed(0)
    from medcap.data.chatml import ChatMLTokenizer

    model = build_medcap_model(load_tiny_decoder(SPEC, llm, "meta", root / "x"), vision="vit_tiny", num_image_tokens=N,
                               image_token_id=ChatMLTokenizer(chatml_tokenizer_json).image_id)  # fmt: skip
    save_vision_checkpoint(model, root / "checkpoint" / "meta_model_0.pt", epoch=0)
    images = root / "images"
    for i in range(4):
        jpeg = draw_jpeg(images / f"scan{i}.jpg", seed=i)
        load_image(jpeg).save(images / f"scan{i}.png")
    draw_jpeg(root / "secret.jpg", seed=9)  # outside image_root
    (images / "link.jpg").symlink_to(root / "secret.jpg")
    return {"root": root, "llm": llm, "tok": chatml_tokenizer_json, "images": images}


def serve_cfg(ws, *extra: str):
    """The generate recipe's shipped config, pointed at the tiny model, plus serving keys."""
    base = OmegaConf.load(ROOT / "recipes" / "configs" / "custom_generation_config.yaml")
    return OmegaConf.merge(base, OmegaConf.from_dotlist([
        *SPEC.overrides(), "device=cpu", "dtype=fp32", "temperature=0", "top_k=null", "max_new_tokens=8",
        "tokenizer._component_=medcap.data.chatml.chatml_tokenizer", f"tokenizer.path={ws['tok']}",
        f"checkpointer.checkpoint_dir={ws['llm']}", f"output_dir={ws['root'] / 'out'}", "vision=vit_tiny",
        f"vision_checkpoint={ws['root'] / 'checkpoint'}/meta_model_*.pt", f"image_root={ws['images']}",
        "batch_wait_ms=50", "max_body_mb=2", *extra,
    ]))  # fmt: skip


@pytest.fixture(scope="module")
def server(ws):
    with BackgroundServer(load(serve_cfg(ws, "max_batch_size=16", "log_level=error"))) as s:
        yield s


class Reference:
    """The evaluation's own path, with no server: ``tokenize_chat`` + the encoder's transform +
    ``medcap.generation.generate``, one prompt at a time."""

    def __init__(self, cfg):
        self.tokenizer = config.instantiate(cfg.tokenizer)
        from medcap.serving.server import pick_checkpoint

        self.model = assembly.build_model(cfg, self.tokenizer, torch.float32,
                                          vision_checkpoint=pick_checkpoint(cfg.vision_checkpoint)).eval()  # fmt: skip
        self.transform = self.model.visual.preprocess.transform()

    def prompt(self, messages: list[Message]) -> list[int]:
        tokens, _ = tokenize_chat(self.tokenizer, [*messages, Message(role="assistant", content="")], N,
                                  add_end_tokens=False)  # fmt: skip
        return tokens

    def ids(self, messages: list[Message], images: list[Path], max_new_tokens: int) -> list[int]:
        pixels = torch.stack([self.transform(load_image(p)) for p in images]) if images else None
        return generate(self.model, [self.prompt(messages)], pixels, max_new_tokens=max_new_tokens,
                        stop_tokens=self.tokenizer.stop_tokens, pad_id=self.tokenizer.pad_id)[0]  # fmt: skip

    def answer(self, messages: list[Message], images: list[Path], max_new_tokens: int) -> str:
        return self.tokenizer.decode(self.ids(messages, images, max_new_tokens))


@pytest.fixture(scope="module")
def ref(ws):
    return Reference(serve_cfg(ws))


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def image_question(path: Path, question: str, mime: str = "image/png") -> list[dict]:
    # text before the image, as OpenAI's examples write it: the server puts the image first, as trained
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": data_url(path, mime)}}]}]  # fmt: skip


# ---------------------------------------------------------------- the OpenAI client, answers = generate
def test_openai_client_plain_streamed_image_text_multiturn(server, ref, ws):
    c = client(server)
    name = c.models.list().data[0].id
    assert name == "medcap-llm-meta_model_0"
    img, question = ws["images"] / "scan0.png", "What modality is this image?"
    expected = ref.ids([user_message(img, question)], [img], 8)
    reply = c.chat.completions.create(model=name, messages=image_question(img, question), max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == ref.tokenizer.decode(expected) and expected
    assert reply.model == name and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.prompt_tokens == len(ref.prompt([user_message(img, question)]))

    chunks = list(c.chat.completions.create(model=name, messages=image_question(img, question), max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == reply.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected) and not chunks[-1].choices

    # text only: the LLM alone (so the server can be a judge)
    text_q = "Is this a CT scan of the chest?"
    only = c.chat.completions.create(model=name, messages=[{"role": "user", "content": text_q}], max_tokens=8)
    assert only.choices[0].message.content == ref.answer([Message(role="user", content=text_q)], [], 8)

    # a follow-up about the same image: the client resends the conversation, image included
    first = reply.choices[0].message.content
    follow = [*image_question(img, question), {"role": "assistant", "content": first},
              {"role": "user", "content": "Is it normal?"}]  # fmt: skip
    again = c.chat.completions.create(model=name, messages=follow, max_tokens=6)
    turns = [user_message(img, question), Message(role="assistant", content=first),
             Message(role="user", content="Is it normal?")]  # fmt: skip
    assert again.choices[0].message.content == ref.answer(turns, [img], 6)

    # DICOM as a browser sends a .dcm file (no type): recognised by its bytes
    dcm = c.chat.completions.create(model=name, messages=image_question(ct_small(), "Which organ?",
                                                                       "application/octet-stream"), max_tokens=5)
    assert dcm.choices[0].message.content == ref.answer([user_message(ct_small(), "Which organ?")], [ct_small()], 5)


def test_sampling_stop_and_length(server, ref, ws):
    c = client(server)
    img = ws["images"] / "scan1.png"
    messages = image_question(img, "Describe the image.")
    greedy = c.chat.completions.create(messages=messages, model="medcap-llm-meta_model_0", max_tokens=12)
    text = greedy.choices[0].message.content
    assert len(text) >= 3
    cut = c.chat.completions.create(messages=messages, model=greedy.model, max_tokens=12, stop=[text[1:3]])
    assert cut.choices[0].message.content == text[: text.find(text[1:3])]
    assert cut.choices[0].finish_reason == "stop"
    short = c.chat.completions.create(messages=messages, model=greedy.model, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    sampled = [c.chat.completions.create(messages=messages, model=greedy.model, max_tokens=10, temperature=1.0,
                                         seed=7).choices[0].message.content for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1]  # a seed reproduces a sampled answer
    nucleus = c.chat.completions.create(messages=messages, model=greedy.model, max_tokens=12, temperature=1.0,
                                        top_p=1e-6, seed=3)  # fmt: skip
    assert nucleus.choices[0].message.content == text  # the smallest nucleus is the greedy token


# ---------------------------------------------------------------- batching
def test_16_concurrent_clients_batched_and_equal_to_one_at_a_time(server, ws):
    c = client(server)
    questions = ["What modality is this?", "Which organ is shown?", "Describe the image.", "Is it abnormal?"]
    jobs = [dict(messages=image_question(ws["images"] / f"scan{i % 4}.png", questions[i // 4]), max_tokens=4 + i % 5)
            for i in range(12)]  # fmt: skip
    jobs += [dict(messages=[{"role": "user", "content": q}], max_tokens=6 + k) for k, q in enumerate(questions)]
    jobs += [dict(messages=image_question(ws["images"] / "scan3.png", "Colour?"), max_tokens=9, temperature=0.8,
                  seed=11)]  # a seeded sample decodes the same beside others  # fmt: skip

    def ask(job):
        r = c.chat.completions.create(model="medcap-llm-meta_model_0", **job)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens

    alone = [ask(job) for job in jobs]
    before = batch_histogram(server)
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    assert together == alone
    after = batch_histogram(server)
    over = lambda h, size: h["count"] - h[f"{size:.1f}"]  # noqa: E731 - decode steps with more rows than size
    assert over(after, 1) > over(before, 1)  # batches larger than 1
    assert over(after, 4) > over(before, 4)  # most of the 17 decoded together at some step


def batch_histogram(server, headers=None) -> dict[str, float]:
    """``medcap_batch_size`` from /metrics: observations (decode steps) per bucket, and the count."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", headers=headers).text
    family = next(f for f in text_string_to_metric_families(text) if f.name == "medcap_batch_size")
    out = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    out["count"] = next(s.value for s in family.samples if s.name.endswith("_count"))
    return out


def test_continuous_batching_equals_generate_with_staggered_joins(ref):
    """Rows joining a running batch (and one cache compaction) decode exactly as alone."""
    model, g, image = ref.model, torch.Generator().manual_seed(3), ref.model.image_token_id
    body = lambda n: torch.randint(5, 390, (n,), generator=g).tolist()  # noqa: E731
    img = [torch.randn(1, 3, 64, 64, generator=g) for _ in range(3)]
    prompts = [[1, *[image] * N, *body(9)], [1, *body(3)], [1, *body(2), *[image] * N, *body(4)], [1, *body(20)],
               [1, *[image] * N, *body(1)]]  # fmt: skip
    images = [img[0], None, img[1], None, img[2]]
    lengths = [12, 5, 9, 15, 7]
    alone = [generate(model, [p], im, max_new_tokens=m, stop_tokens=[2], pad_id=0)[0]
             for p, im, m in zip(prompts, images, lengths)]  # fmt: skip
    batch = ContinuousBatch(model, pad_id=0)
    rows = [Row(p, im, m, owner=k) for k, (p, im, m) in enumerate(zip(prompts, images, lengths))]
    out: dict[int, list[int]] = {k: [] for k in range(5)}

    def take(row, tok):
        if tok != 2:
            out[row.owner].append(tok)
        if tok == 2 or len(out[row.owner]) == row.max_new_tokens:
            batch.release(row)

    for row, tok in zip(rows[:2], batch.admit(rows[:2])):
        take(row, tok)
    joins, step = {2: rows[2:3], 3: rows[3:5]}, 0
    while batch.live or joins:
        step += 1
        for row, tok in zip(joins.get(step, []), batch.admit(joins.pop(step, []))):
            take(row, tok)
        if step == 6:
            batch.compact()
        for row, tok in batch.step():
            take(row, tok)
    assert [out[k] for k in range(5)] == alone
    assert batch.batch is None and all(a.kv_cache is None for a in batch.attention)  # freed when empty


def test_nucleus_and_seeded_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert nucleus_mask(logits, 0.7).tolist() == [[False, False, True, True]]  # 0.5 + 0.3 reaches 0.7
    assert nucleus_mask(logits, 0.5).tolist() == [[False, True, True, True]]
    assert nucleus_mask(logits, 1e-9).tolist() == [[False, True, True, True]]
    draws = lambda **kw: {pick_one(logits, Sampling(1.0, rng=torch.Generator().manual_seed(s), **kw))  # noqa: E731
                          for s in range(200)}  # fmt: skip
    assert draws(top_p=0.7) == {0, 1} and draws() == {0, 1, 2, 3} and draws(top_k=1) == {0}


# ---------------------------------------------------------------- overload, bad input, auth
def post(url: str, body, headers=None, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


def chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


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


def huge_png(width: int = 13000, height: int = 12000) -> bytes:
    """A PNG whose header announces 156M pixels (over MAX_PIXELS) in a few hundred bytes."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_body(url: str) -> dict:
    return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}],
                max_tokens=3)  # fmt: skip


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


# ---------------------------------------------------------------- the CLI, with chat_llama3.py as a client
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_overrides(ws) -> list[str]:
    return [
        *SPEC.overrides(), "device=cpu", "dtype=fp32", "temperature=0", "top_k=null", "max_new_tokens=8",
        "tokenizer._component_=medcap.data.chatml.chatml_tokenizer", f"tokenizer.path={ws['tok']}",
        f"checkpointer.checkpoint_dir={ws['llm']}", f"output_dir={ws['root'] / 'out'}", "vision=vit_tiny",
        f"vision_checkpoint={ws['root'] / 'checkpoint' / 'meta_model_0.pt'}",
    ]  # fmt: skip


def write_eval_csv(path: Path) -> Path:
    """A small evaluation CSV as the generate recipe writes it (the judge's input)."""
    rows = [("Is this a CT?", "Yes", "Yes", "CLOSED"), ("Which organ?", "Lung", "the left lung", "OPEN"),
            ("Is it normal?", "No", "Normal", "CLOSED"), ("What modality?", "MRI", "CT", "OPEN")]  # fmt: skip
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "instruction", "output", "generated", "index", "answer_type", "content_type", "qid"])
        for i, (q, gold, pred, kind) in enumerate(rows):
            w.writerow([f"img{i}.jpg", q, gold, pred, i, kind, "", 100 + i])
    return path


def test_cli_serve_judged_by_chat_llama3(ws, tmp_path, monkeypatch):
    """``python -m medcap.cli serve`` in its own process; chat_llama3.py's OpenAI backend judges a
    CSV against it (the server as a judge: text-only requests to the LLM alone)."""
    sys.path.insert(0, str(ROOT))
    import chat_llama3

    port = free_port()
    env = {**os.environ, "MEDCAP_API_KEY": KEY, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcap.cli", "serve", "--config", "custom_generation_config", *cli_overrides(ws),
         f"port={port}", "max_batch_size=4"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        name = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        csv_path = write_eval_csv(tmp_path / "test_out_slake_meta_model_0.csv")
        chat_llama3.main(["--backend", "openai", "--base_url", url + "/v1", "--model", name, "--exp", "eval_vqa",
                          "--csv_path", str(csv_path), "--max_gen_len", "6", "--retries", "1"])  # fmt: skip
        rows = list(csv.DictReader(open(tmp_path / "test_out_slake_meta_model_0_70B_out.csv", encoding="utf-8-sig")))
        assert len(rows) == 4 and all(r["verdict"] in ("right", "wrong", "unparsed") for r in rows)
        assert all(r["instruction"].startswith("Respond with only RIGHT or WRONG") for r in rows)
        summary = json.loads((tmp_path / "test_out_slake_meta_model_0_70B_summary.json").read_text())["all"]
        assert summary["n"] == 4
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "Uvicorn running" in out or "serving medcap-llm" in out, out[-2000:]
    assert KEY not in out  # the key never reaches the log


# ---------------------------------------------------------------- the page, in a real browser
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (make chromium)")
def test_page_in_headless_chromium(ws, tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    monkeypatch.setenv("MEDCAP_API_KEY", KEY)
    with BackgroundServer(load(serve_cfg(ws, "max_new_tokens=12", "log_level=error"))) as s, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.on("pageerror", lambda e: pytest.fail(f"page error: {e}"))
        page.goto(s.url + "/")
        assert "API key" in page.inner_text("#model")
        page.fill("#key", KEY)
        page.press("#key", "Tab")  # change event: the page asks /v1/models with the key
        page.wait_for_selector("#model strong")
        assert "medcap-llm-meta_model_0" in page.inner_text("#model")

        def ask(question: str, answers: int) -> str:
            page.fill("#question", question)
            page.click("#ask")
            done = page.wait_for_selector(f"#conversation li.assistant[data-done='true'] >> nth={answers - 1}",
                                          timeout=60_000)  # fmt: skip
            return done.inner_text()

        page.set_input_files("#file", str(ws["images"] / "scan0.png"))
        page.wait_for_selector("#preview:not([hidden])")
        first = ask("What modality is this image?", 1)
        assert "medcap-llm-meta_model_0" in first and "meta_model_0.pt" in first
        assert page.inner_text("#conversation li.assistant .text >> nth=0").strip()  # the answer appeared
        ask("Is it normal?", 2)  # a follow-up about the same image
        assert page.locator("#conversation li.user").count() == 2
        shot = tmp_path / "serve_page_png.png"
        page.screenshot(path=str(shot), full_page=True)

        dicom = ct_small()
        page.set_input_files("#file", str(dicom))  # a DICOM: shown windowed, as the model reads it
        # the PNG's preview stays shown until the page has read the new file, so wait for the
        # caption that names the DICOM rather than for a visible preview
        page.wait_for_function("name => document.getElementById('preview-caption').textContent.endsWith(name)",
                               arg=dicom.name)  # fmt: skip
        assert page.is_visible("#preview")
        assert "128\u00d7128 pixels" in page.inner_text("#preview-caption")
        assert page.locator("#conversation li").count() == 0  # a new image starts a new conversation
        ask("Which organ is shown?", 1)
        assert page.inner_text("#conversation li.assistant .text >> nth=0").strip()
        dicom_shot = tmp_path / "serve_page_dicom.png"
        page.screenshot(path=str(dicom_shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000 and dicom_shot.stat().st_size > 10_000
    print(f"screenshots: {shot} {dicom_shot}")


def test_serving_in_bf16_on_cpu(ws):
    """dtype=bf16 serves as evaluation runs: the LLM in bf16, the vision side fp32 under the
    worker thread's autocast; an image question is answered."""
    with BackgroundServer(load(serve_cfg(ws, "dtype=bf16", "log_level=error"))) as s:
        model = s.served.engine.model
        reply = client(s).chat.completions.create(
            model="medcap-llm-meta_model_0", messages=image_question(ws["images"] / "scan0.png", "What is this?"),
            max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
    assert {p.dtype for p in model.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.visual.parameters()} == {torch.float32}
