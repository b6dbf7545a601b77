"""Decoder builders torchtune 0.6.1 lacks, made from its own components.

SmolLM2 is a Llama-architecture model with tied input/output embeddings and plain RoPE:
torchtune's ``llama3`` builder has an untied head and ``llama3_2`` scales RoPE, so neither fits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torchtune.models.llama3 import llama3
from torchtune.modules import TiedLinear, TransformerDecoder


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


# Meta's model-parallel layout (llama3 reference code): the dimension each sharded weight is
# split along across consolidated.NN.pth files; anything else (norms) is replicated.
META_SHARD_DIMS = {
    "tok_embeddings.weight": 0,  # VocabParallelEmbedding
    "output.weight": 0,  # ColumnParallelLinear
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,  # RowParallelLinear
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
}


def _shard_dim(key: str) -> int | None:
    for suffix, dim in META_SHARD_DIMS.items():
        if key.endswith(suffix):
            return dim
    return None


def merge_meta_shards(shards: list[dict]) -> dict:
    """Meta's ``consolidated.00.pth`` ... ``consolidated.NN.pth`` -> one state dict."""
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for key in shards[0]:
        dim = _shard_dim(key)
        merged[key] = shards[0][key] if dim is None else torch.cat([s[key] for s in shards], dim=dim)
    return merged


def meta_llama_parts(
    ckpt_dir: str | Path, max_seq_len: int = 8192
) -> tuple[Callable[[], TransformerDecoder], dict, torch.dtype]:
    """A Meta-format Llama 3 / 3.1 folder (``params.json`` + ``consolidated.*.pth``): a builder
    for its decoder, its state dict in torchtune names (memory-mapped), and its dtype. The FFN
    width is read from the weights; ``use_scaled_rope`` selects Llama 3.1's scaled RoPE."""
    import json

    from torchtune.models.convert_weights import meta_to_tune

    ckpt_dir = Path(ckpt_dir)
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"{params_path} not found: --ckpt_dir must be a Meta-format Llama folder")
    params = json.loads(params_path.read_text())
    files = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir}: no consolidated.*.pth files")
    shards = [torch.load(f, map_location="cpu", weights_only=True, mmap=True) for f in files]
    state = meta_to_tune(merge_meta_shards(shards))
    kwargs = dict(
        vocab_size=params["vocab_size"],
        num_layers=params["n_layers"],
        num_heads=params["n_heads"],
        num_kv_heads=params.get("n_kv_heads", params["n_heads"]),
        embed_dim=params["dim"],
        max_seq_len=max_seq_len,
        intermediate_dim=int(state["layers.0.mlp.w1.weight"].shape[0]),
        norm_eps=params.get("norm_eps", 1e-5),
        rope_base=params.get("rope_theta", 500000.0),
    )
    if params.get("use_scaled_rope"):
        from torchtune.models.llama3_1._component_builders import llama3_1 as builder
    else:
        builder = llama3
    return (lambda: builder(**kwargs)), state, next(iter(state.values())).dtype


def load_meta_llama(ckpt_dir: str | Path, max_seq_len: int = 8192) -> TransformerDecoder:
    """A Meta-format Llama folder as a torchtune decoder on the CPU (one process)."""
    build, state, dtype = meta_llama_parts(ckpt_dir, max_seq_len)
    return decoder_from_state(build, state, dtype, f"Meta checkpoint in {ckpt_dir}")


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
    from torchtune.training import set_default_dtype

    from medcap.models.checkpoints import load_checked

    with set_default_dtype(dtype), torch.device("meta"):
        decoder = build()
    load_checked(decoder, state, what, assign=True)
    rope_init(decoder)
    return decoder
