"""The fused model: where image tokens go, what learns, and what must never change."""

from __future__ import annotations

import pytest
import torch

from medcap.models.fusion import PlaceholderMismatchError, build_medcap_model, count_parameters

IMAGE_ID = 1000  # beyond the tiny vocabulary (512)
N = 4


def _batch(vocab: int = 512):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (3, 24), generator=g)
    tokens[0, 1 : 1 + N] = IMAGE_ID
    tokens[2, 3 : 3 + N] = IMAGE_ID  # row 1 is text-only
    images = torch.randn(2, 3, 64, 64, generator=g)
    return tokens, images


@pytest.fixture
def model(tiny_decoder):
    torch.manual_seed(0)
    return build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", num_image_tokens=N)


def test_gradients_reach_only_encoder_and_connector_and_llm_is_bitwise_unchanged(model):
    llm_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    emb_before = model.tok_embeddings.weight.clone()
    vis_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    proj_before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)

    tokens, images = _batch()
    logits = model(tokens, images=images)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 512), tokens[:, 1:].reshape(-1).clamp(max=511)
    )
    loss.backward()
    with_grad = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"visual", "projector"}
    assert all(p.grad.abs().sum() > 0 for p in model.projector.parameters())
    opt.step()

    for k, v in model.decoder.state_dict().items():
        assert torch.equal(v, llm_before[k]), k
    assert torch.equal(model.tok_embeddings.weight, emb_before)
    assert all(
        not torch.equal(v, vis_before[k])
        for k, v in model.visual.state_dict().items()
        if v.dtype.is_floating_point and "weight" in k
    )
    assert all(not torch.equal(v, proj_before[k]) for k, v in model.projector.state_dict().items())


def test_freeze_vision_encoder_trains_connector_only(tiny_decoder):
    model = build_medcap_model(
        tiny_decoder,
        image_token_id=IMAGE_ID,
        vision="vit_tiny",
        num_image_tokens=N,
        freeze_vision_encoder=True,
    )
    tokens, images = _batch()
    model(tokens, images=images).sum().backward()
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None} == {"projector"}
    trainable, frozen = count_parameters(model)
    assert trainable == sum(p.numel() for p in model.projector.parameters())
    assert frozen > trainable


def test_text_only_rows_are_untouched_by_images(model):
    tokens, images = _batch()
    with torch.no_grad():
        mixed = model(tokens, images=images)
        alone = model.decoder(model.tok_embeddings(tokens[1:2]))
    assert torch.allclose(mixed[1:2], alone, atol=1e-5)


@pytest.mark.parametrize("found", [N - 1, N + 1])
def test_wrong_placeholder_count_names_the_row(model, found):
    tokens, images = _batch()
    tokens[2] = 5
    tokens[2, 3 : 3 + found] = IMAGE_ID
    with pytest.raises(
        PlaceholderMismatchError, match=f"batch row 2: expected {N} .* per image, found {found}"
    ):
        model(tokens, images=images)


def test_image_count_must_match_rows_with_placeholders(model):
    tokens, images = _batch()
    with pytest.raises(
        PlaceholderMismatchError,
        match=r"1 images given but the placeholders in batch rows \[0, 2\] call for 2",
    ):
        model(tokens, images=images[:1])
    with pytest.raises(PlaceholderMismatchError, match="0 images given"):
        model(tokens)


def test_image_tokens_land_in_order_at_the_placeholders(model):
    tokens, images = _batch()
    with torch.no_grad():
        h = model.embed(tokens, images)
        expected = model.encode_images(images)
    assert torch.equal(h[0, 1 : 1 + N], expected[0])
    assert torch.equal(h[2, 3 : 3 + N], expected[1])
    assert torch.equal(h[1], model.tok_embeddings(tokens[1]))


def test_patch_connector_gives_one_token_per_patch(tiny_decoder):
    with pytest.raises(ValueError, match="one token per patch"):
        build_medcap_model(
            tiny_decoder,
            image_token_id=IMAGE_ID,
            vision="vit_tiny",
            connector="patch_mlp",
            num_image_tokens=8,
        )
    model = build_medcap_model(
        tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", connector="patch_mlp"
    )
    assert model.num_image_tokens == model.visual.num_patches == 16
    tokens = torch.full((1, 20), 7)
    tokens[0, 2:18] = IMAGE_ID
    assert model(tokens, images=torch.randn(1, 3, 64, 64)).shape == (1, 20, 512)
    with pytest.raises(ValueError, match="already belongs to a MedcapModel"):
        build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny")


def test_connector_width_must_match_decoder(tiny_decoder):
    from medcap.models.connectors import ClsMLP
    from medcap.models.fusion import MedcapModel
    from medcap.models.vision import build_vision_encoder

    with pytest.raises(ValueError, match="connector width 32 != decoder width 64"):
        MedcapModel(tiny_decoder, build_vision_encoder("vit_tiny"), ClsMLP(64, 32, 2), IMAGE_ID)


def test_loss_at_label_positions_equals_full_sequence_loss(model):
    tokens, images = _batch()
    labels = torch.full_like(tokens, -100)
    labels[:, 10:20] = tokens[:, 11:21] % 512
    full = model(tokens, images=images)
    full_loss = torch.nn.functional.cross_entropy(
        full.reshape(-1, 512), labels.reshape(-1), ignore_index=-100
    )
    logits, targets = model(tokens, images=images, labels=labels)
    assert logits.shape == (30, 512) and logits.dtype == torch.float32
    sparse_loss = torch.nn.functional.cross_entropy(logits, targets)
    assert torch.allclose(full_loss, sparse_loss, atol=1e-5)
    sparse_loss.backward()
    assert model.projector[0].weight.grad is not None


QUESTION_CONNECTORS = ("question_mlp", "question_film")


@pytest.mark.parametrize("connector", QUESTION_CONNECTORS)
def test_question_connector_sees_the_question_never_the_answer(connector, tiny_decoder):
    torch.manual_seed(0)
    model = build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", connector=connector,
                               num_image_tokens=N)  # fmt: skip
    if connector == "question_film":  # starts question-blind (zero film): give the question a say
        torch.nn.init.normal_(model.projector.film.weight)
    tokens, images = _batch()
    labels = torch.full_like(tokens, -100)
    labels[0, 12:20] = tokens[0, 13:21]  # row 0 answers from position 13 on (labels are shifted)
    labels[2, 15:20] = tokens[2, 16:21]

    def image_tokens(toks):
        h = model.tok_embeddings(toks.masked_fill(toks == IMAGE_ID, 0))
        return model.encode_images(images, model.questions(h, toks == IMAGE_ID, labels))

    q = model.questions(model.tok_embeddings(tokens.masked_fill(tokens == IMAGE_ID, 0)), tokens == IMAGE_ID, labels)
    emb = model.tok_embeddings
    assert torch.allclose(q[0], emb(tokens[0, 1 + N : 13]).mean(0))  # after the image, up to the answer
    assert torch.allclose(q[1], emb(tokens[2, 3 + N : 16]).mean(0))
    changed_answer = tokens.clone()
    changed_answer[0, 14:] = 7
    assert torch.equal(image_tokens(changed_answer), image_tokens(tokens))
    changed_question = tokens.clone()
    changed_question[0, 1 + N] = (tokens[0, 1 + N] + 1) % 512
    assert not torch.equal(image_tokens(changed_question)[0], image_tokens(tokens)[0])
    assert torch.equal(image_tokens(changed_question)[1], image_tokens(tokens)[1])  # rows do not mix
    logits, targets = model(tokens, images=images, labels=labels)
    assert logits.shape[0] == targets.shape[0] == 13


@pytest.mark.parametrize("template", ["llama3", "chatml"])
def test_question_connector_sees_the_same_question_in_training_and_generation(
    template, tiny_decoder, llama3_tok, chatml_tokenizer_json
):
    """Training labels begin at the assistant header, a generation prompt ends with it: both
    must average the user's question and nothing else (found: the header leaked into one)."""
    from torchtune.data import Message

    from medcap.data.chatml import ChatMLTokenizer
    from medcap.data.dataset import image_token_id, tokenize_chat

    tok = llama3_tok if template == "llama3" else ChatMLTokenizer(chatml_tokenizer_json)
    image_id = image_token_id(tok)
    model = build_medcap_model(tiny_decoder, image_token_id=image_id, vision="vit_tiny", connector="question_mlp",
                               num_image_tokens=N, turn_end_ids=tok.stop_tokens)  # fmt: skip

    def user(question):
        return Message(role="user", content=[{"type": "image"}, {"type": "text", "content": question}], masked=True)

    def embed(tokens):  # a fixed vector per token id, whatever the vocabulary size
        return torch.sin(tokens.unsqueeze(-1) * torch.arange(1.0, 9.0))

    def question_vector(tokens, labels=None):
        tokens = torch.tensor([tokens])
        h = embed(tokens)
        return model.questions(h, tokens == image_id, labels, tokens)[0]

    question = "Is this an MRI?"
    prompt, _ = tokenize_chat(tok, [user(question), Message(role="assistant", content="")], N, add_end_tokens=False)
    train, mask = tokenize_chat(tok, [user(question), Message(role="assistant", content="No")], N)
    labels = torch.tensor([[-100 if m else t for t, m in zip(train[1:], mask[1:])] + [-100]])
    assert (labels != -100).any()
    alone = tok.encode(question, add_bos=False, add_eos=False)
    expected = embed(torch.tensor(alone)).mean(0)
    assert torch.allclose(question_vector(prompt), expected, atol=1e-6)
    assert torch.allclose(question_vector(train, labels), expected, atol=1e-6)
    model.turn_end_ids = ()  # without them the header tokens leak into the generation prompt's span
    assert not torch.allclose(question_vector(prompt), question_vector(train, labels), atol=1e-6)


def test_question_film_starts_as_cls_mlp_and_learns_from_the_product(tiny_decoder):
    """At zero film the image tokens are cls_mlp's with the same weights, whatever the question;
    on a balanced yes/no-like target (the sign flips with the question) the film weights get a
    gradient although the image and question weights alone get none on average."""
    from medcap.models.connectors import ClsMLP, QuestionFiLM
    from medcap.models.vision import VisionFeatures

    torch.manual_seed(0)
    film, cls = QuestionFiLM(6, 8, 2), ClsMLP(6, 8, 2)
    cls.load_state_dict({k: v for k, v in film.state_dict().items() if not k.startswith("film.")})
    pooled = torch.randn(4, 6)
    features = VisionFeatures(pooled=pooled, patches=pooled[:, None])
    questions = torch.randn(4, 8)
    assert torch.equal(film(features, questions), cls(features))
    assert torch.equal(film(features, questions), film(features, 10 * questions))
    # every image with a matching (+1) and a non-matching (-1) question, each question both ways
    pooled = torch.randn(2, 6).repeat_interleave(2, 0)
    q = torch.randn(2, 8)
    questions = torch.stack([q[0], q[1], q[1], q[0]])
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = film(VisionFeatures(pooled=pooled, patches=pooled[:, None]), questions)
    (sign[:, None, None] * out).sum().backward()
    assert film.film.weight.grad.abs().sum() > 0
    assert torch.allclose(film[0].weight.grad, torch.zeros_like(film[0].weight.grad), atol=1e-6)


def _with_plain_twin(cls):
    """A question patch connector (in 6, width 8, 4 patches), patch_mlp with the same weights,
    features of 2 images and 2 questions."""
    from medcap.models.connectors import PatchMLP
    from medcap.models.vision import VisionFeatures

    torch.manual_seed(0)
    connector, plain = cls(6, 8, 4), PatchMLP(6, 8, 4)
    plain.load_state_dict({k: v for k, v in connector.state_dict().items() if not k.startswith("film.")})
    patches = torch.randn(2, 4, 6)
    return connector, plain, VisionFeatures(pooled=patches.mean(1), patches=patches), torch.randn(2, 8)


def test_patch_film_starts_as_patch_mlp_and_the_question_scales_every_patch(tiny_decoder):
    """At zero film each patch token is patch_mlp's, whatever the question; once the film has
    weight the question changes every patch's token, one image's question never another's."""
    from medcap.models.connectors import PatchFiLM

    film, plain, features, questions = _with_plain_twin(PatchFiLM)
    assert film(features, questions).shape == (2, 4, 8)
    assert torch.equal(film(features, questions), plain(features))
    torch.nn.init.normal_(film.film.weight)
    other = questions.clone()
    other[1] = torch.randn(8)  # not a shift or a scale: the question is layer-normalised
    before, after = film(features, questions), film(features, other)
    assert torch.equal(before[0], after[0])
    assert all(not torch.allclose(before[1, p], after[1, p]) for p in range(4))
    after.sum().backward()
    assert film.film.weight.grad.abs().sum() > 0


def test_patch_film_in_the_model_sees_the_question_never_the_answer(tiny_decoder):
    torch.manual_seed(0)
    model = build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", connector="patch_film")
    assert model.num_image_tokens == model.visual.num_patches == 16
    torch.nn.init.normal_(model.projector.film.weight)
    n = model.num_image_tokens
    tokens = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(1))
    tokens[0, 1 : 1 + n] = IMAGE_ID
    labels = torch.full_like(tokens, -100)
    labels[0, 24:29] = tokens[0, 25:30]
    images = torch.randn(1, 3, 64, 64)

    def image_tokens(toks):
        h = model.tok_embeddings(toks.masked_fill(toks == IMAGE_ID, 0))
        return model.encode_images(images, model.questions(h, toks == IMAGE_ID, labels))

    changed_answer, changed_question = tokens.clone(), tokens.clone()
    changed_answer[0, 26:] = 7
    changed_question[0, 1 + n] = (tokens[0, 1 + n] + 1) % 512
    assert torch.equal(image_tokens(changed_answer), image_tokens(tokens))
    assert not torch.equal(image_tokens(changed_question), image_tokens(tokens))
    logits, targets = model(tokens, images=images, labels=labels)
    assert logits.shape[0] == targets.shape[0] == 5


def test_patch_question_keeps_the_patches_and_adds_one_question_token(tiny_decoder):
    """The patch tokens are patch_mlp's whatever the question; one more token, the mean patch's
    at zero film, changes with the question once the film has weight; its count is checked."""
    from medcap.models.connectors import PatchQuestion, build_connector
    from medcap.models.vision import VisionFeatures

    extra, plain, features, q = _with_plain_twin(PatchQuestion)
    patches = features.patches
    out = extra(features, q)
    assert out.shape == (2, 5, 8) and extra.num_tokens == 5
    assert torch.allclose(out[:, :4], plain(features), atol=1e-6)
    mean_patch = VisionFeatures(pooled=patches.mean(1), patches=patches.mean(1, keepdim=True))
    assert torch.allclose(out[:, 4:], plain(mean_patch), atol=1e-6)
    torch.nn.init.normal_(extra.film.weight)
    other = torch.stack([q[0], torch.randn(8)])
    before, after = extra(features, q), extra(features, other)
    assert torch.allclose(after[:, :4], plain(features), atol=1e-6)  # the patches never change
    assert torch.equal(before[0], after[0]) and not torch.allclose(before[1, 4], after[1, 4])
    with pytest.raises(ValueError, match=r"one token per patch \(16\) and 1 more \(17\)"):
        build_connector("patch_question", pooled_dim=6, patch_dim=6, num_patches=16, llm_dim=8, num_image_tokens=16)
    model = build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", connector="patch_question")
    assert model.num_image_tokens == 17
