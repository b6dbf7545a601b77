"""Batched KV-cache decoding with images (``medcap.decoding``) equals one-at-a-time and cache-free
greedy decoding."""

from __future__ import annotations

import pytest
import torch

from medcap.decoding import Sampling, generate, left_pad, pick, strip_at_stop
from medcap.models.fusion import build_medcap_model

IMG, N = 1000, 4


@torch.no_grad()
def cache_free_generate(model, prompts, images, *, max_new_tokens, stop_tokens, pad_id):
    """The oracle: greedy decoding that re-runs the whole sequence (and its images) every step."""
    batch = left_pad(prompts, max_new_tokens, pad_id, torch.device("cpu"))
    n = batch.prompt_len
    out = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long)
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for step in range(max_new_tokens):
        seq = torch.cat([batch.tokens, out[:, :step]], dim=1)
        pos = n + step
        logits = model(seq, images=images, mask=batch.masks[:, :pos, :pos], input_pos=batch.positions[:, :pos])
        token = torch.where(done, pad_id, pick(logits[:, -1], Sampling()))
        done |= torch.isin(token, torch.tensor(stop_tokens))
        out[:, step] = token
    return strip_at_stop(out.tolist(), stop_tokens)


@pytest.fixture
def model(tiny_decoder):
    torch.manual_seed(0)
    return build_medcap_model(tiny_decoder, image_token_id=IMG, vision="vit_tiny", num_image_tokens=N).eval()


def _prompts():
    g = torch.Generator().manual_seed(3)
    body = lambda n: torch.randint(5, 500, (n,), generator=g).tolist()  # noqa: E731
    return [
        [1, *[IMG] * N, *body(9)],  # image, long
        [1, *body(3)],  # text only, short
        [1, *body(2), *[IMG] * N, *body(4)],  # image in the middle
    ]


def test_batched_cached_equals_single_and_cache_free(model):
    prompts = _prompts()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=12, stop_tokens=[2], pad_id=0)
    batched = generate(model, prompts, images, **kwargs)
    single = [
        generate(model, [prompts[0]], images[:1], **kwargs)[0],
        generate(model, [prompts[1]], None, **kwargs)[0],
        generate(model, [prompts[2]], images[1:], **kwargs)[0],
    ]
    cache_free = cache_free_generate(model, prompts, images, **kwargs)
    assert batched == single == cache_free
    assert all(len(x) == 12 for x in batched)  # no stop token met with these weights
    assert batched[0] != batched[2]  # images and prompts matter
    assert model.decoder.layers[0].attn.kv_cache is None  # caches are torn down afterwards


def test_each_row_stops_at_its_stop_token(model):
    prompts = _prompts()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    free = generate(model, prompts, images, max_new_tokens=12, stop_tokens=[2], pad_id=0)
    stop = free[0][3]  # make row 0's fourth token a stop token
    cut = generate(model, prompts, images, max_new_tokens=12, stop_tokens=[stop], pad_id=0)
    assert cut[0] == free[0][: free[0].index(stop)]
    for got, full in zip(cut[1:], free[1:]):
        assert got == (full[: full.index(stop)] if stop in full else full)


def test_sampling_is_seeded(model):
    prompts = _prompts()[1:2]
    run = lambda seed: generate(  # noqa: E731
        model,
        prompts,
        None,
        max_new_tokens=10,
        stop_tokens=[2],
        pad_id=0,
        sampling=Sampling(temperature=1.0, top_k=50, rng=torch.Generator().manual_seed(seed)),
    )
    assert run(7) == run(7)
    assert run(7) != run(8)
    greedy = generate(model, prompts, None, max_new_tokens=10, stop_tokens=[2], pad_id=0)
    top1 = generate(
        model,
        prompts,
        None,
        max_new_tokens=10,
        stop_tokens=[2],
        pad_id=0,
        sampling=Sampling(temperature=1.0, top_k=1, rng=torch.Generator().manual_seed(1)),
    )
    assert greedy == top1


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens(model):
    """compile_decoding: the decode step through torch.compile (weights frozen into the graph);
    batch sizes padded to a power of two; the same greedy tokens as eager decoding."""
    from medcap.decoding import compile_decoding

    prompts = _prompts()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    kwargs = dict(max_new_tokens=8, stop_tokens=[2], pad_id=0)
    eager = generate(model, prompts, images, **kwargs)
    step = compile_decoding(model)
    assert step.compiled and step.rows_for(3) == 4
    assert generate(model, prompts, images, **kwargs, step=step) == eager  # 3 rows: run as 4
    assert generate(model, prompts[1:2], None, **kwargs, step=step) == [eager[1]]


def test_second_turn_on_the_first_turns_caches_equals_recomputing(model):
    """generate_two_turns: the second prompt shares a prefix with what the caches hold; where it
    departs from the generated tokens (a re-encoded description), the cached ones are masked and
    the rest runs; every answer equals generate() on the whole second prompt from scratch."""
    from medcap.decoding import generate_two_turns

    prompts = _prompts()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    kwargs = dict(stop_tokens=[2], pad_id=0)
    seconds = []

    def follow_up(first):
        seconds[:] = [
            [*prompts[0], *first[0], 7, 8, 9],  # the first answer kept as generated
            [*prompts[1], *first[1][:2], 11, *first[1][3:], 7, 8],  # departs at its third token
            None,  # no second turn for this row
        ]
        return seconds

    first, second = generate_two_turns(model, prompts, images, follow_up, max_new_tokens=(6, 7), **kwargs)
    assert first == generate(model, prompts, images, max_new_tokens=6, **kwargs)
    assert second[2] is None
    assert second[0] == generate(model, [seconds[0]], images[:1], max_new_tokens=7, **kwargs)[0]
    assert second[1] == generate(model, [seconds[1]], None, max_new_tokens=7, **kwargs)[0]
    assert model.decoder.layers[0].attn.kv_cache is None  # caches are torn down afterwards
