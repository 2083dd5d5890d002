"""Training images in every mode, decoded as the official loader (``cv2.imread`` + BGR->RGB) does, and the node that
loads a condition image the same way at inference.

The fixtures and the arrays OpenCV reads from them are in tests/data/image_modes/ (made by its make_fixtures.py
with opencv-python-headless 4.9.0.80, the official requirement's version; 5.0.0 reads the same).
"""
import importlib
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import folder_paths
import nodes as comfy_nodes

import tiny
from test_server import server  # noqa: F401 (the real ComfyUI server, a fixture)
from tiny import DATA
from training_helpers import SIZE, prompt_encoder, training, write_pairs

images = importlib.import_module(f"{training.__name__}.images")
image_nodes = importlib.import_module(f"{training.__name__.rsplit('.', 1)[0]}.nodes.images")

MODES = os.path.join(DATA, "image_modes")
OPENCV = dict(np.load(os.path.join(MODES, "expected.npz")))
# Pillow gives only the high byte of 16-bit RGB TIFF samples; OpenCV rounds them (v + 128) // 257: 1 level at most.
TOLERANCE = {"rgb16.tif": 1}
LEVELS = np.arange(256, dtype=np.uint8).reshape(16, 16)


@pytest.mark.parametrize("name", sorted(OPENCV))
def test_every_mode_decodes_as_opencv_imread(name):
    decoded = images.decode(os.path.join(MODES, name))
    expected = OPENCV[name]
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).max() <= TOLERANCE.get(name, 0)


def test_a_16_bit_ramp_is_scaled_not_clipped_on_the_training_path():
    """Today's 16-bit PNG came out 99.6% white; through load_image it is OpenCV's high byte, every level once."""
    loaded = training.load_image(os.path.join(MODES, "gray16.png"), 16)
    expected = OPENCV["gray16.png"]
    torch.testing.assert_close(loaded, torch.from_numpy(expected / 255.0).float(), rtol=0, atol=0)
    assert sorted(expected[..., 0].ravel()) == list(range(256))


@pytest.mark.parametrize("name", ["gray_float32.tif", "gray_uint32.tif", "gray_int32.tif"])
def test_32_bit_tiffs_are_scaled_from_their_full_range(name):
    """OpenCV cannot read these at all (imread returns None); each fixture is the ramp 0..255 of its type's range."""
    assert name not in OPENCV
    decoded = images.decode(os.path.join(MODES, name))
    np.testing.assert_array_equal(decoded, np.repeat(LEVELS[..., None], 3, 2))


def test_a_dataset_of_16_bit_float_and_cmyk_sources_trains_on_the_opencv_images(tmp_path):
    """Sources in other modes go through the dataset path; a float image outside [0, 1] is skipped and counted
    with the reason, corrupt ones as before."""
    folder = write_pairs(str(tmp_path / "data"), 5)
    sources = {"item_0000": "gray16.png", "item_0001": "cmyk.jpg", "item_0002": "gray_float32.tif",
               "item_0003": "gray_float32_outside_0_1.tif"}
    for stem, fixture in sources.items():
        os.remove(os.path.join(folder, "source", stem + ".png"))
        shutil.copy(os.path.join(MODES, fixture), os.path.join(folder, "source", stem + os.path.splitext(fixture)[1]))
    with open(os.path.join(folder, "source", "item_0004.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    pairs, report = training.scan(folder)
    loaded = [training.dataset.load_pair(pair, SIZE, report) for pair in pairs]
    assert [images is not None for images in loaded] == [True, True, True, False, False]
    assert report.skipped["unreadable"] == [os.path.join("source", "item_0004.png")]
    (unsupported,) = report.skipped["unsupported"]
    assert unsupported.startswith(os.path.join("source", "item_0003.tif")) and "[-100, 920], not in [0, 1]" in unsupported
    assert "skipped 1 images without a defined 8-bit conversion" in report.summary()
    expected = training.load_image(os.path.join(MODES, "gray16.png"), SIZE)
    torch.testing.assert_close(loaded[0][0], expected, rtol=0, atol=0)
    data = training.encode_dataset(pairs, report, tiny.tiny_vae(), prompt_encoder(),
                                   tiny.tiny_model().model.latent_format, SIZE)
    assert len(data) == report.used == 3


# --- inference: Load Condition Image (as trained) ------------------------------------------------------------------

@pytest.fixture
def input_dir(tmp_path, monkeypatch):
    folder = tmp_path / "input"
    folder.mkdir()
    for name in ("gray16.png", "rgba16.png", "palette_transparent.png", "cmyk.jpg", "exif6.jpg", "gray_float32.tif"):
        shutil.copy(os.path.join(MODES, name), folder / name)
    monkeypatch.setattr(folder_paths, "input_directory", str(folder))
    return folder


def test_load_condition_image_gives_the_training_image_where_load_image_does_not(input_dir):
    node = image_nodes.LoadConditionImage()
    listed = node.INPUT_TYPES()["required"]["image"]
    assert "gray16.png" in listed[0] and listed[1].get("image_upload") is True
    assert node.VALIDATE_INPUTS("gray16.png") is True
    for name in ("gray16.png", "rgba16.png", "palette_transparent.png", "cmyk.jpg", "exif6.jpg"):
        image, mask = node.load_image(name)
        comfy_image, comfy_mask = comfy_nodes.LoadImage().load_image(name)
        expected = torch.from_numpy(OPENCV[name] / 255.0).float()[None]
        torch.testing.assert_close(image, expected, rtol=0, atol=0)
        assert image.shape == comfy_image.shape and mask.shape == comfy_mask.shape
        torch.testing.assert_close(mask, comfy_mask, rtol=0, atol=0)  # the same MASK as Load Image
    image, _ = node.load_image("gray_float32.tif")
    torch.testing.assert_close(image[0, ..., 0], torch.from_numpy(LEVELS / 255.0).float(), rtol=0, atol=0)
    # ComfyUI's Load Image clips the 16-bit ramp: all but the first few of 256 levels come out white.
    comfy_gray16, _ = comfy_nodes.LoadImage().load_image("gray16.png")
    assert (comfy_gray16 == 1).float().mean() > 0.99


def test_load_condition_image_in_the_real_server(server):
    """Through ComfyUI's server: listed with Load Image's upload widget, and a 16-bit condition image saved by Save
    Image is the image training sees."""
    spec = server.object_info["CtrLoRALoadConditionImage"]
    assert spec["display_name"] == "Load Condition Image (as trained)"
    assert spec["input"]["required"]["image"][1].get("image_upload") is True
    input_folder = server.root / "base" / "input"
    input_folder.mkdir(exist_ok=True)
    shutil.copy(os.path.join(MODES, "gray16.png"), input_folder / "gray16.png")
    entry = server.run({
        "1": {"class_type": "CtrLoRALoadConditionImage", "inputs": {"image": "gray16.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "condition"}},
    })
    assert entry["status"]["status_str"] == "success", server.explain(str(entry["status"]))
    (saved,) = entry["outputs"]["2"]["images"]
    with Image.open(server.output_dir / saved["subfolder"] / saved["filename"]) as image:
        np.testing.assert_array_equal(np.asarray(image), OPENCV["gray16.png"])
