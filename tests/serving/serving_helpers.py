"""What the serving tests share: the tiny model's config, the evaluation's own path as a
reference (``Reference``), clients and request bodies."""

from __future__ import annotations

import base64
import struct
import zlib
from pathlib import Path

import httpx
import openai
import torch
from helpers import TinyLlama
from omegaconf import OmegaConf
from torchtune import config
from torchtune.data import Message

from medcap.data.dataset import tokenize_chat
from medcap.data.images import load_image
from medcap.decoding import generate
from medcap.models import assembly

ROOT = Path(__file__).resolve().parents[2]
SPEC = TinyLlama(vocab_size=400, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=512)
N = 4  # image tokens
KEY = "sk-medcap-test-secret-0123"


def data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm"))


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


class Reference:
    """The evaluation's own path, with no server: ``tokenize_chat`` + the encoder's transform +
    ``medcap.decoding.generate``, one prompt at a time."""

    def __init__(self, cfg):
        self.tokenizer = config.instantiate(cfg.tokenizer)
        from medcap.models.checkpoints import latest_checkpoint
        from medcap.settings import GenerateSettings

        settings = GenerateSettings.from_config(cfg)
        self.model = assembly.build_model(settings, self.tokenizer, torch.float32,
                                          vision_checkpoint=latest_checkpoint(cfg.vision_checkpoint)).eval()  # fmt: skip
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


def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def image_question(path: Path, question: str, mime: str = "image/png") -> list[dict]:
    # text before the image, as OpenAI's examples write it: the server puts the image first, as trained
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": data_url(path, mime)}}]}]  # fmt: skip


def post(url: str, body, headers=None, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60, **kw)


def chat(content, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **extra}


def huge_png(width: int = 13000, height: int = 12000) -> bytes:
    """A PNG whose header announces 156M pixels (over MAX_PIXELS) in a few hundred bytes."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_body(url: str) -> dict:
    return chat([{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}],
                max_tokens=3)  # fmt: skip
