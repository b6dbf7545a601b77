"""``medcap serve engine=vllm`` against a stand-in vLLM (``vllm_fakes.FakeVLLM``) that decodes
the prompt embeddings it receives with the same frozen decoder: the served API is unchanged
(whole and streamed answers equal the evaluation path's; stop strings; usage), and vLLM's
failures are the API's errors (400 over its context, 503 when it is gone, 500 when it fails)."""

from __future__ import annotations

import openai
import pytest
import torch
from serving_helpers import image_question, serve_cfg
from torchtune.data import Message
from vllm_fakes import FakeVLLM, greedy_from_embeddings

from medcap.evaluation.tasks import user_message
from medcap.serving.server import BackgroundServer, load
from medcap.serving.vllm_engine import VLLMEngine


def never(embeds, body):
    return [5]


@pytest.fixture(scope="module")
def fake():
    with FakeVLLM(never, hidden_size=64, max_model_len=300) as server:
        yield server


@pytest.fixture(scope="module")
def vserver(ws, fake, ref):
    served = load(serve_cfg(ws, "engine=vllm", f"vllm_url={fake.url}", "max_batch_size=4", "log_level=error"))
    assert isinstance(served.engine, VLLMEngine)
    # the server holds only the LLM's embedding table; the stand-in decodes with the whole LLM
    assert len(served.engine.model.decoder.layers) == 0 and served.engine.batch is None
    assert torch.equal(served.engine.model.tok_embeddings.weight, ref.model.tok_embeddings.weight)
    fake.decode = greedy_from_embeddings(ref.model)
    with BackgroundServer(served) as s:
        yield s


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)


def test_answers_and_streams_equal_the_evaluation_path(vserver, ref, ws):
    image, question = ws["images"] / "scan1.png", "What modality is this image?"
    messages = image_question(image, question)
    client, name = _client(vserver), vserver.served.info.name
    whole = client.chat.completions.create(model=name, messages=messages, max_tokens=8)
    chunks = list(client.chat.completions.create(model=name, messages=messages, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = ref.answer([user_message(image, question)], [image], 8)
    assert whole.choices[0].message.content == streamed == expected
    assert len(chunks) > 3  # streamed in pieces, not at once
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens > 0
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_stop_strings_and_max_tokens(vserver, ref):
    client, name = _client(vserver), vserver.served.info.name
    messages = [{"role": "user", "content": "Is this an MRI?"}]
    full = client.chat.completions.create(model=name, messages=messages, max_tokens=8).choices[0].message.content
    assert full == ref.answer([Message("user", "Is this an MRI?")], [], 8)
    assert len(full) > 2
    stop = full[1:3]
    cut = client.chat.completions.create(model=name, messages=messages, max_tokens=8, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    one = client.chat.completions.create(model=name, messages=messages, max_tokens=1)
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 1


def test_vllms_context_bounds_the_served_one(vserver):
    assert vserver.served.info.max_seq_len == 300  # vLLM's 300, under the decoder's 512
    with pytest.raises(openai.BadRequestError, match="over the model's context of 300"):
        _client(vserver).chat.completions.create(model=vserver.served.info.name, max_tokens=299,
                                                 messages=[{"role": "user", "content": "Is this an MRI?"}])  # fmt: skip


def test_vllm_failures_are_api_errors(vserver, fake):
    client, name = _client(vserver), vserver.served.info.name
    messages = [{"role": "user", "content": "Is this an MRI?"}]
    fake.refuse = (500, "EngineCore died")
    try:
        with pytest.raises(openai.InternalServerError, match="EngineCore died") as e:
            client.chat.completions.create(model=name, messages=messages, max_tokens=4)
        assert fake.url not in str(e.value)
    finally:
        fake.refuse = None
    url = vserver.served.engine.client.url
    vserver.served.engine.client.url = "http://127.0.0.1:9"  # nothing listens there
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(model=name, messages=messages, max_tokens=4)
        assert e.value.status_code == 503 and "not answering" in str(e.value)
    finally:
        vserver.served.engine.client.url = url
    assert client.chat.completions.create(model=name, messages=messages, max_tokens=4).choices[0].message.content
