"""The judge's big LLM: Meta's model-parallel shards (``consolidated.00.pth`` ... ``NN.pth``)
read lazily, tensor-parallel slicing so each rank reads only its slices, and 4-bit NF4 weights
for one GPU. Only ``chat_llama3.py`` (``medcap.evaluation.judge``) uses this.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torchtune.models.llama3 import llama3
from torchtune.modules import TransformerDecoder

from medcap.models.llms import decoder_from_state, rope_init

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


class ShardPieces:
    """One weight as Meta's model-parallel files hold it: pieces along ``dim``, memory-mapped and
    never concatenated whole unless asked, so a tensor-parallel rank reads only its slice."""

    def __init__(self, parts: list[torch.Tensor], dim: int):
        self.parts, self.dim = parts, dim
        shape = list(parts[0].shape)
        shape[dim] = sum(p.shape[dim] for p in parts)
        self.shape, self.dtype = torch.Size(shape), parts[0].dtype

    def full(self) -> torch.Tensor:
        return torch.cat(self.parts, dim=self.dim)

    def slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        if dim != self.dim:
            return torch.cat([p.narrow(dim, start, stop - start) for p in self.parts], dim=self.dim)
        out, offset = [], 0
        for part in self.parts:
            size = part.shape[dim]
            lo, hi = max(start, offset), min(stop, offset + size)
            if lo < hi:
                out.append(part.narrow(dim, lo - offset, hi - lo))
            offset += size
        return torch.cat(out, dim=dim)


def merge_meta_shards(shards: list[dict]) -> dict:
    """Meta's ``consolidated.00.pth`` ... ``consolidated.NN.pth`` -> one state dict whose split
    weights are ``ShardPieces`` (call ``materialize`` for plain tensors)."""
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for key in shards[0]:
        dim = _shard_dim(key)
        merged[key] = shards[0][key] if dim is None else ShardPieces([s[key] for s in shards], dim)
    return merged


def materialize(state: dict) -> dict:
    return {k: v.full() if isinstance(v, ShardPieces) else v for k, v in state.items()}


def _load_shard(path: Path) -> dict:
    import pickle

    from medcap.models.checkpoints import refuse_unsafe

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise refuse_unsafe(path, e) from e


def meta_llama_parts(
    ckpt_dir: str | Path, max_seq_len: int = 8192
) -> tuple[Callable[[], TransformerDecoder], dict, torch.dtype]:
    """A Llama 3 / 3.1 folder, Meta format (``params.json`` + ``consolidated.*.pth``) or HF
    format (``config.json`` + ``*.safetensors``): a builder for its decoder, its state dict in
    torchtune names (memory-mapped where the format allows), and its dtype. The FFN width is read
    from the weights; Llama 3.1's scaled RoPE is chosen from the config."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "params.json").is_file():
        from torchtune.models.convert_weights import meta_to_tune

        params = json.loads((ckpt_dir / "params.json").read_text())
        files = sorted(ckpt_dir.glob("consolidated.*.pth"))
        if not files:
            raise FileNotFoundError(f"{ckpt_dir}: no consolidated.*.pth files")
        shards = [_load_shard(f) for f in files]
        state = meta_to_tune(merge_meta_shards(shards))  # keys only: pieces stay lazy
        dims = dict(vocab_size=params["vocab_size"], num_layers=params["n_layers"], num_heads=params["n_heads"],
                    num_kv_heads=params.get("n_kv_heads", params["n_heads"]), embed_dim=params["dim"],
                    norm_eps=params.get("norm_eps", 1e-5), rope_base=params.get("rope_theta", 500000.0))  # fmt: skip
        scaled = bool(params.get("use_scaled_rope"))
    elif (ckpt_dir / "config.json").is_file():
        from safetensors.torch import load_file
        from torchtune.models.convert_weights import hf_to_tune

        config = json.loads((ckpt_dir / "config.json").read_text())
        files = sorted(ckpt_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{ckpt_dir}: no *.safetensors files")
        hf_state = {k: v for f in files for k, v in load_file(f).items()}
        if config.get("tie_word_embeddings"):
            raise ValueError(f"{ckpt_dir}: tied-embedding models (Llama 3.2 1B/3B) are not judge models here")
        heads, kv_heads, dim = (
            config["num_attention_heads"],
            config["num_key_value_heads"],
            config["hidden_size"],
        )
        state = hf_to_tune(hf_state, num_heads=heads, num_kv_heads=kv_heads, dim=dim)
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        dims = dict(vocab_size=config["vocab_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
                    num_kv_heads=kv_heads, embed_dim=dim, norm_eps=config.get("rms_norm_eps", 1e-5),
                    rope_base=rope.get("rope_theta", config.get("rope_theta", 500000.0)))  # fmt: skip
        scaled = rope.get("rope_type", rope.get("type")) == "llama3"
    else:
        raise FileNotFoundError(f"{ckpt_dir}: neither params.json (Meta format) nor config.json (HF format)")
    kwargs = dict(
        dims, max_seq_len=max_seq_len, intermediate_dim=int(state["layers.0.mlp.w1.weight"].shape[0])
    )
    if scaled:
        from torchtune.models.llama3_1._component_builders import llama3_1 as builder
    else:
        builder = llama3
    return (lambda: builder(**kwargs)), state, next(iter(state.values())).dtype


def load_tensor_parallel(
    ckpt_dir: str | Path, max_seq_len: int, device: torch.device, world_size: int, dtype: torch.dtype | None = None
) -> TransformerDecoder:
    """The decoder sharded over ``world_size`` processes with torchtune's Llama plan (the process
    group must exist); each rank reads only its own slice of each weight. ``dtype``: the
    checkpoint's own by default (fp32 on a CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module
    from torchtune.models.llama3._parallelism import base_llama_tp_plan
    from torchtune.training import prepare_mha_for_tp, set_default_dtype

    mesh = init_device_mesh(device.type, (world_size,))
    build, state, file_dtype = meta_llama_parts(ckpt_dir, max_seq_len)
    dtype = dtype or (torch.float32 if device.type == "cpu" else file_dtype)
    with set_default_dtype(dtype), torch.device("meta"):
        model = build()
    prepare_mha_for_tp(model, mesh)
    parallelize_module(model, mesh, base_llama_tp_plan())
    load_tensor_parallel_(model, state, device, dtype)
    with device:
        rope_init(model)
    return model


def load_meta_llama(ckpt_dir: str | Path, max_seq_len: int = 8192) -> TransformerDecoder:
    """A Llama folder (Meta or HF format) as a torchtune decoder on the CPU (one process)."""
    build, state, dtype = meta_llama_parts(ckpt_dir, max_seq_len)
    return decoder_from_state(build, materialize(state), dtype, f"checkpoint in {ckpt_dir}")


def load_tensor_parallel_(
    model: TransformerDecoder, state: dict, device: torch.device, dtype: torch.dtype
) -> None:
    """Give a tensor-parallel decoder (DTensor parameters on the meta device) its weights, each
    rank reading only its own slice of each sharded weight."""
    from torch.distributed.tensor import DTensor, Shard

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"checkpoint lacks {missing[:5]}")
    local_state = {}
    for key, param in expected.items():
        source = state[key]
        if isinstance(param, DTensor) and isinstance(param.placements[0], Shard):
            dim = param.placements[0].dim
            mesh = param.device_mesh
            world, rank = mesh.size(), mesh.get_local_rank()
            size = source.shape[dim]
            if size % world:
                raise ValueError(
                    f"{key}: dimension {dim} of size {size} does not split over {world} processes"
                )
            step = size // world
            piece = (
                source.slice(dim, rank * step, (rank + 1) * step)
                if isinstance(source, ShardPieces)
                else source.narrow(dim, rank * step, step)
            )
            local_state[key] = DTensor.from_local(
                piece.to(device, dtype).contiguous(), mesh, param.placements, run_check=False
            )
        else:
            full = source.full() if isinstance(source, ShardPieces) else source
            if isinstance(param, DTensor):
                local_state[key] = DTensor.from_local(
                    full.to(device, dtype), param.device_mesh, param.placements, run_check=False
                )
            else:
                local_state[key] = full.to(device, dtype)
    model.load_state_dict(local_state, strict=True, assign=True)


class NF4Linear(torch.nn.Module):
    """A frozen linear layer whose weight is a 4-bit NF4 tensor (torchao, as torchtune's QLoRA
    uses): about 0.5 bytes a weight, so a 70B judge fits one 80 GB GPU."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        from torchao.dtypes.nf4tensor import to_nf4

        self.weight = torch.nn.Parameter(to_nf4(weight), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.dtypes.nf4tensor import linear_nf4

        return linear_nf4(x, self.weight)


NF4_BLOCK = 64 * 256  # to_nf4's block size times its scaler block size


def quantize_nf4_(decoder: TransformerDecoder, device: torch.device) -> int:
    """Swap the decoder layers' linear weights for NF4 ones, one layer at a time on ``device``
    (the full-precision model never has to fit there). Returns how many were quantized."""
    count = 0
    for layer in decoder.layers:
        for name, module in list(layer.named_modules()):
            if (
                not isinstance(module, torch.nn.Linear)
                or module.bias is not None
                or module.weight.numel() % NF4_BLOCK
            ):
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, name.rsplit(".", 1)[-1], NF4Linear(module.weight.detach().to(device)))
            count += 1
    return count
