"""Batched decoding with images and a KV cache (torchtune's ``generate`` cannot pass images),
in gpt-fast's three parts: ``prefill`` runs the left-padded prompts (and their images, through
the fused model) once, ``decode_step`` feeds one token per row, and ``generate`` loops.

Greedy when ``temperature == 0``; otherwise temperature / top-k sampling from a seeded
generator. Each row stops at its own stop token.

Speed (CPU, fp32; numbers in the decoding performance notes):

- ``prefill`` runs the output head on the last position only (a [B, P, V] head is a quarter of
  a 96-token prefill with SmolLM2-135M).
- ``decode_step`` has its own attention for one new token against the cache: the query heads
  that share a KV head are laid out as that head's query rows, so grouped-query attention never
  copies the cache out to all query heads (torchtune's ``expand().flatten()`` copies the whole
  cache twice per layer and step). Norms, RoPE, the MLP and the head are the model's modules.
  Models this does not fit (fusion / cross-attention layers, tensor-parallel DTensors, hidden
  states requested) decode through the model's own forward.
- ``compile_decoding(model)`` (opt-in) makes ``decode_step`` use ``torch.compile`` with
  inductor's freezing: the weights become constants and, on CPU, each linear runs as a
  pre-packed MKL GEMM. One graph per batch size (``generate`` pads the batch to a power of two
  for it), the cache length is dynamic. See ``compile_decoding`` for the costs.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._dynamo.exc import FailOnRecompileLimitHit
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask, sample
from torchtune.modules import MultiHeadAttention, TransformerDecoder, TransformerSelfAttentionLayer
from torchtune.modules.common_utils import delete_kv_caches

from medcap.models.fusion import MedcapModel

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """Left-padded prompts and, for every position up to ``total``, the causal mask and the
    RoPE positions (pads do not count)."""

    tokens: torch.Tensor  # [B, prompt_len]
    masks: torch.Tensor  # [B, total, total]
    positions: torch.Tensor  # [B, total]

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1]


def left_pad(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, device: torch.device, rows: int | None = None
) -> Batch:
    """``rows`` > len(prompts) adds filler rows (pads that attend only to themselves), for a
    compiled ``decode_step`` whose batch size is fixed."""
    n = len(prompts)
    rows = n if rows is None else max(rows, n)
    prompt_len = max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    tokens = torch.full((rows, prompt_len), pad_id, dtype=torch.long, device=device)
    padding = torch.zeros(rows, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        padding[row, prompt_len - len(prompt) :] = True
    masks = get_causal_mask_from_padding_mask(padding, target_seq_len=total)
    return Batch(tokens, masks, get_position_ids_from_padding_mask(padding))


# ---------------------------------------------------------------------------- model plumbing
def _decoder(model: MedcapModel | TransformerDecoder) -> TransformerDecoder:
    return model.decoder if isinstance(model, MedcapModel) else model


_FITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fits_fast_path(decoder: TransformerDecoder) -> bool:
    """Self-attention layers only, plain (non-DTensor) weights, no hidden states requested."""
    fits = _FITS.get(decoder)
    if fits is None:
        fits = (
            not decoder.output_hidden_states
            and all(
                type(layer) is TransformerSelfAttentionLayer and isinstance(layer.attn, MultiHeadAttention)
                for layer in decoder.layers
            )
            and not any(hasattr(p, "full_tensor") for p in decoder.parameters())
        )
        _FITS[decoder] = fits
    return fits


def _gathered(logits: torch.Tensor) -> torch.Tensor:
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits  # tensor-parallel output


# ---------------------------------------------------------------------------- prefill
def prefill(model: MedcapModel | TransformerDecoder, batch: Batch, images: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, V] after the last prompt token; fills the KV caches with the prompts."""
    n = batch.prompt_len
    return run_block(model, batch.tokens, batch.masks[:, :n], batch.positions[:, :n], images)


def run_block(
    model: MedcapModel | TransformerDecoder,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    images: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed ``tokens`` [B, S] at the caches' next S positions (a prompt, or the next turn of a
    conversation already in the caches); logits [B, V] after the last one."""
    decoder = _decoder(model)
    if not _fits_fast_path(decoder):
        with_images = {} if images is None else {"images": images}
        return _gathered(model(tokens, **with_images, mask=mask, input_pos=positions))[:, -1]
    if mask.shape[-1] > decoder.max_seq_len:
        raise ValueError(
            f"{mask.shape[-1]} positions are more than the model's max_seq_len ({decoder.max_seq_len})"
        )
    if isinstance(model, MedcapModel):
        h = model.embed(tokens, images)
    else:
        h = decoder.tok_embeddings(tokens)
    for layer in decoder.layers:  # TransformerDecoder.forward, with the head on the last position only
        h = layer(h, mask=mask, input_pos=positions)
    return decoder.unembed(h[:, -1:])[:, -1]


# ---------------------------------------------------------------------------- one decoding step
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


def _decode_core(
    model: MedcapModel | TransformerDecoder,
    token: torch.Tensor,
    input_pos: torch.Tensor,
    slot: torch.Tensor,
    mask: torch.Tensor,
    caches: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """token [B], input_pos [B] (RoPE), slot [1] (cache position written), mask [B, L] (the
    slots each row sees, ``slot`` included), caches [(k, v) [B, KV, L, hd]] -> logits [B, V]."""
    decoder = _decoder(model)
    h = model.tok_embeddings(token[:, None])
    pos = input_pos[:, None]
    for layer, (k_cache, v_cache) in zip(decoder.layers, caches):
        attn_out = _attend(layer.attn, layer.sa_norm(h), pos, slot, mask, k_cache, v_cache)
        h = layer.sa_scale(attn_out) + h
        h = h + layer.mlp_scale(layer.mlp(layer.mlp_norm(h)))
    return decoder.unembed(h)[:, -1]


_COMPILED: weakref.WeakSet = weakref.WeakSet()
_UNCOMPILABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> batch sizes past the limit
_compiled_core = None


def compile_decoding(model: MedcapModel | TransformerDecoder) -> None:
    """Opt in: from now on ``decode_step`` (hence ``generate`` and the serving layer) runs this
    model's steps through ``torch.compile(fullgraph=True)`` with inductor's freezing.

    - Call it once the decoder's weights are final: they are baked into the compiled graph (a
      later in-place change to them is not seen; ``torch._dynamo.reset()`` forgets every graph).
    - Each batch size (a power of two: other sizes decode eagerly) compiles its own graph (~40 s on 2 CPU cores for SmolLM2-135M, less with a
      warm inductor cache) and keeps its own packed copy of the weights (~1.3x the fp32 weights
      on CPU): ``generate`` pads batches to a power of two, so a run sees a few sizes at most.
      The cache length is a dynamic dimension (no recompile per prompt length).
    - torch.compile's recompile limit (``torch._dynamo.config.recompile_limit``, 8 graphs for
      all models and sizes together, those of models since deleted included: a graph keeps its
      model's weights alive until ``torch._dynamo.reset()``) bounds the sizes and models; past
      it the step runs eagerly (same tokens, slower) and a warning says so.
    - Raises for models that decode through their own forward (see ``_fits_fast_path``).
    """
    global _compiled_core
    decoder = _decoder(model)
    if not _fits_fast_path(decoder):
        raise ValueError(f"{type(model).__name__}: compiled decoding needs plain self-attention layers")
    if any(type(p.data) is not torch.Tensor for p in decoder.parameters()):
        raise ValueError(f"{type(model).__name__}: compiled decoding needs plain weights (not NF4 or other subclasses)")
    if _compiled_core is None:
        _compiled_core = torch.compile(_decode_core, fullgraph=True)
    _COMPILED.add(model)


def decoding_is_compiled(model: MedcapModel | TransformerDecoder) -> bool:
    return model in _COMPILED


def decode_step(
    model: MedcapModel | TransformerDecoder, batch: Batch, token: torch.Tensor, pos: int
) -> torch.Tensor:
    """Logits [B, V] after feeding ``token`` [B] at sequence position ``pos`` (the cache slot
    the model's KV caches write next)."""
    decoder = _decoder(model)
    if not _fits_fast_path(decoder):
        logits = model(token[:, None], mask=batch.masks[:, pos : pos + 1], input_pos=batch.positions[:, pos : pos + 1])
        return _gathered(logits)[:, -1]
    attns = [layer.attn for layer in decoder.layers]
    kv = [a.kv_cache for a in attns]
    caches = [(c.k_cache, c.v_cache) for c in kv]
    # fresh, densely strided copies (a [1, L] slice keeps its parent's strides, which guard)
    mask = torch.empty_like(batch.masks[:, pos], memory_format=torch.contiguous_format).copy_(batch.masks[:, pos])
    input_pos = batch.positions[:, pos].clone(memory_format=torch.contiguous_format)
    slot = torch.tensor([pos], device=token.device)
    rows = token.shape[0]
    logits = None
    if model in _COMPILED and rows & (rows - 1) == 0 and rows not in _UNCOMPILABLE.get(model, ()):
        # One graph per batch size (powers of two only, which ``generate`` pads to: a caller
        # with other sizes, e.g. the serving layer's changing row count, runs eagerly rather
        # than compile a graph per size), any cache length.
        for t in (token, input_pos, mask):
            torch._dynamo.mark_static(t, 0)
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        for k, v in caches:
            torch._dynamo.mark_static(k, 0), torch._dynamo.mark_static(v, 0)
            torch._dynamo.maybe_mark_dynamic(k, 2), torch._dynamo.maybe_mark_dynamic(v, 2)
        # With freezing, a tensor the model holds as a buffer is a constant of the graph (and
        # a new one recompiles it): the caches leave the model while the graph runs.
        for a in attns:
            a.kv_cache = None
        try:
            # freezing must be on while dynamo traces (it then treats the parameters as
            # constants); torch.compile(options={"freezing": True}) alone packs nothing
            with torch._inductor.config.patch(freezing=True):
                logits = _compiled_core(model, token, input_pos, slot, mask, caches)
        except FailOnRecompileLimitHit:  # raised before anything ran: decode this size eagerly
            _UNCOMPILABLE.setdefault(model, set()).add(rows)
            log.warning(
                "compiled decoding: torch._dynamo's recompile limit (%d graphs) is reached; %d-row steps "
                "of this model run eagerly", torch._dynamo.config.recompile_limit, rows,
            )
        finally:
            for a, c in zip(attns, kv):
                a.kv_cache = c
    if logits is None:
        logits = _decode_core(model, token, input_pos, slot, mask, caches)
    for c in kv:  # torchtune's own write position, as its forward would have moved it
        c.cache_pos.add_(1)
    return logits


# ---------------------------------------------------------------------------- the loop
def pick(logits: torch.Tensor, temperature: float, top_k: int | None, rng: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax, or a seeded temperature / top-k sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    q = torch.empty(logits.shape, device=logits.device).exponential_(1, generator=rng)
    top_k = None if top_k is None else min(int(top_k), logits.shape[-1])  # beyond the vocabulary: all of it
    return sample(logits.float(), temperature=temperature, top_k=top_k, q=q).squeeze(-1).long()


def strip_at_stop(rows: list[list[int]], stop_tokens: Sequence[int]) -> list[list[int]]:
    stops = set(stop_tokens)
    out = []
    for row in rows:
        ids = []
        for tok in row:
            if tok in stops:
                break
            ids.append(tok)
        out.append(ids)
    return out


def _pad_cache_rows(model: MedcapModel | TransformerDecoder, rows: int) -> None:
    """Grow every KV cache to ``rows`` rows (zeros below the prefilled ones)."""
    for layer in _decoder(model).layers:
        c = layer.attn.kv_cache
        extra = rows - c.k_cache.shape[0]
        if extra > 0:
            c.k_cache = torch.cat([c.k_cache, c.k_cache.new_zeros(extra, *c.k_cache.shape[1:])])
            c.v_cache = torch.cat([c.v_cache, c.v_cache.new_zeros(extra, *c.v_cache.shape[1:])])


def batch_rows(model: MedcapModel | TransformerDecoder, n: int) -> int:
    """Rows to decode ``n`` prompts with: a compiled step has one graph per batch size, so a
    power of two (filler rows decode pads and are dropped; real rows do not depend on them)."""
    return 1 << (n - 1).bit_length() if decoding_is_compiled(model) else n


def decode_loop(
    model: MedcapModel | TransformerDecoder,
    batch: Batch,
    logits: torch.Tensor,
    start: int,
    n: int,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """From ``logits`` after cache slot ``start - 1``: up to ``max_new_tokens`` tokens for the
    first ``n`` rows, each stopping at its own stop token. Returns them [n, max_new_tokens]
    (pads after a stop) and how many were fed back into the caches (the last one is not)."""
    device = logits.device
    rows = batch.masks.shape[0]
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out = torch.full((n, max_new_tokens), pad_id, dtype=torch.long, device=device)
    token = torch.full((rows,), pad_id, dtype=torch.long, device=device)
    fed = 0
    for step in range(max_new_tokens):
        token[:n] = torch.where(done, pad_id, pick(logits[:n], temperature, top_k, rng))
        done |= torch.isin(token[:n], stop)
        out[:, step] = token[:n]
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = decode_step(model, batch, token, start + step)
        fed += 1
    return out, fed


@torch.no_grad()
def generate(
    model: MedcapModel | TransformerDecoder,
    prompts: Sequence[Sequence[int]],
    images: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: torch.Generator | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded). ``images`` [M, 3, H, W] belong, in
    order, to the prompts that hold image placeholders; ``model`` may also be a plain torchtune
    decoder (text only, e.g. the judge)."""
    n = len(prompts)
    padded = start_caches(model, prompts, max_new_tokens, pad_id, batch_rows(model, n))
    try:
        logits = prefill_rows(model, padded, n, images)
        out, _ = decode_loop(model, padded, logits, padded.prompt_len, n, max_new_tokens=max_new_tokens,
                             stop_tokens=stop_tokens, pad_id=pad_id, temperature=temperature, top_k=top_k,
                             rng=rng)  # fmt: skip
    finally:
        delete_kv_caches(model)
    return strip_at_stop(out.tolist(), stop_tokens)


def start_caches(
    model: MedcapModel | TransformerDecoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    rows: int,
) -> Batch:
    """The left-padded batch (``rows`` rows) and KV caches for the prompts and their answers."""
    device = model.tok_embeddings.weight.device
    padded = left_pad(prompts, max_new_tokens, pad_id, device, rows=rows)
    model.setup_caches(len(prompts), model.tok_embeddings.weight.dtype, decoder_max_seq_len=padded.masks.shape[-1])
    return padded


def prefill_rows(
    model: MedcapModel | TransformerDecoder, padded: Batch, n: int, images: torch.Tensor | None
) -> torch.Tensor:
    """Prefill the ``n`` real rows (filler rows get zero caches): logits [n, V]."""
    device = model.tok_embeddings.weight.device
    batch = Batch(padded.tokens[:n], padded.masks[:n], padded.positions[:n])
    logits = prefill(model, batch, None if images is None else images.to(device))
    if padded.masks.shape[0] > n:
        _pad_cache_rows(model, padded.masks.shape[0])
    return logits
