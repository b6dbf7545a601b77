"""Running the model during decoding: a block of tokens (a prompt, or the next turn of a
conversation already in the caches) and one token per row against the caches.

Speed (CPU, fp32; figures in ``bench/README.md``):

- ``run_block`` runs the output head on the last position only (a [B, P, V] head is a quarter of
  a 96-token prefill with SmolLM2-135M).
- ``DecodeStep`` has its own attention for one new token against the cache: the query heads that
  share a KV head are laid out as that head's query rows, so grouped-query attention never copies
  the cache out to all query heads (torchtune's ``expand().flatten()`` copies the whole cache
  twice per layer and step). Norms, RoPE, the MLP and the head are the model's modules. Models
  this does not fit (fusion / cross-attention layers, tensor-parallel DTensors, hidden states
  requested) decode through the model's own forward.
- ``compile_decoding(model)`` returns a ``CompiledDecodeStep``: the same step through
  ``torch.compile`` with inductor's freezing (on CPU each linear runs as a pre-packed MKL GEMM).
  Loops given it pad their batches to a power of two (one graph per batch size).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch._dynamo.exc import FailOnRecompileLimitHit
from torchtune.modules import MultiHeadAttention, TransformerDecoder, TransformerSelfAttentionLayer

from medcap.decoding.batch import Batch
from medcap.decoding.cache import KVCaches, decoder_of

log = logging.getLogger(__name__)


def fits_fast_path(decoder: TransformerDecoder) -> bool:
    """Self-attention layers only, plain (non-DTensor) weights, no hidden states requested."""
    return (
        not decoder.output_hidden_states
        and all(
            type(layer) is TransformerSelfAttentionLayer and isinstance(layer.attn, MultiHeadAttention)
            for layer in decoder.layers
        )
        and not any(hasattr(p, "full_tensor") for p in decoder.parameters())
    )


def _gathered(logits: torch.Tensor) -> torch.Tensor:
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits  # tensor-parallel output


def run_block(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``tokens`` [B, S] at the caches' next S positions; logits [B, V] after the last one."""
    decoder = decoder_of(model)
    if not fits_fast_path(decoder):
        with_images = {} if images is None else {"images": images}
        return _gathered(model(tokens, **with_images, mask=mask, input_pos=positions))[:, -1]
    if mask.shape[-1] > decoder.max_seq_len:
        raise ValueError(
            f"{mask.shape[-1]} positions are more than the model's max_seq_len ({decoder.max_seq_len})"
        )
    h = model.embed(tokens, images) if decoder is not model else decoder.tok_embeddings(tokens)
    for layer in decoder.layers:  # TransformerDecoder.forward, with the head on the last position only
        h = layer(h, mask=mask, input_pos=positions)
    return decoder.unembed(h[:, -1:])[:, -1]


def prefill(model: torch.nn.Module, batch: Batch, images: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, V] after the last prompt token; fills the KV caches with the prompts."""
    n = batch.prompt_len
    return run_block(model, batch.tokens, batch.masks[:, :n], batch.positions[:, :n], images)


def _attend(
    attn: MultiHeadAttention,
    x: torch.Tensor,
    input_pos: torch.Tensor,
    slot: torch.Tensor,
    mask: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """``MultiHeadAttention.forward`` for one new token per row ([B, 1, D]) against the cache,
    writing its key and value at ``slot``. The query heads sharing a KV head are that head's
    query rows ([B, KV, H/KV, hd]): the same head pairing as torchtune's expand, without the copy."""
    b = x.shape[0]
    heads, kv_heads, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(b, 1, heads, hd)
    k = attn.k_proj(x).view(b, 1, kv_heads, hd)
    v = attn.v_proj(x).view(b, 1, kv_heads, hd)
    if attn.pos_embeddings is not None:
        q = attn.pos_embeddings(q, input_pos=input_pos)
        k = attn.pos_embeddings(k, input_pos=input_pos)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, 1, hd]
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    k_cache.index_copy_(2, slot, k)
    v_cache.index_copy_(2, slot, v)
    q = q.reshape(b, kv_heads, heads // kv_heads, hd)
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask[:, None, None, :])
    return attn.output_proj(out.reshape(b, 1, heads * hd))


def decode_core(
    model: torch.nn.Module,
    token: torch.Tensor,
    input_pos: torch.Tensor,
    slot: torch.Tensor,
    mask: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """token [B], input_pos [B] (RoPE), slot [1] (cache position written), mask [B, L] (the
    slots each row sees, ``slot`` included), caches [(k, v) [B, KV, L, hd]] -> logits [B, V]."""
    decoder = decoder_of(model)
    h = model.tok_embeddings(token[:, None])
    pos = input_pos[:, None]
    for layer, (k_cache, v_cache) in zip(decoder.layers, caches):
        attn_out = _attend(layer.attn, layer.sa_norm(h), pos, slot, mask, k_cache, v_cache)
        h = layer.sa_scale(attn_out) + h
        h = h + layer.mlp_scale(layer.mlp(layer.mlp_norm(h)))
    return decoder.unembed(h)[:, -1]


class DecodeStep:
    """Logits [B, V] after feeding one token per row at a cache slot: eager."""

    compiled = False

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.fast = fits_fast_path(decoder_of(model))
        self.caches = KVCaches(model) if self.fast else None

    def rows_for(self, n: int) -> int:
        """Rows to decode ``n`` prompts with (filler rows decode pads and are dropped)."""
        return n

    def _core(self, token, input_pos, slot, mask, caches) -> torch.Tensor:
        return decode_core(self.model, token, input_pos, slot, mask, caches)

    def __call__(self, batch: Batch, token: torch.Tensor, pos: int) -> torch.Tensor:
        """``token`` [B] fed at slot ``pos`` (the slot the caches write next)."""
        if not self.fast:
            logits = self.model(token[:, None], mask=batch.masks[:, pos : pos + 1],
                                input_pos=batch.positions[:, pos : pos + 1])  # fmt: skip
            return _gathered(logits)[:, -1]
        # fresh, densely strided copies (a [1, L] slice keeps its parent's strides, which guard)
        mask = torch.empty_like(batch.masks[:, pos], memory_format=torch.contiguous_format).copy_(batch.masks[:, pos])
        input_pos = batch.positions[:, pos].clone(memory_format=torch.contiguous_format)
        slot = torch.tensor([pos], device=token.device)
        logits = self._core(token, input_pos, slot, mask, self.caches.tensors())
        self.caches.advance()
        return logits


class CompiledDecodeStep(DecodeStep):
    """``DecodeStep`` through ``torch.compile(fullgraph=True)`` with inductor's freezing.

    - Make it once the decoder's weights are final: they are baked into the compiled graph (a
      later in-place change to them is not seen; ``torch._dynamo.reset()`` forgets every graph).
    - Each batch size (a power of two: other sizes decode eagerly) compiles its own graph (~40 s
      on 2 CPU cores for SmolLM2-135M, less with a warm inductor cache) and keeps its own packed
      copy of the weights (~1.3x the fp32 weights on CPU): the loops pad batches to a power of
      two, so a run sees a few sizes at most. The cache length is a dynamic dimension.
    - torch.compile's recompile limit (``torch._dynamo.config.recompile_limit``, 8 graphs for all
      models and sizes together, those of deleted models included: a graph keeps its model's
      weights alive until ``torch._dynamo.reset()``) bounds the sizes and models; past it the
      step runs eagerly (same tokens, slower) and a warning says so.
    """

    compiled = True

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        decoder = decoder_of(model)
        if not self.fast:
            raise ValueError(f"{type(model).__name__}: compiled decoding needs plain self-attention layers")
        if any(type(p.data) is not torch.Tensor for p in decoder.parameters()):
            raise ValueError(f"{type(model).__name__}: compiled decoding needs plain weights (not NF4 or other subclasses)")
        self._compiled = torch.compile(decode_core, fullgraph=True)
        self._eager_sizes: set[int] = set()  # past the recompile limit

    def rows_for(self, n: int) -> int:
        return 1 << (n - 1).bit_length()

    def _core(self, token, input_pos, slot, mask, caches) -> torch.Tensor:
        rows = token.shape[0]
        if rows & (rows - 1) or rows in self._eager_sizes:  # other sizes (serving's changing rows): eager
            return decode_core(self.model, token, input_pos, slot, mask, caches)
        for t in (token, input_pos, mask):
            torch._dynamo.mark_static(t, 0)
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        for k, v in caches:
            torch._dynamo.mark_static(k, 0), torch._dynamo.mark_static(v, 0)
            torch._dynamo.maybe_mark_dynamic(k, 2), torch._dynamo.maybe_mark_dynamic(v, 2)
        try:
            # freezing must be on while dynamo traces (it then treats the parameters as
            # constants); torch.compile(options={"freezing": True}) alone packs nothing
            with self.caches.detached(), torch._inductor.config.patch(freezing=True):
                return self._compiled(self.model, token, input_pos, slot, mask, caches)
        except FailOnRecompileLimitHit:  # raised before anything ran: decode this size eagerly
            self._eager_sizes.add(rows)
            log.warning(
                "compiled decoding: torch._dynamo's recompile limit (%d graphs) is reached; %d-row steps "
                "of this model run eagerly", torch._dynamo.config.recompile_limit, rows,
            )  # fmt: skip
            return decode_core(self.model, token, input_pos, slot, mask, caches)


def compile_decoding(model: torch.nn.Module) -> CompiledDecodeStep:
    """The model's decode step, compiled (see ``CompiledDecodeStep``): pass it to the loops."""
    return CompiledDecodeStep(model)
