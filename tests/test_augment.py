"""Training augmentation for scans (medcap.data.augment): settings, per-modality choice, flips only
where asked (never vertical), intensity changes that keep grey grey, drawn per sample seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medcap.data.augment import ModalityAugment, ScanAugment
from medcap.models.vision import build_vision_encoder


def marked(size: int = 32, colour: bool = False) -> Image.Image:
    """Dark, with a bright block at the top left: flips and rotations show where it goes."""
    x = np.full((size, size), 40, dtype=np.uint8)
    x[: size // 4, : size // 4] = 220
    x[size // 2 :, :] = np.linspace(40, 200, size, dtype=np.uint8)[None, :]
    if colour:
        return Image.fromarray(np.stack([x, x // 2, 255 - x], axis=-1), "RGB")
    return Image.fromarray(x, "L").convert("RGB")


def corner(image: Image.Image) -> str:
    """Where the bright block is: top-left, top-right, bottom-..."""
    x = np.asarray(image.convert("L"), dtype=np.float32)
    h, w = x.shape
    quads = {"top-left": x[: h // 4, : w // 4], "top-right": x[: h // 4, -w // 4 :],
             "bottom-left": x[-h // 4 :, : w // 4], "bottom-right": x[-h // 4 :, -w // 4 :]}  # fmt: skip
    return max(quads, key=lambda k: quads[k].mean())


def test_flips_only_left_right_and_only_when_asked():
    image = marked()
    never, always, half = ScanAugment(), ScanAugment(hflip=1.0), ScanAugment(hflip=0.5)
    sides = []
    for seed in range(40):
        torch.manual_seed(seed)
        assert np.array_equal(np.asarray(never(image)), np.asarray(image))
        assert corner(always(image)) == "top-right"
        sides.append(corner(half(image)))
    assert set(sides) == {"top-left", "top-right"}  # never upside down, never rotated
    assert 10 < sides.count("top-right") < 30


def test_window_and_gamma_keep_grey_grey_and_colour_hue():
    jitter = ScanAugment(window_width=(0.6, 1.4), window_level=0.15, gamma=(0.7, 1.4))
    torch.manual_seed(0)
    outs = [np.asarray(jitter(marked()), dtype=np.int16) for _ in range(5)]
    assert all((o[..., 0] == o[..., 1]).all() and (o[..., 1] == o[..., 2]).all() for o in outs)
    assert len({o.tobytes() for o in outs}) == 5  # each draw its own window
    colour = np.asarray(marked(colour=True), dtype=np.int16)
    out = np.asarray(jitter(marked(colour=True)), dtype=np.int16)
    order = np.argsort(colour.reshape(-1, 3), axis=1)[:, -1]  # the strongest channel stays the strongest
    kept = np.take_along_axis(out.reshape(-1, 3), order[:, None], axis=1)[:, 0] >= out.reshape(-1, 3).max(axis=1)
    assert kept.mean() > 0.99


@pytest.mark.parametrize(
    "settings",
    [{"hflip": 1.5}, {"window_width": [1.2, 0.8]}, {"gamma": [0, 1]}, {"window_level": 0.6}],
)
def test_bad_settings_are_refused(settings):
    with pytest.raises(ValueError, match="image_augment"):
        ScanAugment(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})


def test_settings_by_modality_and_the_same_draws_for_the_same_seed():
    preprocess = build_vision_encoder("vit_tiny").preprocess
    augment = preprocess.transform({
        "scale": [1.0, 1.0], "ratio": [1.0, 1.0],  # no crop: only the flip changes the picture
        "by_modality": {"CT": {"hflip": 1.0}, "X-Ray": {"hflip": 0.0}},
    })  # fmt: skip
    plain = preprocess.transform()
    image = marked(64)
    assert isinstance(augment, ModalityAugment)
    torch.manual_seed(0)
    flipped = augment(image, modality="CT")
    assert torch.allclose(flipped, plain(image).flip(-1), atol=1e-5)
    for modality in ("X-Ray", None, "MRI"):  # the base settings: no flip
        assert torch.allclose(augment(image, modality=modality), plain(image), atol=1e-5)
    with pytest.raises(ValueError, match="by_modality.CT: unknown settings"):
        preprocess.transform({"by_modality": {"CT": {"vflip": 1.0}}})
    jitter = preprocess.transform({"scale": [0.5, 1.0], "hflip": 0.5, "window_width": [0.8, 1.2], "gamma": [0.8, 1.2]})
    torch.manual_seed(7)
    first = [jitter(image) for _ in range(3)]
    torch.manual_seed(7)
    assert all(a.equal(b) for a, b in zip(first, [jitter(image) for _ in range(3)]))
    assert not first[0].equal(first[1])


def test_open_clip_settings_alone_draw_exactly_as_before():
    """No scan setting: the same numbers as open_clip's own transform (resumed runs and the
    recorded figures stay bitwise what they were)."""
    from open_clip.transform import AugmentationCfg, image_transform_v2

    preprocess = build_vision_encoder("vit_tiny").preprocess
    ours = preprocess.transform({"scale": [0.5, 1.0]})
    theirs = image_transform_v2(preprocess, is_train=True, aug_cfg=AugmentationCfg(scale=(0.5, 1.0)))
    image = marked(64, colour=True)
    torch.manual_seed(3)
    a = [ours(image) for _ in range(3)]
    torch.manual_seed(3)
    assert all(x.equal(theirs(image)) for x in a)


def test_the_dataset_augments_by_the_records_modality(tmp_path, chatml_tokenizer_json):
    from medcap.data.chatml import ChatMLTokenizer
    from medcap.data.dataset import ImageChatDataset

    marked(64).save(tmp_path / "img.png")
    records = [{"conversations": [{"from": "human", "value": "Which modality?"}, {"from": "gpt", "value": m or "A scan."}],
                "image": "img.png", **({"modality": m} if m else {})} for m in ("CT", "MRI", None)]  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(records))
    preprocess = build_vision_encoder("vit_tiny").preprocess
    transform = preprocess.transform({"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "by_modality": {"CT": {"hflip": 1.0}}})
    ds = ImageChatDataset(ChatMLTokenizer(chatml_tokenizer_json), tmp_path / "d.json", num_image_tokens=4, image_transform=transform,
                          augment_seed=1)  # fmt: skip
    plain = preprocess.transform()(marked(64))
    ct, mri, caption = (ds[i]["images"][0] for i in range(3))
    assert torch.allclose(ct, plain.flip(-1), atol=1e-5)
    assert torch.allclose(mri, plain, atol=1e-5) and torch.allclose(caption, plain, atol=1e-5)
    assert ds[(0, 3)]["images"].equal(ds[(0, 3)]["images"])  # per-sample seed: the same draw again
