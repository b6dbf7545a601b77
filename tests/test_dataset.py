"""Tokenisation with the real Llama-3 tokenizer, truncation, collate and loading."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import draw_jpeg
from torchtune.data import Message

from medcap.data import chat_dataset
from medcap.data.chatml import ChatMLTokenizer
from medcap.data.collate import ResumableSampler, balance_weights, build_dataloader, collate_image_chat
from medcap.data.dataset import (
    ImageChatDataset,
    SampleTooLongError,
    resolve_dataset_component,
    tokenize_chat,
)
from medcap.data.images import ImageLoadError
from medcap.models.vision import build_vision_encoder

BOS, START, END, EOT, EOS, IMG, PAD = 128000, 128006, 128007, 128009, 128001, 128256, 128004
USER, ASSISTANT, NL2 = 882, 78191, 271  # "user", "assistant", "\n\n"
N = 4
IGNORE = -100


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def qa(question, answer, image="img.jpg", **extra):
    return {
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        "image": image,
        **extra,
    }


@pytest.fixture
def transform():
    return build_vision_encoder("vit_tiny").preprocess.transform()


@pytest.fixture
def data_dir(tmp_path):
    draw_jpeg(tmp_path / "img.jpg")
    return tmp_path


def test_prompt_ids_labels_and_placeholders(llama3_tok, data_dir, transform):
    path = write_json(data_dir / "d.json", [qa("<image>\nWhat modality is this?", "CT")])
    sample = ImageChatDataset(llama3_tok, path, num_image_tokens=N, image_transform=transform)[0]
    enc = lambda s: llama3_tok.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    user = [START, USER, END, NL2] + [IMG] * N + enc("What modality is this?") + [EOT]
    answer = [START, ASSISTANT, END, NL2] + enc("CT") + [EOT]
    assert sample["tokens"] == [BOS] + user + answer + [EOS]
    assert sample["labels"] == [IGNORE] * (1 + len(user)) + answer + [IGNORE]
    assert sample["images"].shape == (1, 3, 64, 64)


def test_placeholders_sit_where_the_marker_was(llama3_tok, data_dir, transform):
    path = write_json(data_dir / "d.json", [qa("Look at <image> and answer: where?", "Lung")])
    tokens = ImageChatDataset(llama3_tok, path, num_image_tokens=N, image_transform=transform)[0]["tokens"]
    enc = lambda s: llama3_tok.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    first = tokens.index(IMG)
    assert tokens[first - len(enc("Look at")) : first] == enc("Look at")
    assert tokens[first : first + N] == [IMG] * N and tokens[first + N] != IMG
    assert tokens[first + N : first + N + len(enc("and answer: where?"))] == enc("and answer: where?")


def test_special_token_text_never_becomes_special(llama3_tok, data_dir):
    path = write_json(data_dir / "d.json", [qa("<|image|> <|eot_id|> hi", "<|start_header_id|>", image="")])
    tokens = ImageChatDataset(llama3_tok, path, num_image_tokens=N)[0]["tokens"]
    assert IMG not in tokens
    assert tokens.count(EOT) == 2 and tokens.count(START) == 2  # only the template's own


def test_train_on_input_keeps_loss_on_the_instruction_but_never_on_images(llama3_tok, data_dir, transform):
    path = write_json(data_dir / "d.json", [qa("<image>\nDescribe.", "A CT.")])
    s = ImageChatDataset(
        llama3_tok, path, num_image_tokens=N, image_transform=transform, train_on_input=True
    )[0]
    labelled = [t for t, lab in zip(s["tokens"], s["labels"]) if lab != IGNORE]
    assert IMG not in labelled
    assert llama3_tok.encode("Describe.", add_bos=False, add_eos=False)[0] in labelled


def test_truncation_never_cuts_image_tokens(llama3_tok, data_dir, transform):
    long_answer = "word " * 200
    records = [
        qa("<image>\nDescribe.", long_answer),  # fits after cutting the answer
        qa("blah " * 100 + "<image>", "x"),  # image beyond the limit
        qa("<image>\n" + "blah " * 100, "x"),  # image fits but no answer token does
    ]
    path = write_json(data_dir / "d.json", records)
    ds = ImageChatDataset(llama3_tok, path, num_image_tokens=N, image_transform=transform, max_seq_len=48)
    first = ds[0]
    assert len(first["tokens"]) == 48 and first["tokens"].count(IMG) == N
    assert any(lab != IGNORE for lab in first["labels"])
    assert ds[1] is None and ds[2] is None
    batch = collate_image_chat([ds[i] for i in range(3)], pad_id=PAD)
    assert batch["num_skipped"] == 2 and batch["tokens"].shape == (1, 48)
    strict = ImageChatDataset(
        llama3_tok, path, num_image_tokens=N, image_transform=transform, max_seq_len=48, strict=True
    )
    with pytest.raises(
        SampleTooLongError, match=r"d.json, record 1: .*image tokens beyond max_seq_len \(48\)"
    ):
        strict[1]


def test_tokenizer_max_seq_len_is_taken_over_by_the_dataset(llama3_tokenizer_path, data_dir, transform):
    from torchtune.models.llama3 import llama3_tokenizer

    tok = llama3_tokenizer(str(llama3_tokenizer_path), max_seq_len=30)
    path = write_json(data_dir / "d.json", [qa("blah " * 40 + "<image>", "x")])
    ds = ImageChatDataset(tok, path, num_image_tokens=N, image_transform=transform)
    assert ds.max_seq_len == 30 and ds.tokenizer.max_seq_len is None
    assert tok.max_seq_len == 30  # the caller's tokenizer is not changed behind its back
    assert ds[0] is None  # skipped, not silently cut inside the tokenizer


def test_missing_image_names_file_and_record(llama3_tok, data_dir, transform):
    path = write_json(data_dir / "d.json", [qa("q", "a"), qa("q", "a", image="gone.jpg")])
    ds = ImageChatDataset(llama3_tok, path, num_image_tokens=N, image_transform=transform)
    with pytest.raises(ImageLoadError, match=r"gone.jpg \(record 1\): image file not found"):
        ds[1]


def test_collate_mixed_batch(llama3_tok, data_dir, transform):
    path = write_json(
        data_dir / "d.json", [qa("q1", "a"), qa("much longer question here", "b", image=""), qa("q3", "c")]
    )
    ds = ImageChatDataset(llama3_tok, path, num_image_tokens=N, image_transform=transform)
    batch = collate_image_chat([ds[0], ds[1], ds[2]], pad_id=PAD)
    assert batch["images"].shape == (2, 3, 64, 64)
    short = len(ds[0]["tokens"])
    assert (batch["tokens"][0, short:] == PAD).all() and (batch["labels"][0, short:] == IGNORE).all()
    assert [int((row == IMG).sum()) for row in batch["tokens"]] == [N, 0, N]
    assert batch["indices"] == [0, 1, 2]


def test_batches_run_through_the_fused_model(chatml_tokenizer_json, tiny_decoder, data_dir, transform):
    from medcap.models.fusion import build_medcap_model

    tok = ChatMLTokenizer(chatml_tokenizer_json)
    model = build_medcap_model(
        tiny_decoder, image_token_id=tok.image_id, vision="vit_tiny", num_image_tokens=N
    )
    path = write_json(
        data_dir / "d.json",
        [
            qa("What modality?", "CT"),
            qa("Is this an MRI?", "No.", image=""),
            qa("<image> Is this a CT scan?", "Yes"),
        ],
    )
    ds = ImageChatDataset(
        tok,
        path,
        num_image_tokens=model.num_image_tokens,
        image_transform=model.visual.preprocess.transform(),
    )
    loader, _ = build_dataloader(ds, batch_size=3, pad_id=tok.pad_id, shuffle=False)
    batch = next(iter(loader))
    logits = model(batch["tokens"], images=batch["images"])
    assert logits.shape[:2] == batch["tokens"].shape


def test_loader_workers_and_seeded_shuffling(llama3_tok, data_dir, transform):
    path = write_json(
        data_dir / "d.json",
        [qa(f"question {i}", f"answer {i}", image="" if i % 3 else "img.jpg") for i in range(10)],
    )
    ds = ImageChatDataset(llama3_tok, path, num_image_tokens=N, image_transform=transform)

    def order(num_workers, seed, epoch):
        loader, sampler = build_dataloader(ds, batch_size=4, pad_id=PAD, seed=seed, num_workers=num_workers)
        sampler.set_epoch(epoch)
        return [i for b in loader for i in b["indices"]]

    assert order(0, 1, 0) == order(2, 1, 0)
    assert order(0, 1, 0) != order(0, 1, 1)
    assert order(0, 1, 1) == order(0, 1, 1)
    assert sorted(order(0, 2, 0)) == list(range(10))


def test_augmentation_is_drawn_per_sample_and_epoch_whatever_the_order(llama3_tok, data_dir):
    """A sample's augmentation depends on (seed, epoch, index) only: not on the order, the
    workers or anything drawn before it, and fetching it leaves the global generators alone;
    so a run resumed mid-epoch augments as an uninterrupted one."""
    import random

    path = write_json(data_dir / "aug.json", [qa(f"question {i}", f"answer {i}", image="img.jpg") for i in range(6)])
    preprocess = build_vision_encoder("vit_tiny").preprocess
    ds = ImageChatDataset(llama3_tok, path, num_image_tokens=N, augment_seed=7,
                          image_transform=preprocess.transform({"scale": (0.3, 1.0)}))  # fmt: skip

    def pixels(num_workers: int, epoch: int, start: int = 0) -> dict[int, torch.Tensor]:
        loader, sampler = build_dataloader(ds, batch_size=2, pad_id=PAD, seed=3, num_workers=num_workers)
        sampler.set_epoch(epoch)
        sampler.start_index = start
        return {i: img for b in loader for i, img in zip(b["indices"], b["images"])}

    torch.manual_seed(0)
    random.seed(0)
    before = torch.get_rng_state(), random.getstate()
    first = pixels(0, epoch=0)
    assert torch.get_rng_state().equal(before[0]) and random.getstate() == before[1]
    torch.manual_seed(123)  # whatever else drew before does not matter
    assert all(first[i].equal(x) for i, x in pixels(0, epoch=0, start=4).items())
    assert all(first[i].equal(x) for i, x in pixels(2, epoch=0).items())
    assert not all(first[i].equal(x) for i, x in pixels(0, epoch=1).items())
    assert len({tuple(x.flatten()[:32].tolist()) for x in first.values()}) == 6  # one draw per sample
    assert ds[3]["images"].equal(ds[(3, 0)]["images"])


def test_chatml_template_and_injection(chatml_tokenizer_json):
    tok = ChatMLTokenizer(chatml_tokenizer_json)
    msgs = [
        Message(
            "user",
            [{"type": "image", "content": None}, {"type": "text", "content": "What is <|im_end|> this?"}],
            masked=True,
        ),
        Message("assistant", "A CT."),
    ]
    tokens, mask = tokenize_chat(tok, msgs, num_image_tokens=3)
    assert tokens.count(tok.image_id) == 3 and tok.image_id == tok.vocab_size
    assert tokens.count(tok.im_end_id) == 2  # the typed "<|im_end|>" stays text
    text = tok.decode([t for t in tokens if t != tok.image_id], skip_special_tokens=False)
    assert (
        text
        == "<|im_start|>user\nWhat is <|im_end|> this?<|im_end|>\n<|im_start|>assistant\nA CT.<|im_end|>\n"
    )
    first_unmasked = mask.index(False)
    assert tokens[first_unmasked] == tok.im_start_id  # loss starts at the assistant turn


def test_chatml_default_system_prompt(chatml_tokenizer_json):
    tok = ChatMLTokenizer(chatml_tokenizer_json, default_system_prompt="You are helpful.")
    tokens, _ = tok.tokenize_messages([Message("user", "Hi"), Message("assistant", "")], add_end_tokens=False)
    assert tok.decode(tokens, skip_special_tokens=False) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_original_dataset_overrides(llama3_tok, data_dir, transform):
    assert resolve_dataset_component("torchtune.datasets.chat_dataset") == "medcap.data.chat_dataset"
    path = write_json(data_dir / "d.json", [qa("q", "a")])
    ds = chat_dataset(
        llama3_tok,
        source=str(path),
        conversation_style="sharegpt",
        chat_format="ChatFormat",
        max_seq_len=400,
        num_image_tokens=N,
        image_transform=transform,
    )
    assert ds.max_seq_len == 400 and len(ds) == 1
    with pytest.raises(ValueError, match="conversation_style='alpaca'"):
        chat_dataset(llama3_tok, source=str(path), conversation_style="alpaca", num_image_tokens=N)


def test_several_source_files_read_as_one(llama3_tok, data_dir, transform):
    first = write_json(data_dir / "vqa.json", [qa("Is this a CT?", "Yes"), qa("Which organ?", "Lung")])
    second = write_json(data_dir / "captions.json", [qa("Describe the image.", "A chest CT.", image="missing.jpg")])
    ds = chat_dataset(llama3_tok, source=[str(first), str(second)], num_image_tokens=N, image_transform=transform)
    assert len(ds) == 3 and ds[1]["labels"] != ds[0]["labels"]
    with pytest.raises(ImageLoadError, match=r"captions\.json|missing\.jpg"):
        ds[2]


def test_training_augmentation_is_random_evaluation_is_not(data_dir):
    from PIL import Image

    preprocess = build_vision_encoder("vit_tiny").preprocess
    image = Image.open(data_dir / "img.jpg")
    augment = preprocess.transform({"scale": (0.5, 1.0), "color_jitter": (0.3, 0.3, 0.0, 0.0), "color_jitter_prob": 1.0})
    plain = preprocess.transform()
    assert augment(image).shape == plain(image).shape == (3, 64, 64)
    assert not augment(image).equal(augment(image))
    assert plain(image).equal(plain(image))


def test_balance_weights_give_each_class_its_share():
    classes = ["MRI"] * 60 + ["CT"] * 15 + [None] * 4 + ["X-Ray"]
    share = lambda w, c: float(sum(x for x, k in zip(w, classes) if k == c) / w.sum())  # noqa: E731
    equal = balance_weights(classes, 1.0)
    assert all(abs(share(equal, c) - 0.25) < 1e-9 for c in ("MRI", "CT", None, "X-Ray"))
    natural = balance_weights(classes, 0.0)
    assert abs(share(natural, "MRI") - 0.75) < 1e-9
    roots = balance_weights(classes, 0.5)  # shares ~ sqrt(count): 60 -> 7.75, 15 -> 3.87
    assert abs(share(roots, "MRI") / share(roots, "CT") - 2.0) < 1e-9


def test_weighted_sampler_is_seeded_resumable_and_shared_by_ranks(llama3_tok, data_dir):
    """Balanced draws follow the weights, depend on (seed, epoch) only, resume part-way with the
    same sequence, and two ranks split the one sequence a single process draws."""
    rows = [qa(f"question {i}", "a", image="") | {"modality": "CT" if i < 3 else "MRI"} for i in range(30)]
    ds = ImageChatDataset(llama3_tok, write_json(data_dir / "w.json", rows), num_image_tokens=N)
    weights = balance_weights(ds.field_values("modality"), 1.0)
    assert ds.field_values("modality")[:4] == ["CT", "CT", "CT", "MRI"]

    def keys(epoch, start=0, world_size=1, rank=0, seed=5):
        sampler = ResumableSampler(ds, num_replicas=world_size, rank=rank, seed=seed, weights=weights)
        sampler.set_epoch(epoch)
        sampler.start_index = start
        return [i for i, e in sampler if e == epoch]

    one = keys(0)
    assert len(one) == 30 and one == keys(0) and one != keys(1) and one != keys(0, seed=6)
    assert keys(0, start=7) == one[7:]
    assert keys(0, world_size=2, rank=0) == one[0::2] and keys(0, world_size=2, rank=1) == one[1::2]
    draws = [i for epoch in range(40) for i in keys(epoch)]
    ct_share = sum(i < 3 for i in draws) / len(draws)  # 3 of 30 records, half of the draws
    assert 0.45 < ct_share < 0.55
    with pytest.raises(ValueError, match="2 sampling weights for 30 records"):
        ResumableSampler(ds, num_replicas=1, rank=0, weights=weights[:2])
