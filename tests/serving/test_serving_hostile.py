"""``medcap serve`` against what a careless or hostile client sends: every request a client can
get wrong is a 4xx with OpenAI's error object naming the field, never a 500; a client that hangs
up mid-body is counted apart (499) and logged as nothing; a fuzzer's bodies, values and URLs
never reach a 5xx."""

from __future__ import annotations

import base64
import functools
import json
import logging
import socket
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from helpers import draw_jpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import chat, image_body, post

ENDPOINT = "/v1/chat/completions"


def error(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def raw(url: str, body: bytes) -> httpx.Response:
    return httpx.post(url + ENDPOINT, content=body, headers={"Content-Type": "application/json"}, timeout=60)


def metric(url: str, status: str) -> float:
    line = f'medcap_requests_total{{endpoint="{ENDPOINT}",status="{status}"}}'
    for row in httpx.get(url + "/metrics").text.splitlines():
        if row.startswith(line):
            return float(row.split()[-1])
    return 0.0


def test_numbers_and_nesting_no_parser_can_hold_are_400s(server):
    url = server.url
    huge = "9" * 5000
    err = error(raw(url, f'{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": {huge}}}'.encode()))
    assert err["param"] == "max_tokens" and "5000 digits" in err["message"]
    err = error(raw(url, f'{{"messages": [{{"role": "user", "content": "hi"}}], "seed": -{huge}}}'.encode()))
    assert err["param"] == "seed"
    assert error(post(url, chat("hi", seed=2**64)))["param"] == "seed"  # beyond what a generator takes
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert error(raw(url, deep))["code"] == "invalid_json"
    deep_preview = b'{"image_url": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    resp = httpx.post(url + "/v1/preview", content=deep_preview, headers={"Content-Type": "application/json"})
    assert error(resp)["code"] == "invalid_json"
    assert post(url, chat("hi", max_tokens=1, top_k=10**15, temperature=1.0)).status_code == 200
    assert post(url, chat("Still serving?", max_tokens=2)).status_code == 200


def test_file_urls_that_cannot_be_resolved_are_400s(server, ws):
    url, images = server.url, ws["images"]
    loops = images / "loops"
    loops.mkdir(exist_ok=True)
    if not (loops / "a.png").is_symlink():
        (loops / "a.png").symlink_to(loops / "b.png")
        (loops / "b.png").symlink_to(loops / "a.png")
    field = "messages[0].content[0].image_url.url"
    for bad in (f"file://{loops / 'a.png'}", "file:loops/a.png", "file:scan0%00.png", f"file:{'x' * 6000}.png",
                f"file://{images}/{'y' * 300}/scan0.png", "file:%ff%fe.png"):  # fmt: skip
        err = error(post(url, image_body(bad)))
        assert err["param"] == field and err["code"] == "invalid_image", (bad[:60], err)
    assert post(url, image_body("file:scan0.png")).status_code == 200


def test_a_client_gone_mid_body_is_a_499_without_a_traceback(server, caplog):
    url = server.url
    caplog.set_level(logging.DEBUG, logger="medcap.serve")
    before_499, before_500 = metric(url, "499"), metric(url, "500")
    for _ in range(3):
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(b"POST " + ENDPOINT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n" + b'{"messages": [')  # fmt: skip
            time.sleep(0.1)
    deadline = time.monotonic() + 10
    while metric(url, "499") < before_499 + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "499") == before_499 + 3
    assert metric(url, "500") == before_500
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


# ------------------------------------------------------------------ a fuzzer's requests
@functools.cache
def scan_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        return draw_jpeg(Path(tmp) / "s.jpg", size=32).read_bytes()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)  # fmt: skip


@st.composite
def image_urls(draw) -> str:
    kind = draw(st.sampled_from(["data", "data_mutated", "file", "scheme", "text"]))
    mime = draw(st.sampled_from(["image/png", "image/jpeg", "application/dicom", "application/x-nifti",
                                 "application/gzip", "application/octet-stream", "", "text/plain"]))  # fmt: skip
    if kind == "data":
        payload = draw(st.binary(max_size=300))
        return f"data:{mime};base64,{base64.b64encode(payload).decode()}{draw(st.sampled_from(['', '#plane=axial', '#index=x', '#bad']))}"
    if kind == "data_mutated":  # a real image with bytes changed: decoders' own error paths
        data = bytearray(scan_bytes())
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        cut = draw(st.integers(1, len(data)))
        return f"data:{mime};base64,{base64.b64encode(bytes(data[:cut])).decode()}"
    if kind == "file":
        pieces = st.sampled_from([*"ab./%0#=&?~ \\", "%00", "..", "%2e", "\x00", "scan0.png", "loops/a.png",
                                  "n" * 300])  # fmt: skip
        name = "".join(draw(st.lists(pieces, max_size=12)))
        return draw(st.sampled_from(["file:", "file://", "file:///", "FILE://localhost/"])) + name
    if kind == "scheme":
        return draw(st.sampled_from(["http", "ftp", "gopher", "javascript", "data", "file", ""])) + ":" + draw(st.text(max_size=20))
    return draw(st.text(max_size=40))


@st.composite
def parts(draw):
    kind = draw(st.sampled_from(["text", "image", "junk"]))
    if kind == "text":
        return {"type": "text", "text": draw(st.text(max_size=30) | json_values)}
    if kind == "image":
        url = draw(image_urls())
        return {"type": "image_url", "image_url": draw(st.sampled_from([{"url": url}, url, {"url": url, "detail": "low"}]))}
    return draw(json_values)


@st.composite
def bodies(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    message = {"role": draw(st.sampled_from(["user", "system", "assistant", "developer", "tool", 7])),
               "content": draw(st.text(max_size=30) | st.lists(parts(), max_size=3) | json_values)}  # fmt: skip
    body = {"messages": draw(st.lists(st.just(message), min_size=0, max_size=2))}
    for field in draw(st.lists(st.sampled_from(["max_tokens", "max_completion_tokens", "temperature", "top_p",
                                                "top_k", "stop", "seed", "stream", "stream_options", "n", "model",
                                                "logprobs", "tools", "response_format", "user"]), max_size=4)):  # fmt: skip
        body[field] = draw(json_values)
    body.setdefault("max_tokens", 2)  # a valid request decodes a token or two, not the default
    return body


# values json.dumps cannot write, spliced into the text where max_tokens' value was
RAW_VALUES = ["9" * 5000, "-" + "1" * 30, "[" * 5000 + "]" * 5000, "1e999", "-0", "NaN", "Infinity", '"\\ud800"',
              '"\\u0000"', "0.0000001"]  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(bodies(), st.none() | st.sampled_from(RAW_VALUES))
def test_fuzzed_requests_never_get_a_5xx(server, body, raw_value):
    text = json.dumps(body, allow_nan=True)
    if raw_value is not None and isinstance(body, dict) and body.get("max_tokens") == 2:
        text = text.replace('"max_tokens": 2', f'"max_tokens": {raw_value}', 1)
    response = raw(server.url, text.encode())
    assert response.status_code < 500, (response.status_code, response.text[:300], text[:300])
    if response.status_code >= 400:
        error(response, response.status_code)


@pytest.fixture(scope="module", autouse=True)
def still_serving(server):
    yield
    assert post(server.url, chat("Still serving?", max_tokens=2)).status_code == 200
