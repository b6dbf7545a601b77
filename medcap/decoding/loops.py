"""Decoding loops over a batch of prompts: ``generate`` (one turn, in gpt-fast's three parts:
prefill the left-padded prompts and their images once, then one step per token) and
``generate_two_turns`` (the original's describe-then-answer protocol, the second turn decoded
on the first turn's KV caches). Each row stops at its own stop token."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from medcap.decoding.batch import Batch, from_seen, left_pad
from medcap.decoding.cache import KVCaches
from medcap.decoding.sampling import Sampling, pick
from medcap.decoding.step import DecodeStep, prefill, run_block

FollowUp = Callable[[list[list[int]]], list[list[int] | None]]


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


def _sampling_for(model: torch.nn.Module, sampling: Sampling | None) -> Sampling:
    """The image placeholder is no token to generate: fed back, it would ask for an image."""
    return (sampling or Sampling()).banning(getattr(model, "image_token_id", None))


def decode_loop(
    step: DecodeStep,
    batch: Batch,
    logits: torch.Tensor,
    start: int,
    n: int,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    pad_id: int,
    sampling: Sampling,
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
    for i in range(max_new_tokens):
        token[:n] = torch.where(done, pad_id, pick(logits[:n], sampling))
        done |= torch.isin(token[:n], stop)
        out[:, i] = token[:n]
        if i == max_new_tokens - 1 or bool(done.all()):
            break
        logits = step(batch, token, start + i)
        fed += 1
    return out, fed


def _prefill_rows(
    model: torch.nn.Module, caches: KVCaches, padded: Batch, n: int, images: torch.Tensor | None
) -> torch.Tensor:
    """Prefill the ``n`` real rows (filler rows get zero caches): logits [n, V]."""
    logits = prefill(model, padded.rows(n), None if images is None else images.to(caches.device))
    if padded.masks.shape[0] > n:
        caches.pad_rows(padded.masks.shape[0])
    return logits


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    images: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    pad_id: int,
    sampling: Sampling | None = None,
    step: DecodeStep | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded). ``images`` [M, 3, H, W] belong, in
    order, to the prompts that hold image placeholders; ``model`` may also be a plain torchtune
    decoder (text only, e.g. the judge). ``step``: a compiled one (``compile_decoding``)."""
    step = step or DecodeStep(model)
    caches = KVCaches(model)
    n = len(prompts)
    padded = left_pad(prompts, max_new_tokens, pad_id, caches.device, rows=step.rows_for(n))
    caches.setup(n, padded.slots)
    try:
        logits = _prefill_rows(model, caches, padded, n, images)
        out, _ = decode_loop(step, padded, logits, padded.prompt_len, n, max_new_tokens=max_new_tokens,
                             stop_tokens=stop_tokens, pad_id=pad_id, sampling=_sampling_for(model, sampling))  # fmt: skip
    finally:
        caches.delete()
    return strip_at_stop(out.tolist(), stop_tokens)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def generate_two_turns(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    images: torch.Tensor | None,
    follow_up: FollowUp,
    *,
    max_new_tokens: tuple[int, int],
    stop_tokens: Sequence[int],
    pad_id: int,
    sampling: Sampling | None = None,
    step: DecodeStep | None = None,
) -> tuple[list[list[int]], list[list[int] | None]]:
    """First answers to ``prompts``; ``follow_up(first answers)`` gives each row's whole second
    prompt (None: no second turn for that row); second answers, decoded on the same caches.

    After the first turn the caches hold each row's first prompt and the tokens it generated.
    Whatever of the second prompt matches what the caches hold is kept, and only the rest is
    run. Where re-encoding the description gives other tokens than the model generated, the
    cached ones from there on are masked out and the re-encoded ones run instead, so the answer
    is the one a recomputation from the second prompt gives."""
    step = step or DecodeStep(model)
    sampling = _sampling_for(model, sampling)
    caches = KVCaches(model)
    n = len(prompts)
    rows = step.rows_for(n)
    first_new, second_new = max_new_tokens
    padded = left_pad(prompts, first_new, pad_id, caches.device, rows=rows)
    caches.setup(n, padded.slots)
    try:
        logits = _prefill_rows(model, caches, padded, n, images)
        out1, fed = decode_loop(step, padded, logits, padded.prompt_len, n, max_new_tokens=first_new,
                                stop_tokens=stop_tokens, pad_id=pad_id, sampling=sampling)  # fmt: skip
        first = strip_at_stop(out1.tolist(), stop_tokens)
        seconds = follow_up(first)
        device = out1.device
        used = padded.prompt_len + fed
        # which cache slots each row's second turn may see: the part of its second prompt that
        # matches what its slots hold (its prompt, then what it generated up to its stop token,
        # in consecutive slots from its first one)
        valid = padded.masks.new_zeros(rows, used)
        stops = set(stop_tokens)
        rest: list[list[int]] = []
        for r in range(rows):
            second = seconds[r] if r < n else None
            if not second:
                rest.append([])
                continue
            generated = out1[r, :fed].tolist()
            stop_at = next((k for k, t in enumerate(generated) if t in stops), None)
            held = [*prompts[r], *(generated if stop_at is None else generated[: stop_at + 1])]
            keep = min(_common_prefix(held, second), len(second) - 1)  # at least one token to run
            first_slot = padded.prompt_len - len(prompts[r])
            valid[r, first_slot : first_slot + keep] = True
            rest.append(list(second[keep:]))
        width = max(1, max(len(x) for x in rest))
        block = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        block_valid = padded.masks.new_zeros(rows, width)
        for r, tokens in enumerate(rest):
            if tokens:
                block[r, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
                block_valid[r, width - len(tokens) :] = True
        batch = from_seen(block, torch.cat([valid, block_valid, block_valid.new_ones(rows, second_new)], dim=1))
        caches.grow(used, batch.slots)
        logits = run_block(model, block, batch.masks[:, used : used + width], batch.positions[:, used : used + width])
        out2, _ = decode_loop(step, batch, logits, used + width, n, max_new_tokens=second_new,
                              stop_tokens=stop_tokens, pad_id=pad_id, sampling=sampling)  # fmt: skip
    finally:
        caches.delete()
    answers = strip_at_stop(out2.tolist(), stop_tokens)
    return first, [answers[r] if seconds[r] else None for r in range(n)]
