"""Training's shared-prefix pass is an optimisation only: the loss and every gradient equal the
full pass's (the oracle), and the decoder leaves it as it found it."""

from __future__ import annotations

import copy

import pytest
import torch

from medcap.models.fusion import build_medcap_model
from medcap.models.lora import LoraSpec
from medcap.models.shared_prefix import shared_prefix_length

IMAGE_ID = 1000  # beyond the tiny vocabulary (512)
N = 16  # vit_tiny: 16 patches (patch_mlp gives one token each)
SHARED = 7  # the "system prompt": the same in every row


def _batch(rows: int = 4, length: int = 44, vocab: int = 512):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (rows, length), generator=g)
    tokens[:, :SHARED] = tokens[0, :SHARED]
    tokens[:, SHARED : SHARED + N] = IMAGE_ID
    tokens[1, SHARED:] = torch.randint(0, vocab, (length - SHARED,), generator=g)  # row 1 is text-only
    images = torch.randn(rows - 1, 3, 64, 64, generator=g)
    labels = torch.full_like(tokens, -100)
    for row, end in enumerate(range(length, length - rows * 3, -3)):  # answers of their own lengths, right-padded
        labels[row, end - 6 : end - 1] = tokens[row, end - 5 : end]
        tokens[row, end:] = 0
    return tokens, images, labels


def _twins(tiny_decoder, **kwargs):
    torch.manual_seed(0)
    plain = build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", num_image_tokens=N, **kwargs)
    for name, p in plain.named_parameters():
        if "lora_b" in name:  # zero at init, which would leave the other adapter without a gradient
            p.data.normal_(0, 0.02)
    shared = copy.deepcopy(plain)
    shared.share_prefix = True
    return plain, shared


def _loss_and_grads(model, tokens, images, labels):
    logits, targets = model(tokens, images=images, labels=labels)
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    loss.backward()
    # (a per-patch connector leaves the encoder's pooling head without a gradient)
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_prefix_ends_where_rows_differ_an_image_starts_or_a_label_is():
    tokens, _, labels = _batch()
    assert shared_prefix_length(tokens, labels, IMAGE_ID) == SHARED
    differing = tokens.clone()
    differing[2, 3] += 1
    assert shared_prefix_length(differing, labels, IMAGE_ID) == 3
    early_label = labels.clone()
    early_label[3, 5] = 7
    assert shared_prefix_length(tokens, early_label, IMAGE_ID) == 5
    text_only = torch.randint(0, 512, (2, 10))
    text_only[1] = text_only[0]
    assert shared_prefix_length(text_only, torch.full_like(text_only, -100), IMAGE_ID) == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"connector": "patch_mlp"},
        {"connector": "question_film"},  # reads the question's embeddings after the image
        {"connector": "cls_mlp", "llm_lora": LoraSpec(rank=4, alpha=8.0)},  # the prefix itself trains
    ],
    ids=["patch_mlp", "question_film", "llm_lora"],
)
def test_loss_and_gradients_equal_the_full_pass(tiny_decoder, kwargs):
    plain, shared = _twins(tiny_decoder, **kwargs)
    batch = _batch()
    assert shared.shared_columns(batch[0], batch[2], None, None) == SHARED  # the shared pass is taken
    plain_loss, plain_grads = _loss_and_grads(plain, *batch)
    shared_loss, shared_grads = _loss_and_grads(shared, *batch)
    assert torch.allclose(shared_loss, plain_loss, rtol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        assert torch.allclose(shared_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_under_activation_checkpointing_the_full_pass_runs(tiny_decoder):
    from torchtune.modules import TransformerSelfAttentionLayer
    from torchtune.training import set_activation_checkpointing

    plain, shared = _twins(tiny_decoder, connector="patch_mlp")
    set_activation_checkpointing(shared.decoder, auto_wrap_policy={TransformerSelfAttentionLayer})
    batch = _batch()
    assert shared.shared_columns(batch[0], batch[2], None, None) == 0
    _, plain_grads = _loss_and_grads(plain, *batch)
    _, shared_grads = _loss_and_grads(shared, *batch)
    for name, grad in plain_grads.items():
        assert torch.allclose(shared_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_rows_with_nothing_in_common_take_the_full_pass(tiny_decoder):
    plain, shared = _twins(tiny_decoder, connector="patch_mlp")
    tokens, images, labels = _batch()
    tokens[0, 0] += 1  # no shared column
    plain_logits, _ = plain(tokens, images=images, labels=labels)
    shared_logits, _ = shared(tokens, images=images, labels=labels)
    assert torch.equal(plain_logits, shared_logits)


def test_the_decoder_is_left_as_it_was_found(tiny_decoder):
    _, shared = _twins(tiny_decoder, connector="patch_mlp")
    shared(*_batch()[:1], images=_batch()[1], labels=_batch()[2])
    for layer in shared.decoder.layers:
        assert layer.attn.kv_cache is None and not layer.attn.cache_enabled
    shared.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=64)  # generation still works
    tokens = torch.randint(0, 512, (1, 5))
    assert shared(tokens, input_pos=torch.arange(5)[None], mask=torch.ones(1, 5, 64, dtype=torch.bool).tril()).shape == (1, 5, 512)
