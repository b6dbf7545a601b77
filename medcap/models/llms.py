"""Decoder builders torchtune 0.6.1 lacks, made from its own components, and building a
decoder straight from a checkpoint's tensors.

SmolLM2 is a Llama-architecture model with tied input/output embeddings and plain RoPE:
torchtune's ``llama3`` builder has an untied head and ``llama3_2`` scales RoPE, so neither fits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchtune.models.llama3 import llama3
from torchtune.modules import TiedLinear, TransformerDecoder
from torchtune.training import set_default_dtype

from medcap.models.checkpoints import load_checked


def tied_llama3(
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: int | None = None,
    norm_eps: float = 1e-5,
    rope_base: int = 500_000,
) -> TransformerDecoder:
    """``torchtune.models.llama3.llama3`` with the output head tied to the token embedding."""
    decoder = llama3(
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        norm_eps=norm_eps,
        rope_base=rope_base,
    )
    del decoder.output  # a registered Linear; TiedLinear is not a module
    decoder.output = TiedLinear(decoder.tok_embeddings)
    return decoder


def smollm2_135m(max_seq_len: int = 8192) -> TransformerDecoder:
    """SmolLM2-135M(-Instruct): 30 layers, width 576, 9 heads, 3 KV heads, FFN 1536, vocab 49152,
    RoPE base 100000, tied embeddings."""
    return tied_llama3(
        vocab_size=49152,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        embed_dim=576,
        max_seq_len=max_seq_len,
        intermediate_dim=1536,
        norm_eps=1e-5,
        rope_base=100000,
    )


def rope_init(decoder: torch.nn.Module) -> None:
    """RoPE caches are buffers computed at init: a decoder built on the meta device redoes them."""
    for module in decoder.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()


def decoder_from_state(
    build: Callable[[], TransformerDecoder], state: dict, dtype: torch.dtype, what: str
) -> TransformerDecoder:
    """Build on the meta device and take the checkpoint's (memory-mapped) tensors: no random
    init of billions of weights, no second copy in host memory."""
    with set_default_dtype(dtype), torch.device("meta"):
        decoder = build()
    load_checked(decoder, state, what, assign=True)
    rope_init(decoder)
    return decoder
