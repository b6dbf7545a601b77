"""``engine=vllm`` without vLLM: the Completions request medcap builds, the base64 round trip of the
prompt embeddings, vLLM's refusals as one-line errors, streaming, and the Answerer's answers
through a stand-in server (``vllm_fakes.FakeVLLM``) equal to medcap's own engine. The real vLLM
is tested in ``tests/test_vllm_engine.py`` (``make test-vllm``)."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from vllm_fakes import FakeVLLM, greedy_from_embeddings

from medcap.decoding import Sampling, generate
from medcap.engines import (
    ContextTooLong,
    EmbeddingWidthMismatch,
    ModelMismatch,
    VLLMClient,
    VLLMError,
    VLLMRequest,
    VLLMUnreachable,
    decode_embeds,
    encode_embeds,
)
from medcap.engines.remote import RemoteGenerator, prompt_embeddings, vllm_request
from medcap.errors import ConfigError
from medcap.models.fusion import build_medcap_model
from medcap.settings import GenerateSettings

IMG, N, DIM = 1000, 4, 64
STOP = 2


def never(embeds, body):
    return [7, 8, 9][: body["max_tokens"]]


@pytest.fixture
def model(tiny_decoder):
    torch.manual_seed(0)
    return build_medcap_model(tiny_decoder, image_token_id=IMG, vision="vit_tiny", num_image_tokens=N).eval()


def _prompts():
    g = torch.Generator().manual_seed(3)
    body = lambda n: torch.randint(5, 500, (n,), generator=g).tolist()  # noqa: E731
    return [[1, *[IMG] * N, *body(9)], [1, *body(3)], [1, *body(2), *[IMG] * N, *body(4)]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_embeddings_survive_base64_bit_for_bit():
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(7, 33).to(dtype)
        back = decode_embeds(encode_embeds(x))
        assert back.dtype == dtype and back.shape == x.shape
        assert torch.equal(back, x)
    with pytest.raises(ValueError, match=r"\[seq, hidden\]"):
        encode_embeds(torch.zeros(1, 2, 3))


def test_prompt_embeddings_are_what_medcaps_decoder_is_fed(model):
    prompts = _prompts()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    got = prompt_embeddings(model, prompts, images, pad_id=0)
    assert [e.shape for e in got] == [torch.Size([len(p), DIM]) for p in prompts]
    # each prompt alone: the same rows (the pads are cut off; the images go to their prompts)
    alone = [prompt_embeddings(model, [prompts[0]], images[:1], 0)[0],
             prompt_embeddings(model, [prompts[1]], None, 0)[0],
             prompt_embeddings(model, [prompts[2]], images[1:], 0)[0]]  # fmt: skip
    for a, b in zip(got, alone):
        torch.testing.assert_close(a, b)
    text = torch.tensor(prompts[1])
    assert torch.equal(got[1], model.tok_embeddings(text))  # the LLM's own table, untouched
    is_image = torch.tensor(prompts[0]) == IMG
    assert not torch.allclose(got[0][is_image], model.tok_embeddings(torch.zeros(N, dtype=torch.long)))


def test_the_request_vllm_gets():
    with FakeVLLM(never, hidden_size=DIM, max_model_len=64) as server:
        client = VLLMClient(server.url + "/v1/")  # OpenAI's base_url works too
        assert client.connect(hidden_size=DIM).id == "served-llm"
        greedy = vllm_request(Sampling(), max_new_tokens=5, stop_tokens=[STOP, 3], banned=[IMG, 10])
        body = client.body(torch.zeros(4, DIM), greedy)
        assert body["model"] == "served-llm" and body["max_tokens"] == 5 and body["temperature"] == 0.0
        assert body["return_token_ids"] is True and body["stop_token_ids"] == [STOP, 3]
        assert "top_k" not in body and "seed" not in body  # greedy: vLLM's defaults
        assert body["logit_bias"] == {"10": -100, "1000": -100}  # no vocabulary known: every banned id
        assert decode_embeds(body["prompt_embeds"]).shape == (4, DIM)
        rng = lambda: torch.Generator().manual_seed(5)  # noqa: E731
        sampled = [vllm_request(Sampling(temperature=0.7, top_k=20, top_p=0.9, rng=rng()), max_new_tokens=5,
                                stop_tokens=[STOP]) for _ in range(2)]  # fmt: skip
        body = client.body(torch.zeros(4, DIM), sampled[0])
        assert body["top_k"] == 20 and body["top_p"] == 0.9 and body["temperature"] == 0.7
        assert body["seed"] == client.body(torch.zeros(4, DIM), sampled[1])["seed"]  # the same seed again
        # stop tokens are cut from what comes back, and what follows them
        assert client.complete(torch.zeros(4, DIM), VLLMRequest(max_tokens=3, stop_token_ids=(8,))).token_ids == [7]


def test_unreachable_server_is_one_line_naming_the_url():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(VLLMUnreachable, match=rf"vllm_url={url}: no vLLM server answers there") as e:
        VLLMClient(url).models()
    assert "\n" not in str(e.value) and isinstance(e.value, ConfigError)
    with pytest.raises(ConfigError, match="expected http://HOST:PORT"):
        VLLMClient("localhost:8000")


def test_model_mismatch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 4096, "vocab_size": 128256}))
    with FakeVLLM(never, hidden_size=4096, root=str(tmp_path)) as server:
        with pytest.raises(ModelMismatch, match="hidden size 4096.*hidden size 64"):
            VLLMClient(server.url).connect(hidden_size=DIM, vocab_size=512)
        with pytest.raises(ModelMismatch, match=r"vllm_model=other: .* serves \['served-llm'\]"):
            VLLMClient(server.url, "other").connect(hidden_size=4096)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": DIM, "vocab_size": 128256}))
    with FakeVLLM(never, hidden_size=DIM, root=str(tmp_path)) as server:
        with pytest.raises(ModelMismatch, match="vocabulary 128256.*vocabulary of 512"):
            VLLMClient(server.url).connect(hidden_size=DIM, vocab_size=512)
        assert VLLMClient(server.url).connect(hidden_size=DIM, vocab_size=128256).hidden_size == DIM


def test_embedding_width_mismatch_found_by_the_probe():
    with FakeVLLM(never, hidden_size=128) as server:  # no readable config.json: the probe finds it
        with pytest.raises(EmbeddingWidthMismatch, match="medcap sends hidden size 64") as e:
            VLLMClient(server.url).connect(hidden_size=DIM)
        assert "\n" not in str(e.value)


def test_context_too_long_before_sending_and_from_vllm():
    with FakeVLLM(never, hidden_size=DIM, max_model_len=16) as server:
        client = VLLMClient(server.url)
        client.connect(hidden_size=DIM)
        with pytest.raises(ContextTooLong, match="prompt is 14 tokens .* max_tokens 3, over served-llm's context of 16"):
            client.complete(torch.zeros(14, DIM), VLLMRequest(max_tokens=3))
        sent = len(server.bodies)
        client.served = client.served.__class__(client.served.id, None)  # a server that did not say
        with pytest.raises(ContextTooLong, match="maximum context length is 16"):
            client.complete(torch.zeros(14, DIM), VLLMRequest(max_tokens=3))
        assert len(server.bodies) == sent + 1


def test_other_refusals_name_the_server():
    with FakeVLLM(never, hidden_size=DIM, refuse=(400, "You must set `--enable-prompt-embeds` to input `prompt_embeds`.")) as s:
        with pytest.raises(VLLMError, match="start it with --enable-prompt-embeds"):
            VLLMClient(s.url).connect(hidden_size=DIM)
    with FakeVLLM(never, hidden_size=DIM, refuse=(500, "engine dead")) as s:
        with pytest.raises(VLLMError, match=r"/v1/completions answered 500: engine dead"):
            VLLMClient(s.url).connect(hidden_size=DIM)


def test_streaming_gives_the_same_tokens(model):
    with FakeVLLM(greedy_from_embeddings(model), hidden_size=DIM) as server:
        client = VLLMClient(server.url)
        client.connect(hidden_size=DIM)
        embeds = prompt_embeddings(model, [_prompts()[1]], None, 0)[0]
        request = VLLMRequest(max_tokens=6)
        chunks = list(client.stream(embeds, request))
        assert [t for c in chunks for t in c.token_ids] == client.complete(embeds, request).token_ids
        assert len(chunks) == 6 and chunks[-1].finish_reason == "length"


def test_remote_generation_equals_medcaps_engine(model):
    """The plumbing, token for token: the embeddings sent, the ids back, stop tokens, the image
    placeholder banned; the stand-in decodes with no cache, medcap's engine with its KV cache."""
    prompts = _prompts()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=12, pad_id=0)
    ours = generate(model, prompts, images, stop_tokens=[STOP], **kwargs)
    stop = ours[0][3]  # a stop token that row 0 meets
    ours = generate(model, prompts, images, stop_tokens=[stop], **kwargs)
    with FakeVLLM(greedy_from_embeddings(model), hidden_size=DIM) as server:
        client = VLLMClient(server.url)
        client.connect(hidden_size=DIM, vocab_size=512)
        remote = RemoteGenerator(client, workers=3)
        theirs = remote.generate(model, prompts, images, stop_tokens=[stop], **kwargs)
        remote.close()
    assert theirs == ours
    assert len(ours[0]) == 3 and any(len(x) == 12 for x in ours)  # one row stopped, one ran to the end
    assert all("logit_bias" not in b for b in server.bodies)  # the placeholder (1000) is beyond the vocabulary


def test_engine_settings_are_checked():
    base = {"device": "cpu", "dtype": "fp32"}
    assert GenerateSettings.from_config(base).engine == "medcap"
    s = GenerateSettings.from_config({**base, "engine": "vllm", "vllm_url": "http://127.0.0.1:8001"})
    assert s.engine == "vllm" and s.vllm_model is None
    for bad, message in [
        ({"engine": "tgi"}, "engine=tgi: expected one of medcap, vllm"),
        ({"engine": "vllm"}, "engine=vllm needs vllm_url="),
        ({"vllm_url": "http://x:1"}, "read only with engine=vllm"),
        ({"engine": "vllm", "vllm_url": "x:1"}, "vllm_url=x:1: expected http://HOST:PORT"),
        ({"engine": "vllm", "vllm_url": "http://x:1", "vllm_timeout_s": 0}, "vllm_timeout_s=0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            GenerateSettings.from_config({**base, **bad})


def test_generate_recipe_fails_before_loading_when_no_vllm_answers(monkeypatch):
    from medcap.cli import load_recipe
    from medcap.models import assembly

    monkeypatch.setattr(assembly, "load_for_inference", lambda *a, **k: pytest.fail("the LLM was loaded"))
    url = f"http://127.0.0.1:{_free_port()}"
    settings = GenerateSettings.from_config({"device": "cpu", "dtype": "fp32", "engine": "vllm", "vllm_url": url})
    with pytest.raises(VLLMUnreachable, match=f"vllm_url={url}"):
        load_recipe("generate").EvaluationRecipe(settings)


def test_which_vllm_the_slow_tests_use(tmp_path, monkeypatch):
    from medcap.engines.launch import VLLM_PYTHON_ENV, find_vllm_python

    monkeypatch.delenv(VLLM_PYTHON_ENV, raising=False)
    assert find_vllm_python(tmp_path) is None  # no venv, no variable: the vLLM tests skip
    venv = tmp_path / ".vllm-venv" / "bin" / "python"
    venv.parent.mkdir(parents=True)
    venv.write_text("")
    assert find_vllm_python(tmp_path) == venv
    monkeypatch.setenv(VLLM_PYTHON_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="MEDCAP_VLLM_PYTHON=.*missing: no such file"):
        find_vllm_python(tmp_path)  # a variable naming nothing is an error, never a skip
