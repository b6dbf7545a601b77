"""Fixtures of the serving tests: a tiny model and images on disk, a live server, the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import draw_jpeg, load_tiny_decoder, make_hf_llama, write_meta_checkpoint
from serving_helpers import SPEC, N, Reference, serve_cfg

from medcap.data.images import load_image
from medcap.models.checkpoints import save_vision_checkpoint
from medcap.models.fusion import build_medcap_model
from medcap.serving.server import BackgroundServer, load


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


@pytest.fixture(scope="module")
def server(ws):
    with BackgroundServer(load(serve_cfg(ws, "max_batch_size=16", "log_level=error"))) as s:
        yield s


@pytest.fixture(scope="module")
def ref(ws):
    return Reference(serve_cfg(ws))
